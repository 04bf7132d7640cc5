"""`data index` on the toy set, and every bad input with an error naming the offending file/row/column."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.data.index import index_dataset
from lesiongen.data.manifest import load_manifest, meta_path_for
from lesiongen.errors import InputError, OutputExistsError

# Wide enough that typer's error panel never wraps or crops a long path out of the message.
runner = CliRunner(env={"COLUMNS": "2000"})


@pytest.fixture
def tiny_labels_dir(tmp_path) -> Path:
    """A labels.csv data set small enough to break by hand: 7 classes x 3 lesions x 1 image, 8 px PNGs."""
    root = tmp_path / "src"
    (root / "images").mkdir(parents=True)
    rows = []
    for c, label in enumerate(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]):
        for g in range(3):
            name = f"images/{label}{g}.png"
            Image.new("RGB", (8, 8), (30 * c, 20 * g, 100)).save(root / name)
            rows.append({"image": name, "label": label, "group_id": f"L-{label}-{g}", "age": str(40 + g)})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def rewrite_labels(root: Path, edit) -> Path:
    df = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    edit(df)
    df.to_csv(root / "labels.csv", index=False)
    return root


def cli_error(args: list[str]) -> str:
    """Run the CLI expecting an input error (exit 2, shown under 'Error'); returns the message on one line."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Error" in result.output
    return " ".join(result.output.replace("│", " ").split())


def test_toy_manifest_fixture_is_lesion_aware(toy_manifest, toy_data_dir):
    manifest = load_manifest(toy_manifest)
    df = manifest.df
    assert manifest.classes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert len(df) == 7 * 16 and "view" in df.columns
    assert (df.groupby("group_id")["split"].nunique() == 1).all()
    for split in ("train", "val", "test"):
        assert set(df.loc[df["split"] == split, "label"]) == set(manifest.classes)
    meta = json.loads(meta_path_for(toy_manifest).read_text())
    assert meta["fractions"] == {"train": 0.7, "val": 0.15, "test": 0.15} and meta["seed"] == 0
    assert meta["prompts"] == "ham10000" and meta["format"] == "labels"
    assert (manifest.root / df["image"][0]).resolve() == (Path(toy_data_dir) / df["image"][0]).resolve()


def test_index_is_deterministic_and_refuses_to_overwrite(toy_data_dir, toy_manifest, tmp_path):
    again = index_dataset(toy_data_dir, tmp_path / "again.csv", seed=0)
    assert again.df.equals(load_manifest(toy_manifest).df)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        index_dataset(toy_data_dir, tmp_path / "again.csv")
    other = index_dataset(toy_data_dir, tmp_path / "again.csv", seed=1, overwrite=True)
    assert not other.df["split"].equals(again.df["split"])
    labels = Path(toy_data_dir) / "labels.csv"  # the data set's own table: --overwrite never replaces it
    before = labels.read_bytes()
    with pytest.raises(OutputExistsError, match=r"is not a manifest lesiongen wrote \(no labels\.meta\.json"):
        index_dataset(toy_data_dir, labels, overwrite=True)
    assert labels.read_bytes() == before


def test_missing_required_column(tiny_labels_dir):
    rewrite_labels(tiny_labels_dir, lambda df: df.drop(columns=["label"], inplace=True))
    message = cli_error(["data", "index", str(tiny_labels_dir / "labels.csv"), "--out", str(tiny_labels_dir / "m.csv"),
                         "--format", "labels"])
    assert "labels.csv" in message and "missing required column(s) ['label']" in message


def test_labels_csv_with_only_a_header(tiny_labels_dir):
    (tiny_labels_dir / "labels.csv").write_text("image,label,group_id,age\n")
    message = cli_error(["data", "index", str(tiny_labels_dir), "--out", str(tiny_labels_dir / "m.csv")])
    assert "labels.csv has no rows" in message
    pd.DataFrame(columns=["lesion_id", "image_id", "dx"]).to_csv(tiny_labels_dir / "meta.csv", index=False)
    with pytest.raises(InputError, match=r"meta.csv has no rows"):
        index_dataset(tiny_labels_dir / "meta.csv", tiny_labels_dir / "m.csv", fmt="ham10000")


def test_missing_required_column_ham(tmp_path):
    pd.DataFrame({"lesion_id": ["L1"], "image_id": ["x"], "diagnosis": ["mel"]}).to_csv(
        tmp_path / "meta.csv", index=False)
    with pytest.raises(InputError, match=r"meta.csv: missing required column\(s\) \['dx'\]"):
        index_dataset(tmp_path / "meta.csv", tmp_path / "m.csv", fmt="ham10000")


def test_unknown_label(tiny_labels_dir):
    rewrite_labels(tiny_labels_dir, lambda df: df.__setitem__("label", df["label"].replace({"df": "keloid"})))
    message = cli_error(["data", "index", str(tiny_labels_dir), "--out", str(tiny_labels_dir / "m.csv")])
    assert "labels.csv row 11, column 'label': unknown label 'keloid'" in message
    assert "akiec" in message  # says what was expected


def test_empty_label_cell(tiny_labels_dir):
    rewrite_labels(tiny_labels_dir,
                   lambda df: df.__setitem__("label", ["" if i == 4 else v for i, v in enumerate(df["label"])]))
    with pytest.raises(InputError, match=r"labels.csv row 6, column 'label': empty label"):
        index_dataset(tiny_labels_dir, tiny_labels_dir / "m.csv")


def test_missing_image_file(tiny_labels_dir):
    (tiny_labels_dir / "images" / "mel1.png").unlink()
    message = cli_error(["data", "index", str(tiny_labels_dir), "--out", str(tiny_labels_dir / "m.csv")])
    assert "labels.csv row 15, column 'image': image file 'images/mel1.png' not found" in message


def test_missing_image_file_ham(tmp_path):
    pd.DataFrame({"lesion_id": ["L1"], "image_id": ["ISIC_0000001"], "dx": ["mel"]}).to_csv(
        tmp_path / "HAM10000_metadata.csv", index=False)
    with pytest.raises(InputError, match=r"row 2, column 'image_id': no image file named 'ISIC_0000001\.\*'"):
        index_dataset(tmp_path, tmp_path / "m.csv")


def test_corrupt_image_is_skipped_and_counted_or_fails_with_strict(tiny_labels_dir, tmp_path):
    (tiny_labels_dir / "images" / "nv2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tiny_labels_dir / "images" / "bcc0.png")
    whole = (tiny_labels_dir / "images" / "bcc0.png").read_bytes()
    (tiny_labels_dir / "images" / "bcc0.png").write_bytes(whole[: len(whole) // 2])  # truncated download
    out = tmp_path / "m.csv"
    result = runner.invoke(app, ["data", "index", str(tiny_labels_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "skipped 2 unreadable image(s)" in result.output
    manifest = load_manifest(out)
    assert len(manifest) == 19
    assert sorted(s["image"] for s in manifest.meta["skipped_unreadable"]) == ["images/bcc0.png", "images/nv2.png"]
    message = cli_error(["data", "index", str(tiny_labels_dir), "--out", str(tmp_path / "s.csv"), "--strict"])
    assert "labels.csv row 5" in message and "'images/bcc0.png' is unreadable" in message
    assert "2 image(s) unreadable" in message


def test_duplicate_image_ids(tiny_labels_dir):
    rewrite_labels(tiny_labels_dir, lambda df: df.__setitem__("image", [df["image"][3] if i == 9 else v
                                                                       for i, v in enumerate(df["image"])]))
    message = cli_error(["data", "index", str(tiny_labels_dir), "--out", str(tiny_labels_dir / "m.csv")])
    assert "rows [5, 11], column 'image': 'images/bcc0.png' is listed more than once" in message


def test_duplicate_image_ids_ham(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ISIC_1.png")
    pd.DataFrame({"lesion_id": ["L1", "L2"], "image_id": ["ISIC_1", "ISIC_1"], "dx": ["mel", "nv"]}).to_csv(
        tmp_path / "HAM10000_metadata.csv", index=False)
    with pytest.raises(InputError, match=r"rows \[2, 3\], column 'image_id': 'ISIC_1' is listed more than once"):
        index_dataset(tmp_path, tmp_path / "m.csv")


@pytest.mark.parametrize("bad_path", ["../outside.png", "images/../../outside.png", "/etc/passwd.png"])
def test_path_escaping_the_data_root(tiny_labels_dir, bad_path):
    (tiny_labels_dir.parent / "outside.png").write_bytes((tiny_labels_dir / "images" / "df0.png").read_bytes())
    rewrite_labels(tiny_labels_dir, lambda df: df.__setitem__("image", [bad_path if i == 2 else v
                                                                       for i, v in enumerate(df["image"])]))
    message = cli_error(["data", "index", str(tiny_labels_dir), "--out", str(tiny_labels_dir / "m.csv")])
    assert f"labels.csv row 4, column 'image': image path '{bad_path}' escapes the data root" in message


def test_empty_class_in_labels(tiny_labels_dir):
    rewrite_labels(tiny_labels_dir, lambda df: df.drop(index=df.index[df["label"] == "vasc"], inplace=True))
    message = cli_error(["data", "index", str(tiny_labels_dir), "--out", str(tiny_labels_dir / "m.csv")])
    assert "class(es) ['vasc']" in message and "have no images" in message


def test_empty_class_folder(toy_data_dir, tmp_path):
    source = tmp_path / "folder"
    shutil.copytree(toy_data_dir / "images", source)
    shutil.rmtree(source / "df")
    (source / "df").mkdir()
    message = cli_error(["data", "index", str(source), "--out", str(tmp_path / "m.csv")])
    assert f"{source / 'df'}: class folder 'df' contains no images" in message


def test_class_emptied_by_skipped_images(tiny_labels_dir):
    for g in range(3):
        (tiny_labels_dir / "images" / f"df{g}.png").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"class\(es\) \['df'\].*after skipping 3 unreadable"):
        index_dataset(tiny_labels_dir, tiny_labels_dir / "m.csv")


def test_non_utf8_csv(tiny_labels_dir):
    with open(tiny_labels_dir / "labels.csv", "ab") as handle:
        handle.write("images/caf\u00e9.png,nv,L-x,41\n".encode("latin-1"))  # a Latin-1 row among UTF-8 ones
    message = cli_error(["data", "index", str(tiny_labels_dir / "labels.csv"), "--out", str(tiny_labels_dir / "m.csv")])
    rows = (tiny_labels_dir / "labels.csv").read_bytes()
    line = rows.count(b"\n")  # the row just appended is the last one
    assert f"labels.csv: not UTF-8 text (byte {rows.index(b'caf') + 3}, line {line}:" in message


def test_isic_row_with_two_classes_and_unknown_class(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ISIC_1.png")
    truth = tmp_path / "ISIC_2019_Training_GroundTruth.csv"
    truth.write_text("image,MEL,NV,UNK\nISIC_1,1.0,1.0,0.0\n")
    with pytest.raises(InputError, match=r"row 2: expected exactly one of \['MEL', 'NV', 'UNK'\] set to 1, "
                                         r"found \['MEL', 'NV'\]"):
        index_dataset(tmp_path, tmp_path / "m.csv")
    truth.write_text("image,MEL,NV,UNK\nISIC_1,0.0,0.0,1.0\n")
    with pytest.raises(InputError, match=r"row 2: unknown label 'UNK'"):
        index_dataset(tmp_path, tmp_path / "m.csv")


def test_bad_flags_name_the_flag(tiny_labels_dir):
    for args, flag in ((["--val", "0.6", "--test", "0.5"], "--val/--test"), (["--format", "coco"], "--format"),
                       (["--val", "-0.1"], "--val")):
        result = runner.invoke(app, ["data", "index", str(tiny_labels_dir), "--out", str(tiny_labels_dir / "m.csv"),
                                     *args])
        assert result.exit_code == 2, result.output
        assert flag in result.output


def test_undetectable_source(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    message = cli_error(["data", "index", str(tmp_path), "--out", str(tmp_path / "m.csv")])
    assert str(tmp_path) in message and "cannot tell the layout" in message


def test_lesion_ids_are_trimmed_and_images_without_one_are_warned_about(tiny_labels_dir, tmp_path):
    def edit(df):
        df.loc[0, "group_id"] = df.loc[1, "group_id"] + " "  # one lesion written two ways: must not be split
        df.loc[2, "group_id"] = ""

    rewrite_labels(tiny_labels_dir, edit)
    result = runner.invoke(app, ["data", "index", str(tiny_labels_dir), "--out", str(tmp_path / "m.csv")])
    assert result.exit_code == 0, result.output
    df = load_manifest(tmp_path / "m.csv").df
    assert df.loc[0, "group_id"] == df.loc[1, "group_id"] and df.loc[0, "split"] == df.loc[1, "split"]
    assert "WARNING: 1 of 21 images have no lesion id, so each is split as a lesion of its own" in result.output
    assert json.loads((tmp_path / "m.meta.json").read_text())["images_without_lesion_id"] == 1
