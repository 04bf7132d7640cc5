"""Reading HAM10000, ISIC 2019, ImageFolder and labels.csv layouts into one manifest (`data index`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.data.index import index_dataset
from lesiongen.data.manifest import load_manifest
from lesiongen.data.readers import detect_format

runner = CliRunner()
HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
TO_ISIC = {"akiec": "AK", "bcc": "BCC", "bkl": "BKL", "df": "DF", "mel": "MEL", "nv": "NV", "vasc": "VASC"}


def toy_rows(toy_data_dir: Path) -> pd.DataFrame:
    return pd.read_csv(toy_data_dir / "labels.csv", dtype=str, keep_default_na=False)


def make_ham_layout(toy_data_dir: Path, root: Path) -> Path:
    """HAM10000 as downloaded: metadata csv + images split over two part folders."""
    rows = toy_rows(toy_data_dir)
    ids = [Path(p).stem.replace("-", "_") for p in rows["image"]]
    for i, (src, image_id) in enumerate(zip(rows["image"], ids)):
        part = root / f"HAM10000_images_part_{1 + i % 2}"
        part.mkdir(parents=True, exist_ok=True)
        shutil.copy(toy_data_dir / src, part / f"{image_id}.png")
    meta = pd.DataFrame({"lesion_id": rows["group_id"], "image_id": ids, "dx": rows["label"],
                         "dx_type": "histo", "age": "50.0", "sex": "female", "localization": "back"})
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    return root


def make_isic_layout(toy_data_dir: Path, root: Path, *, with_metadata: bool = True) -> Path:
    """ISIC 2019: one-hot GroundTruth csv, metadata csv with lesion_id (empty for some), input folder."""
    rows = toy_rows(toy_data_dir)
    folder = root / "ISIC_2019_Training_Input"
    folder.mkdir(parents=True)
    ids = [f"ISIC_{i:07d}" for i in range(len(rows))]
    for src, image_id in zip(rows["image"], ids):
        shutil.copy(toy_data_dir / src, folder / f"{image_id}.png")
    columns = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    truth = pd.DataFrame(0.0, index=range(len(rows)), columns=columns)
    for i, label in enumerate(rows["label"]):
        truth.at[i, TO_ISIC[label]] = 1.0
    truth.at[0, "AK"], truth.at[0, "SCC"] = 0.0, 1.0  # ISIC 2019 has scc; HAM folds it into akiec
    truth.insert(0, "image", ids)
    truth.to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    if with_metadata:
        lesion = [g if i % 5 else "" for i, g in enumerate(rows["group_id"])]  # some images have no lesion id
        pd.DataFrame({"image": ids, "age_approx": "55.0", "anatom_site_general": "anterior torso",
                      "lesion_id": lesion, "sex": "male"}).to_csv(root / "ISIC_2019_Training_Metadata.csv", index=False)
    return root


def assert_lesion_aware(df: pd.DataFrame) -> None:
    assert (df.groupby("group_id")["split"].nunique() == 1).all()
    for split in ("train", "val", "test"):
        assert set(df.loc[df["split"] == split, "label"]) == set(df["label"]), split


def test_detect_format_of_each_layout(toy_data_dir, tmp_path):
    assert detect_format(toy_data_dir)[0] == "labels"
    assert detect_format(toy_data_dir / "images")[0] == "imagefolder"
    assert detect_format(make_ham_layout(toy_data_dir, tmp_path / "ham"))[0] == "ham10000"
    isic = make_isic_layout(toy_data_dir, tmp_path / "isic")
    assert detect_format(isic) == ("isic2019", isic / "ISIC_2019_Training_GroundTruth.csv")


def test_ham10000_layout(toy_data_dir, tmp_path):
    source = make_ham_layout(toy_data_dir, tmp_path / "ham")
    manifest = index_dataset(source, tmp_path / "ham.csv")
    df = manifest.df
    assert manifest.classes == HAM_CLASSES
    assert manifest.meta["dataset"] == "ham10000" and manifest.meta["prompts"] == "ham10000"
    assert list(df.columns[:4]) == ["image", "label", "split", "group_id"]
    assert {"lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"} <= set(df.columns)
    assert (df["group_id"] == df["lesion_id"]).all()
    assert df["image"].str.startswith("HAM10000_images_part_").all()
    assert len(df) == len(toy_rows(toy_data_dir))
    assert_lesion_aware(df)
    reloaded = load_manifest(tmp_path / "ham.csv")
    assert all(p.is_file() for p in reloaded.image_paths())


def test_isic2019_layout_keeps_isic_classes_and_uses_metadata_lesion_ids(toy_data_dir, tmp_path):
    source = make_isic_layout(toy_data_dir, tmp_path / "isic")
    manifest = index_dataset(source, tmp_path / "isic.csv")
    df = manifest.df
    assert manifest.meta["prompts"] == "isic2019"
    assert manifest.classes == ["mel", "nv", "bcc", "ak", "bkl", "df", "vasc", "scc"]
    assert "akiec" not in set(df["label"]) and {"ak", "scc"} <= set(df["label"])
    assert {"anatom_site_general", "age_approx", "lesion_id", "MEL"} <= set(df.columns)
    with_lesion = df["lesion_id"] != ""
    assert (df.loc[with_lesion, "group_id"] == df.loc[with_lesion, "lesion_id"]).all()
    assert (df.loc[~with_lesion, "group_id"] == df.loc[~with_lesion, "image"]).all()
    assert (df.groupby("group_id")["split"].nunique() == 1).all()


def test_imagefolder_layout_each_image_is_its_own_lesion(toy_data_dir, tmp_path):
    manifest = index_dataset(toy_data_dir / "images", tmp_path / "folder.csv", fmt="imagefolder")
    df = manifest.df
    assert manifest.meta["format"] == "imagefolder"
    assert (df["group_id"] == df["image"]).all()
    assert sorted(set(df["label"])) == HAM_CLASSES
    assert_lesion_aware(df)


def test_labels_csv_with_lesion_id_and_label_spellings(toy_data_dir, tmp_path):
    source = tmp_path / "data"
    shutil.copytree(toy_data_dir, source)
    rows = toy_rows(source).rename(columns={"group_id": "lesion_id"})
    spelled = {"mel": "Melanoma", "nv": "NV", "akiec": "actinic keratosis"}
    rows["label"] = [spelled.get(label, label) for label in rows["label"]]
    rows.to_csv(source / "labels.csv", index=False)
    manifest = index_dataset(source, tmp_path / "alt.csv")
    df = manifest.df
    assert sorted(set(df["label"])) == HAM_CLASSES
    assert (df["group_id"] == df["lesion_id"]).all()
    assert set(df.loc[df["label"] == "mel", "source_label"]) == {"Melanoma"}


def test_cli_index_then_check_on_ham_layout(toy_data_dir, tmp_path):
    source = make_ham_layout(toy_data_dir, tmp_path / "ham")
    out = tmp_path / "m" / "manifest.csv"
    result = runner.invoke(app, ["data", "index", str(source), "--out", str(out), "--val", "0.2", "--test", "0.2",
                                 "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "ham10000 layout" in result.output
    meta = load_manifest(out).meta
    assert meta["fractions"] == {"train": pytest.approx(0.6), "val": 0.2, "test": 0.2} and meta["seed"] == 3
    result = runner.invoke(app, ["data", "check", str(out)])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output


def test_ham_metadata_without_dx_is_named_not_mistaken_for_an_imagefolder(toy_data_dir, tmp_path):
    source = make_ham_layout(toy_data_dir, tmp_path / "ham")
    metadata = source / "HAM10000_metadata.csv"
    pd.read_csv(metadata).drop(columns=["dx"]).to_csv(metadata, index=False)
    out = tmp_path / "m" / "manifest.csv"
    result = runner.invoke(app, ["data", "index", str(source), "--out", str(out)])
    assert result.exit_code != 0
    assert "HAM10000_metadata.csv" in result.output and "'dx'" in result.output
    assert "--format imagefolder" in result.output and not out.exists()
    # The way out the message offers works where the subfolders are classes and the CSV is a side file.
    folder = tmp_path / "by_class"
    shutil.copytree(toy_data_dir / "images", folder)
    pd.DataFrame({"image_id": ["x"], "age": ["50"]}).to_csv(folder / "extra.csv", index=False)
    assert runner.invoke(app, ["data", "index", str(folder), "--out", str(out)]).exit_code != 0
    result = runner.invoke(app, ["data", "index", str(folder), "--out", str(out), "--format", "imagefolder"])
    assert result.exit_code == 0, result.output
    assert sorted(set(load_manifest(out).df["label"])) == HAM_CLASSES
