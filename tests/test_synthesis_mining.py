"""Mining hard cases from predictions.csv: selection, ranking, caps, leakage guard, bad input (library + CLI).

The predictions here are written by the test with known probabilities, so every selection has a known
answer; the end-to-end test in test_synthesis_cli.py mines real `lesiongen evaluate` output.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.data.manifest import load_manifest
from lesiongen.errors import InputError
from lesiongen.synthesis.mining import (
    LEAKAGE_WARNING,
    MiningConfig,
    NoHardCasesError,
    load_predictions,
    mine_hard_cases,
)
from lesiongen.utils.hashing import sha256_file

runner = CliRunner()


def write_predictions(path, manifest_path, split: str, probs_for) -> pd.DataFrame:
    """predictions.csv (+ meta) in evaluate's format; `probs_for(row) -> {class: p}` sets each row."""
    manifest = load_manifest(manifest_path)
    rows = []
    for row in manifest.split(split).df.to_dict("records"):
        given = probs_for(row)
        rest = (1.0 - sum(given.values())) / (len(manifest.classes) - len(given))
        probs = np.array([given.get(c, rest) for c in manifest.classes])
        true = manifest.classes.index(row["label"])
        others = np.delete(probs, true)
        rows.append({"image": row["image"], "label": row["label"], "split": split, "group_id": row["group_id"],
                     "pred": manifest.classes[int(probs.argmax())], "correct": int(probs.argmax() == true),
                     "loss": -math.log(probs[true]), "margin": probs[true] - others.max(),
                     **{f"prob_{c}": p for c, p in zip(manifest.classes, probs)}})
    df = pd.DataFrame(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    meta = {"manifest": str(manifest_path), "manifest_sha256": sha256_file(manifest_path), "split": split,
            "classes": manifest.classes, "model": "hand-written"}
    path.with_name(path.stem + ".meta.json").write_text(json.dumps(meta))
    return df


def confident(row):
    return {row["label"]: 0.94}


@pytest.fixture
def val_predictions(tmp_path, toy_manifest):
    """Every val image right with margin 0.9, except: two mel images called nv (loss 1.2), one akiec
    called bkl (also loss 1.2), one bkl right with margin 0.05, one nv right by a hair (p 0.4 vs mel 0.35)."""
    val = load_manifest(toy_manifest).split("val").df
    first = {label: list(val[val["label"] == label]["image"]) for label in ("mel", "akiec", "bkl", "nv")}
    special = {first["mel"][0]: {"mel": 0.3012, "nv": 0.6}, first["mel"][1]: {"mel": 0.3012, "nv": 0.6},
               first["akiec"][0]: {"akiec": 0.3012, "bkl": 0.6}, first["bkl"][0]: {"bkl": 0.45, "mel": 0.40},
               first["nv"][0]: {"nv": 0.40, "mel": 0.35}}
    path = tmp_path / "eval" / "predictions.csv"
    write_predictions(path, toy_manifest, "val", lambda row: special.get(row["image"], confident(row)))
    return path, first


def mine(path, manifest, **config):
    classes = load_manifest(manifest).classes
    mining = MiningConfig(**config)
    return mine_hard_cases(load_predictions(path, manifest, split=mining.split, classes=classes), mining)


def test_selection_ranking_and_caps(val_predictions, toy_manifest):
    path, first = val_predictions
    result = mine(path, toy_manifest, max_per_lesion=None)
    cases = result.cases.set_index("image")
    # misclassified + low-margin; the confident rest are not hard
    assert set(cases.index) == {first["mel"][0], first["mel"][1], first["akiec"][0], first["bkl"][0], first["nv"][0]}
    assert cases.loc[first["mel"][0], "reason"] == "misclassified"
    assert cases.loc[first["bkl"][0], "reason"] == "low-margin"
    # same loss, but a melanoma called a nevus outranks an akiec called bkl (confusion weight 2)
    assert cases.loc[first["mel"][0], "confusion_weight"] == 2.0
    assert cases.loc[first["akiec"][0], "confusion_weight"] == 1.0
    assert cases.loc[first["mel"][0], "rank"] < cases.loc[first["akiec"][0], "rank"]
    # a correct nevus whose runner-up is melanoma is weighted as that confusion pair
    assert cases.loc[first["nv"][0], "confused_with"] == "mel" and cases.loc[first["nv"][0], "confusion_weight"] == 2.0
    assert list(result.cases["hardness"]) == sorted(result.cases["hardness"], reverse=True)
    assert result.leakage_warning is None and "leakage_warning" not in result.cases

    quota = mine(path, toy_manifest, max_per_lesion=None, per_class_quota=1)
    assert quota.cases["label"].value_counts().max() == 1
    per_class = mine(path, toy_manifest, max_per_lesion=None, per_class_quota={"mel": 1})
    assert (per_class.cases["label"] == "mel").sum() == 1 and len(per_class.cases) == 4
    budget = mine(path, toy_manifest, max_per_lesion=None, max_cases=2)
    assert list(budget.cases["image"]) == list(result.cases["image"][:2])
    weights = mine(path, toy_manifest, max_per_lesion=None, confusion_weights={"akiec->bkl": 5.0})
    assert weights.cases.iloc[0]["image"] == first["akiec"][0]


def test_lesion_cap_keeps_the_hardest_image_of_a_lesion(tmp_path, toy_manifest):
    val = load_manifest(toy_manifest).split("val").df
    group = val["group_id"][val["group_id"].duplicated()].iloc[0]
    images = list(val[val["group_id"] == group]["image"])
    wrong = {images[0]: 0.2, images[1]: 0.1}  # p(true); the second is the harder one
    path = tmp_path / "predictions.csv"

    def probs(row):
        if row["image"] in wrong:
            other = next(c for c in load_manifest(toy_manifest).classes if c != row["label"])
            return {row["label"]: wrong[row["image"]], other: 0.7}
        return confident(row)

    write_predictions(path, toy_manifest, "val", probs)
    cases = mine(path, toy_manifest).cases  # default: one image per lesion
    assert list(cases["image"]) == [images[1]]
    assert len(mine(path, toy_manifest, max_per_lesion=2).cases) == 2


def test_nothing_hard_is_a_clear_error(tmp_path, toy_manifest):
    path = tmp_path / "predictions.csv"
    write_predictions(path, toy_manifest, "val", confident)
    with pytest.raises(NoHardCasesError, match="no hard cases .* 0 misclassified"):
        mine(path, toy_manifest)


def test_predictions_of_another_manifest_are_refused(val_predictions, toy_manifest, tmp_path):
    path, _ = val_predictions
    other = tmp_path / "other" / "manifest.csv"
    other.parent.mkdir()
    shutil.copy(toy_manifest, other)
    shutil.copy(toy_manifest.with_name("manifest.meta.json"), other.with_name("manifest.meta.json"))
    with open(other, "a") as handle:  # one more row: another manifest
        handle.write("images/extra.png,mel,train,extra-lesion,0\n")
    with pytest.raises(InputError, match="made from another manifest.*manifest_sha256"):
        mine(path, other)


def test_bad_prediction_files(val_predictions, toy_manifest, tmp_path):
    path, _ = val_predictions
    with pytest.raises(InputError, match="no predictions on split 'test'"):
        mine(path, toy_manifest, split="test", allow_test_mining=True)
    broken = tmp_path / "broken" / "predictions.csv"
    broken.parent.mkdir()
    pd.read_csv(path).drop(columns=["margin"]).to_csv(broken, index=False)
    shutil.copy(path.with_name("predictions.meta.json"), broken.with_name("predictions.meta.json"))
    with pytest.raises(InputError, match=r"missing column\(s\) \['margin'\]"):
        mine(broken, toy_manifest)
    alone = tmp_path / "alone" / "predictions.csv"
    alone.parent.mkdir()
    shutil.copy(path, alone)
    with pytest.raises(InputError, match="predictions.meta.json beside it"):
        mine(alone, toy_manifest)
    with pytest.raises(InputError, match="no such predictions file"):
        mine(tmp_path / "missing" / "predictions.csv", toy_manifest)


def _edited(path, tmp_path, name, edit):
    """A copy of predictions.csv (+ its unchanged meta, so the manifest hash still matches) with `edit` applied."""
    out = tmp_path / name / "predictions.csv"
    out.parent.mkdir()
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(df).to_csv(out, index=False)
    shutil.copy(path.with_name("predictions.meta.json"), out.with_name("predictions.meta.json"))
    return out


def test_prediction_rows_are_checked_against_the_manifest(val_predictions, toy_manifest, tmp_path):
    path, first = val_predictions
    akiec = first["akiec"][0]

    def relabel(df):
        df.loc[df["image"] == akiec, "label"] = "mel"
        return df

    row = int(pd.read_csv(path).index[pd.read_csv(path)["image"] == akiec][0]) + 2
    with pytest.raises(InputError, match=rf"row {row}: image '{akiec}' has label 'mel', but .* labels it 'akiec'"):
        mine(_edited(path, tmp_path, "relabelled", relabel), toy_manifest)

    def foreign(df):
        df.loc[0, "image"] = "images/not-there.png"
        return df

    with pytest.raises(InputError, match=r"row 2: image 'images/not-there.png' is not in split 'val' of"):
        mine(_edited(path, tmp_path, "foreign", foreign), toy_manifest)
    test_image = load_manifest(toy_manifest).split("test").df["image"].iloc[0]

    def other_split(df):
        df.loc[0, "image"] = test_image
        return df

    with pytest.raises(InputError, match="is not in split 'val'"):
        mine(_edited(path, tmp_path, "other-split", other_split), toy_manifest)
    n = len(pd.read_csv(path))
    with pytest.raises(InputError, match=rf"row {n + 2}: image '.*' is listed twice \(also row 2\)"):
        mine(_edited(path, tmp_path, "duplicated", lambda df: pd.concat([df, df.iloc[:1]])), toy_manifest)


def test_a_manifest_passed_as_predictions_is_named(toy_manifest):
    with pytest.raises(InputError, match=r"is not a predictions file from `lesiongen evaluate`"):
        mine(toy_manifest, toy_manifest)


def test_test_split_needs_the_flag_and_then_carries_the_warning(tmp_path, toy_manifest):
    with pytest.raises(ValueError, match="--allow-test-mining"):
        MiningConfig(split="test")
    path = tmp_path / "predictions.csv"
    test = load_manifest(toy_manifest).split("test").df
    wrong = test["image"].iloc[0]
    write_predictions(path, toy_manifest, "test",
                      lambda row: {row["label"]: 0.1, "df" if row["label"] != "df" else "nv": 0.8}
                      if row["image"] == wrong else confident(row))
    result = mine(path, toy_manifest, split="test", allow_test_mining=True)
    assert result.leakage_warning == LEAKAGE_WARNING
    assert (result.cases["leakage_warning"] == LEAKAGE_WARNING).all()


def test_mine_cli(val_predictions, toy_manifest, tmp_path):
    path, first = val_predictions
    out = tmp_path / "mined"
    result = runner.invoke(app, ["mine", "--predictions", str(path), "--manifest", str(toy_manifest), "--out", str(out),
                                 "--per-class-quota", "mel=1", "--confusion", "akiec->bkl=5"])
    assert result.exit_code == 0, result.output
    cases = pd.read_csv(out / "hard_cases.csv")
    assert cases.iloc[0]["image"] == first["akiec"][0] and (cases["label"] == "mel").sum() == 1
    report = json.loads((out / "mining.json").read_text())
    assert report["stats"]["mined"] == len(cases) and "leakage_warning" not in report

    again = runner.invoke(app, ["mine", "--predictions", str(path), "--manifest", str(toy_manifest), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output

    refused = runner.invoke(app, ["mine", "--predictions", str(path), "--manifest", str(toy_manifest),
                                  "--out", str(tmp_path / "t"), "--split", "test"])
    assert refused.exit_code == 2 and "--allow-test-mining" in refused.output

    bad_quota = runner.invoke(app, ["mine", "--predictions", str(path), "--manifest", str(toy_manifest),
                                    "--out", str(tmp_path / "q"), "--per-class-quota", "melanoma=x"])
    assert bad_quota.exit_code == 2 and "--per-class-quota" in bad_quota.output
    for flag, value, said in (("--per-class-quota", "zz=3", "--per-class-quota (mining.per_class_quota) names "
                               "unknown class(es) ['zz']"),
                              ("--confusion", "mel->zz=2", "--confusion (mining.confusion_weights): pair 'mel->zz'")):
        unknown = runner.invoke(app, ["mine", "--predictions", str(path), "--manifest", str(toy_manifest),
                                      "--out", str(tmp_path / "u"), flag, value])
        assert unknown.exit_code == 2 and said in " ".join(unknown.output.replace("│", " ").split())
        assert not (tmp_path / "u").exists()

    empty = tmp_path / "empty" / "predictions.csv"
    write_predictions(empty, toy_manifest, "val", confident)
    nothing = runner.invoke(app, ["mine", "--predictions", str(empty), "--manifest", str(toy_manifest),
                                  "--out", str(tmp_path / "e")])
    assert nothing.exit_code == 2 and "Error: no hard cases" in nothing.output and "Traceback" not in nothing.output
