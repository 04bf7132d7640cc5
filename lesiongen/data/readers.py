"""Read a labelled image collection into one table, whatever layout it came in.

Four layouts, one result (`SourceTable`): a HAM10000 `HAM10000_metadata.csv` + image folder, an
ISIC 2019 `..._GroundTruth.csv` (one-hot columns) + folder (+ the optional metadata csv that carries
`lesion_id`), a class-per-subfolder ImageFolder, and a generic `labels.csv`
(`image,label[,group_id|lesion_id,...]`). Readers only parse and locate files; label normalisation,
readability checks and the split happen in `lesiongen.data.index`.
"""

from __future__ import annotations

import csv
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lesiongen.data.manifest import check_relative_image_path, read_csv_text
from lesiongen.errors import InputError
from lesiongen.utils.text import not_utf8

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
FORMATS: tuple[str, ...] = ("ham10000", "isic2019", "imagefolder", "labels")
ISIC2019_CLASS_COLUMNS: tuple[str, ...] = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")


@dataclass
class SourceTable:
    """What a reader found: one row per image with a raw label, before normalisation and splitting.

    `df` has `image` (path relative to `root`, POSIX), `label` (as written in the source), `group_id`
    (lesion id, '' when the source has none) and every other source column as metadata.
    `row_refs[i]` names where row i came from (`file row N` or the image path) for error messages.
    """

    df: pd.DataFrame
    root: Path
    format: str
    dataset: str
    prompts: str
    label_column: str | None
    source_file: Path | None = None
    row_refs: list[str] = field(default_factory=list)

    def where(self, i: int, column: str | None = None) -> str:
        ref = self.row_refs[i]
        return f"{ref}, column '{column}'" if column else ref


# --------------------------------------------------------------------------------------- detection

def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [name.strip() for name in next(csv.reader(handle), [])]
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from err


def _format_of_header(header: list[str]) -> str | None:
    columns = set(header)
    if {"image_id", "dx"} <= columns:
        return "ham10000"
    if "image" in columns and len(columns & set(ISIC2019_CLASS_COLUMNS)) >= 2:
        return "isic2019"
    if {"image", "label"} <= columns:
        return "labels"
    return None


def _has_class_subfolders(folder: Path) -> bool:
    def holds_images(d: Path) -> bool:
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in d.rglob("*"))

    return any(d.is_dir() and not d.name.startswith(".") and holds_images(d) for d in folder.iterdir())


def _reject_near_miss_tables(folder: Path) -> None:
    """A label table short of one column must not fall through to ImageFolder detection: HAM10000's
    part folders would then become the classes and the error would blame those, not the table."""
    for path in sorted(folder.glob("*.csv")):
        header = _csv_header(path)
        if "image_id" in header and "dx" not in header:
            raise InputError(f"{path}: looks like HAM10000 metadata (it has 'image_id') but has no 'dx' "
                             f"(diagnosis) column; found {header}. Add the column, or pass --format "
                             "imagefolder if the class subfolders are the labels")


def detect_format(source: str | os.PathLike) -> tuple[str, Path]:
    """The layout of `source` (a folder or a CSV) and the file that defines it (the folder for ImageFolder)."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    if source.is_file():
        fmt = _format_of_header(_csv_header(source))
        if fmt is None:
            raise InputError(f"{source}: header {_csv_header(source)} matches no known layout; expected "
                             "HAM10000 (image_id, dx), ISIC 2019 GroundTruth (image + one-hot MEL, NV, ...) "
                             "or labels.csv (image, label)")
        return fmt, source
    if (source / "labels.csv").is_file():
        return "labels", source / "labels.csv"
    found = [(fmt, path) for path in sorted(source.glob("*.csv")) if (fmt := _format_of_header(_csv_header(path)))]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        listing = ", ".join(f"{p.name} ({fmt})" for fmt, p in found)
        raise InputError(f"{source}: several CSV files look like label tables ({listing}); pass the one to use "
                         "as SOURCE or choose with --format")
    _reject_near_miss_tables(source)
    if _has_class_subfolders(source):
        return "imagefolder", source
    raise InputError(f"{source}: cannot tell the layout: no labels.csv, HAM10000 metadata csv, ISIC 2019 "
                     "GroundTruth csv, or class subfolders with images; pass --format")


def _table_file(source: Path, fmt: str) -> Path:
    """The CSV a table-based format reads: `source` itself or the one CSV in it of that format."""
    if source.is_file():
        return source
    if not source.is_dir():
        raise InputError(f"{source}: no such file or folder")
    if fmt == "labels" and (source / "labels.csv").is_file():
        return source / "labels.csv"
    matches = [p for p in sorted(source.glob("*.csv")) if _format_of_header(_csv_header(p)) == fmt]
    if len(matches) != 1:
        what = "no" if not matches else f"{len(matches)}"
        raise InputError(f"{source}: {what} CSV file(s) in {fmt} layout found; pass the CSV itself as SOURCE")
    return matches[0]


# --------------------------------------------------------------------------------------- helpers

def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _index_by_stem(root: Path) -> dict[str, str]:
    """Image id -> path relative to root. Some downloads ship the same image twice (Kaggle's HAM10000
    has `HAM10000_images_part_1` and `ham10000_images_part_1`); the first in sorted order wins."""
    index: dict[str, str] = {}
    for path in _images_under(root):
        index.setdefault(path.stem, path.relative_to(root).as_posix())
    return index


def _require_columns(df: pd.DataFrame, path: Path, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing required column(s) {missing}; found {list(df.columns)}")


def _require_rows(df: pd.DataFrame, path: Path) -> None:
    if df.empty:
        raise InputError(f"{path} has no rows (only a header); expected one row per image")


def _reject_duplicates(values: pd.Series, path: Path, column: str) -> None:
    duplicated = values[values.duplicated(keep=False)]
    if len(duplicated):
        first_value = duplicated.iloc[0]
        rows = [int(i) + 2 for i in duplicated.index[duplicated == first_value]]
        raise InputError(f"{path} rows {rows}, column '{column}': '{first_value}' is listed more than once; "
                         "every image must appear exactly once")


def _row_refs(path: Path, n: int) -> list[str]:
    return [f"{path} row {i + 2}" for i in range(n)]  # +2: 1-based and the header line


def _locate_by_id(ids: pd.Series, root: Path, path: Path, column: str) -> list[str]:
    index = _index_by_stem(root)
    images = []
    for i, image_id in enumerate(ids):
        if image_id not in index:
            raise InputError(f"{path} row {i + 2}, column '{column}': no image file named '{image_id}.*' "
                             f"under {root} (looked for {sorted(IMAGE_SUFFIXES)})")
        images.append(index[image_id])
    return images


def _assemble(images: list[str], labels: list[str], groups: list[str], extra: pd.DataFrame) -> pd.DataFrame:
    """The core columns, then every other source column as metadata. The source's own image/label/
    group_id columns were consumed into the core; a source `split` column is kept as `source_split`
    because the manifest's `split` is ours."""
    core = pd.DataFrame({"image": images, "label": labels, "group_id": groups}, index=extra.index)
    extra = extra.drop(columns=[c for c in core.columns if c in extra.columns])
    if "split" in extra.columns and "source_split" not in extra.columns:
        extra = extra.rename(columns={"split": "source_split"})
    extra = extra.drop(columns=["split"], errors="ignore")
    return pd.concat([core, extra], axis=1)


# --------------------------------------------------------------------------------------- readers

def read_ham10000(source: Path) -> SourceTable:
    """`HAM10000_metadata.csv` (lesion_id, image_id, dx, ...) with images anywhere under its folder."""
    path = _table_file(source, "ham10000")
    df = read_csv_text(path)
    _require_columns(df, path, ("lesion_id", "image_id", "dx"))
    _require_rows(df, path)
    _reject_duplicates(df["image_id"], path, "image_id")
    root = path.parent
    images = _locate_by_id(df["image_id"], root, path, "image_id")
    table = _assemble(images, list(df["dx"]), list(df["lesion_id"]), df)
    return SourceTable(table, root, "ham10000", "ham10000", "ham10000", "dx", path, _row_refs(path, len(df)))


def _find_isic_metadata(folder: Path, ground_truth: Path) -> Path | None:
    for candidate in sorted(folder.glob("*.csv")):
        if candidate != ground_truth and {"image", "lesion_id"} <= set(_csv_header(candidate)):
            return candidate
    return None


def read_isic2019(source: Path, metadata_csv: str | os.PathLike | None = None) -> SourceTable:
    """ISIC 2019 GroundTruth (image + one-hot class columns) with the optional metadata csv for lesion_id."""
    path = _table_file(source, "isic2019")
    df = read_csv_text(path)
    _require_columns(df, path, ("image",))
    _require_rows(df, path)
    _reject_duplicates(df["image"], path, "image")
    class_columns = [c for c in df.columns if c != "image" and c in ISIC2019_CLASS_COLUMNS]
    labels = []
    for i, row in enumerate(df[class_columns].itertuples(index=False)):
        try:
            values = [float(v) for v in row]
        except ValueError as err:
            raise InputError(f"{path} row {i + 2}: one-hot columns {class_columns} must hold 0 or 1 ({err})") from err
        hot = [c for c, v in zip(class_columns, values) if v == 1.0]
        if len(hot) != 1 or sum(values) != 1.0:
            raise InputError(f"{path} row {i + 2}: expected exactly one of {class_columns} set to 1, "
                             f"found {hot or 'none'}")
        labels.append(hot[0])
    meta_path = Path(metadata_csv) if metadata_csv else _find_isic_metadata(path.parent, path)
    extra = df
    groups = [""] * len(df)
    if meta_path is not None:
        meta = read_csv_text(meta_path)
        _require_columns(meta, meta_path, ("image", "lesion_id"))
        _reject_duplicates(meta["image"], meta_path, "image")
        meta = meta.set_index("image")
        joined = meta.reindex(df["image"]).fillna("")
        joined.index = df.index
        groups = list(joined["lesion_id"])
        extra = pd.concat([extra, joined[[c for c in joined.columns if c not in extra.columns]]], axis=1)
    root = path.parent
    images = _locate_by_id(df["image"], root, path, "image")
    table = _assemble(images, labels, groups, extra)
    return SourceTable(table, root, "isic2019", "isic2019", "isic2019", None, path, _row_refs(path, len(df)))


def read_imagefolder(source: Path) -> SourceTable:
    """`source/<class>/**/<image>`: the class is the first-level folder name; each image is its own group."""
    if not source.is_dir():
        raise InputError(f"{source}: an ImageFolder source must be a folder with one subfolder per class")
    class_dirs = sorted(d for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise InputError(f"{source}: no class subfolders found")
    images, labels = [], []
    for class_dir in class_dirs:
        found = _images_under(class_dir)
        if not found:
            raise InputError(f"{class_dir}: class folder '{class_dir.name}' contains no images "
                             f"({sorted(IMAGE_SUFFIXES)}); remove it or add images")
        images += [p.relative_to(source).as_posix() for p in found]
        labels += [class_dir.name] * len(found)
    table = _assemble(images, labels, [""] * len(images), pd.DataFrame(index=range(len(images))))
    refs = [str(source / image) for image in images]
    return SourceTable(table, source, "imagefolder", source.name, "ham10000", None, None, refs)


def read_labels_csv(source: Path) -> SourceTable:
    """Generic `labels.csv`: image (path relative to the CSV's folder), label, optional group_id or lesion_id."""
    path = _table_file(source, "labels")
    df = read_csv_text(path)
    _require_columns(df, path, ("image", "label"))
    _require_rows(df, path)
    images = []
    for i, image in enumerate(df["image"]):
        where = f"{path} row {i + 2}, column 'image'"
        check_relative_image_path(image, where)
        images.append(posixpath.normpath(image.replace("\\", "/")))
    normalised = pd.Series(images, index=df.index)
    _reject_duplicates(normalised, path, "image")
    root = path.parent
    for i, image in enumerate(images):
        if not (root / image).is_file():
            raise InputError(f"{path} row {i + 2}, column 'image': image file '{image}' not found under {root}")
    group_column = next((c for c in ("group_id", "lesion_id") if c in df.columns), None)
    groups = list(df[group_column]) if group_column else [""] * len(df)
    table = _assemble(images, list(df["label"]), groups, df)
    return SourceTable(table, root, "labels", root.name, "ham10000", "label", path, _row_refs(path, len(df)))


READERS: dict[str, Callable[..., SourceTable]] = {
    "ham10000": read_ham10000,
    "isic2019": read_isic2019,
    "imagefolder": read_imagefolder,
    "labels": read_labels_csv,
}


def read_source(source: str | os.PathLike, fmt: str = "auto", *,
                metadata_csv: str | os.PathLike | None = None) -> SourceTable:
    """Read `source` in layout `fmt` ('auto' detects it); `metadata_csv` only applies to ISIC 2019."""
    source = Path(source)
    if fmt == "auto":
        fmt, source = detect_format(source)
    if fmt not in READERS:
        raise InputError(f"unknown format '{fmt}'; expected auto or one of {list(FORMATS)}")
    if metadata_csv is not None and fmt != "isic2019":
        raise InputError(f"a metadata csv ({metadata_csv}) only applies to the isic2019 format, not {fmt}")
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    return read_isic2019(source, metadata_csv) if fmt == "isic2019" else READERS[fmt](source)
