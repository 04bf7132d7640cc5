"""The manifest contract (DESIGN.md): one CSV row per image, plus a small sidecar for its root.

Columns: `image` (path relative to the manifest's root), `label`, `split`, `group_id` (lesion id, the
split unit), optional metadata. Synthetic rows add `synthetic=1`, `source_image`, `method`, `strength`,
`seed`, `generator_hash` and keep their source's `group_id` and `split`.

The sidecar `<name>.meta.json` records the image root (relative to the manifest's folder when it can)
and the ordered class list, so a manifest can live apart from the images it indexes and class indices
mean the same thing in every model trained on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lesiongen.errors import InputError
from lesiongen.utils.atomic import atomic_path, write_json
from lesiongen.utils.text import not_utf8

REQUIRED_COLUMNS: tuple[str, ...] = ("image", "label", "split", "group_id")
SYNTHETIC_COLUMNS: tuple[str, ...] = ("synthetic", "source_image", "method", "strength", "seed", "generator_hash")
SPLITS: tuple[str, ...] = ("train", "val", "test")


def meta_path_for(manifest_path: str | os.PathLike) -> Path:
    path = Path(manifest_path)
    return path.with_name(path.stem + ".meta.json")


@dataclass
class Manifest:
    """A loaded manifest: the table, the folder its `image` paths are relative to, the class order."""

    df: pd.DataFrame
    root: Path
    classes: list[str]
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        unknown = sorted(set(self.df["label"]) - set(self.classes)) if len(self.df) else []
        if unknown:
            raise InputError(f"{self.where}: labels {unknown} are not in the class list {self.classes}")

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "manifest"

    def __len__(self) -> int:
        return len(self.df)

    @property
    def is_synthetic(self) -> pd.Series:
        if "synthetic" not in self.df:
            return pd.Series(False, index=self.df.index)
        return self.df["synthetic"].astype(str).isin(["1", "True", "true"])

    def split(self, name: str, *, allow_empty: bool = False) -> Manifest:
        """The rows of one split; an empty or absent split is an error naming the manifest."""
        if name not in set(self.df["split"]):
            if allow_empty:
                return self.subset(self.df["split"] == name)
            present = sorted(set(self.df["split"]))
            raise InputError(f"{self.where} has no rows in split '{name}' (splits present: {present})")
        return self.subset(self.df["split"] == name)

    def subset(self, mask: pd.Series) -> Manifest:
        return Manifest(self.df[mask].reset_index(drop=True), self.root, list(self.classes), self.path, dict(self.meta))

    def image_paths(self) -> list[Path]:
        return [self.root / p for p in self.df["image"]]

    def label_indices(self) -> list[int]:
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[label] for label in self.df["label"]]

    def class_counts(self) -> dict[str, int]:
        counts = self.df["label"].value_counts()
        return {c: int(counts.get(c, 0)) for c in self.classes}

    def with_root(self, new_root: str | os.PathLike) -> Manifest:
        """The same images addressed relative to another root (used when merging manifests)."""
        new_root = Path(new_root).resolve()
        df = self.df.copy()
        df["image"] = [os.path.relpath((self.root / p).resolve(), new_root) for p in df["image"]]
        return Manifest(df, new_root, list(self.classes), None, dict(self.meta))


def check_relative_image_path(image: str, where: str) -> None:
    """Image paths must stay inside the data root: no absolute paths, no `..` components."""
    posix = image.replace("\\", "/")
    if not posix:
        raise InputError(f"{where}: empty image path")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":") or ".." in posix.split("/"):
        raise InputError(f"{where}: image path '{image}' escapes the data root (absolute or '..'); "
                         "paths must be relative to the root and stay inside it")


def read_csv_text(path: Path) -> pd.DataFrame:
    """Read a CSV as strings, with a clear error for non-UTF-8 bytes or a file that is not a table."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from err
    except pd.errors.EmptyDataError as err:
        raise InputError(f"{path}: empty file, expected a CSV with a header row") from err
    except pd.errors.ParserError as err:
        raise InputError(f"{path}: not a valid CSV ({err})") from err


def check_rows(df: pd.DataFrame, ok: pd.Series, path: Path, problem: Callable[[pd.Series], str]) -> None:
    """Refuse the first row of `df` (from `read_csv_text`: file row = index + 2) where `ok` is False, as
    `<path> row N<problem(row)>`."""
    bad = df.index[~ok.to_numpy(dtype=bool)]
    if len(bad):
        raise InputError(f"{path} row {bad[0] + 2}{problem(df.loc[bad[0]])}")


def numeric_column(df: pd.DataFrame, column: str, path: Path, *, low: float | None = None,
                   high: float | None = None) -> pd.Series:
    """`df[column]` (strings from `read_csv_text`, index = file row - 2) as finite floats within [low, high];
    the first bad value is named by file, column and row."""
    values = pd.to_numeric(df[column], errors="coerce").astype(float)
    bad = ~np.isfinite(values)
    if low is not None:
        bad |= values < low
    if high is not None:
        bad |= values > high
    if bad.any():
        i = values.index[bad.to_numpy()][0]
        expected = "a finite number" if low is None and high is None else f"a number in [{low}, {high}]"
        raise InputError(f"{path}: column '{column}' row {i + 2}: '{df.at[i, column]}' is not {expected}")
    return values


def load_manifest(path: str | os.PathLike, *, root: str | os.PathLike | None = None,
                  classes: list[str] | None = None) -> Manifest:
    """Load and validate a manifest; every problem names the file, row and column."""
    path = Path(path)
    df = read_csv_text(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing required column(s) {missing}; found {list(df.columns)}")
    if df.empty:
        raise InputError(f"{path}: the manifest has no rows")
    meta: dict = {}
    meta_file = meta_path_for(path)
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise InputError(f"{meta_file}: not valid JSON ({err})") from err
    if root is None:
        root = ((path.parent / meta["root"]) if "root" in meta else path.parent).resolve()
    for i, image in enumerate(df["image"]):
        check_relative_image_path(image, f"{path} row {i + 2}, column 'image'")
    check_rows(df, df["split"].isin(SPLITS), path,
               lambda row: f", column 'split': '{row['split']}' is not one of {list(SPLITS)}")
    check_rows(df, ~df["image"].duplicated(), path, lambda row: f": image '{row['image']}' is listed twice")
    classes = classes or meta.get("classes") or sorted(set(df["label"]))
    check_rows(df, df["label"].isin(classes), path,
               lambda row: f", column 'label': unknown label '{row['label']}'; expected one of {list(classes)}")
    return Manifest(df, Path(root), list(classes), path, meta)


def write_manifest(manifest: Manifest, path: str | os.PathLike, **extra_meta) -> Path:
    """Write CSV + sidecar atomically; the root is stored relative to the manifest when possible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = manifest.root.resolve()
    try:
        stored_root = os.path.relpath(root, path.parent.resolve())
    except ValueError:  # another drive on Windows
        stored_root = str(root)
    meta = {**manifest.meta, **extra_meta, "root": stored_root, "classes": list(manifest.classes)}
    with atomic_path(path) as tmp:
        manifest.df.to_csv(tmp, index=False)
    write_json(meta_path_for(path), meta)
    manifest.path = path
    manifest.meta = meta
    return path


def concat_manifests(manifests: list[Manifest], root: str | os.PathLike | None = None) -> Manifest:
    """Merge manifests (e.g. real + synthetic) under one root, keeping the first one's class order.

    The root defaults to the deepest folder holding every manifest's images, so merged image paths
    stay relative and inside it (a merged manifest written to disk loads back without `..` paths).
    """
    if not manifests:
        raise InputError("no manifests to merge")
    classes = list(manifests[0].classes)
    for m in manifests[1:]:
        extra = sorted(set(m.df["label"]) - set(classes))
        if extra:
            raise InputError(f"{m.where}: classes {extra} are not in {manifests[0].where} ({classes})")
    if root is None:
        root = os.path.commonpath([str(m.root.resolve()) for m in manifests])
    frames = [m.with_root(root).df for m in manifests]
    return Manifest(pd.concat(frames, ignore_index=True), Path(root), classes, None, dict(manifests[0].meta))
