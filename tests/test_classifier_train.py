"""`lesiongen train-classifier` and `lesiongen evaluate` end to end through the CLI, on the toy data.

Tiny model (timm's `test_efficientnet`), 32 px, 2 epochs: these tests check the machinery (outputs,
resume, DDP gather, errors), not accuracy.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from launch_support import failure, launch
from safetensors.torch import load_file, save_file
from test_classifier_data import make_synthetic_manifest
from typer.testing import CliRunner

from lesiongen.classifier.config import TrainConfig
from lesiongen.classifier.train import train_classifier
from lesiongen.cli.app import app
from lesiongen.config import from_dict, load_yaml
from lesiongen.data.manifest import Manifest, load_manifest, write_manifest
from lesiongen.errors import InputError
from lesiongen.utils.hashing import sha256_file

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
PREDICTION_COLUMNS = ["image", "label", "split", "group_id", "pred", "correct", "loss", "margin"] + \
                     [f"prob_{c}" for c in CLASSES]
TINY_RECIPE = {
    "arch": "test_efficientnet", "pretrained": "none", "img_size": 32, "load_size": 40, "epochs": 2,
    "batch_size": 8, "eval_batch_size": 4, "early_stopping_patience": None, "checkpoints_total_limit": None,
}

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Shared cache, one CPU thread per process (the machine's cores are shared; spinning threads crawl)."""
    cache = tmp_path_factory.mktemp("cache")
    saved = {k: os.environ.get(k) for k in ("LESIONGEN_CACHE", "OMP_NUM_THREADS")}
    os.environ.update(LESIONGEN_CACHE=str(cache), OMP_NUM_THREADS="1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_RECIPE))
    return path


class Ran:
    """A finished CLI call; `output` with rich's error box and line wrapping flattened to one line."""

    def __init__(self, result) -> None:
        self.exit_code, self.raw = result.exit_code, result.output
        self.output = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())


def cli(*args, expect: int = 0) -> Ran:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exit_code != expect:
        raise AssertionError(f"exit {result.exit_code} (expected {expect}):\n{result.output}\n{result.exception!r}")
    return Ran(result)


@pytest.fixture(scope="module")
def trained(env, toy_manifest, recipe, tmp_path_factory):
    """One CLI training run with a synthetic manifest mixed in."""
    root = tmp_path_factory.mktemp("trained")
    synthetic = make_synthetic_manifest(toy_manifest, root / "synthetic", split="val", per_class=2)
    out = root / "model"
    cli("train-classifier", "--manifest", toy_manifest, "--synthetic", synthetic, "--config", recipe, "--out", out)
    return out


def steps_per_epoch(manifest_path, extra_rows: int = 0, processes: int = 1) -> int:
    """Optimizer steps of one epoch: full batches of 8 per process over the training rows."""
    return (len(load_manifest(manifest_path).split("train")) + extra_rows) // (8 * processes)


def test_train_classifier_writes_the_model_folder(trained, toy_manifest):
    info = json.loads((trained / "classifier.json").read_text())
    assert info["arch"] == "test_efficientnet" and info["classes"] == CLASSES
    assert (info["img_size"], info["load_size"], info["tta"]) == (32, 40, "dihedral")
    data = info["training"]["data"]
    synthetic = load_manifest(data["synthetic_manifests"][0])
    assert data["synthetic_used"] == synthetic.class_counts() and data["synthetic_outside_splits"] == 0
    assert info["training"]["num_processes"] == 1
    history = pd.read_csv(trained / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    assert history["val_balanced_accuracy"].between(0, 1).all()
    assert 1 <= info["training"]["best_epoch"] <= 2
    steps = steps_per_epoch(toy_manifest, len(synthetic))
    assert {p.name for p in trained.glob("checkpoint-*")} == {f"checkpoint-{steps}", f"checkpoint-{2 * steps}"}
    saved = yaml.safe_load((trained / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["manifest"].endswith("manifest.csv")
    for name in ("predictions.csv", "predictions.meta.json", "metrics.json", "confusion_matrix.png", "roc.png"):
        assert (trained / "eval-val" / name).is_file()
    result = cli("train-classifier", "--manifest", load_manifest_path(trained), "--out", trained, expect=2)
    assert "already exists" in result.output and "--overwrite" in result.output
    assert "--resume latest" in result.output  # it holds checkpoints: resuming is the other way on
    assert json.loads((trained / ".lesiongen.json").read_text())["complete"] is True


def test_selection_scores_with_and_without_the_lesions_synthetic_images_came_from(trained):
    """The fixture trains on copies of 2 val images per class. By default (`all`) every val row selects the model,
    and the best epoch's score without those lesions is recorded beside it; both match the best model's
    eval-val predictions."""
    from sklearn.metrics import balanced_accuracy_score

    info = json.loads((trained / "classifier.json").read_text())
    synthetic = load_manifest(info["training"]["data"]["synthetic_manifests"][0]).df
    predictions = pd.read_csv(trained / "eval-val" / "predictions.csv")
    seen = predictions["group_id"].astype(str).isin(set(synthetic["group_id"].astype(str)))
    assert len(synthetic) == 14 and 14 <= seen.sum() < len(predictions)  # a toy lesion has several images
    assert info["training"]["selection"] == {
        "rule": "all", "source_lesions": synthetic["group_id"].nunique(), "source_rows": int(seen.sum()),
        "rows": len(predictions), "classes_without_rows": []}
    every = balanced_accuracy_score(predictions["label"], predictions["pred"])
    unseen = predictions[~seen]
    assert info["training"]["val_balanced_accuracy"] == pytest.approx(every, abs=1e-9)
    assert info["training"]["val_unseen_balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(unseen["label"], unseen["pred"]), abs=1e-9)
    history = pd.read_csv(trained / "history.csv")
    row = history[history["epoch"] == info["training"]["best_epoch"]].iloc[0]
    assert row["val_balanced_accuracy"] == row["val_all_balanced_accuracy"] == pytest.approx(every, abs=1e-9)
    assert row["val_unseen_balanced_accuracy"] == pytest.approx(info["training"]["val_unseen_balanced_accuracy"])


def test_selection_unseen_selects_on_the_lesions_no_synthetic_image_came_from(trained, recipe, tmp_path):
    from sklearn.metrics import balanced_accuracy_score

    synthetic = json.loads((trained / "classifier.json").read_text())["training"]["data"]["synthetic_manifests"][0]
    out = tmp_path / "unseen"
    result = cli("train-classifier", "--manifest", load_manifest_path(trained), "--synthetic", synthetic,
                 "--config", recipe, "--selection", "unseen", "--out", out)
    assert "(selection: unseen)" in result.output
    training = json.loads((out / "classifier.json").read_text())["training"]
    predictions = pd.read_csv(out / "eval-val" / "predictions.csv")
    unseen = predictions[~predictions["group_id"].astype(str).isin(
        set(load_manifest(synthetic).df["group_id"].astype(str)))]
    assert training["selection"]["rule"] == "unseen" and training["selection"]["rows"] == len(unseen)
    score = balanced_accuracy_score(unseen["label"], unseen["pred"])
    assert training["val_balanced_accuracy"] == training["val_unseen_balanced_accuracy"] == pytest.approx(score)
    history = pd.read_csv(out / "history.csv")
    assert (history["val_balanced_accuracy"] == history["val_unseen_balanced_accuracy"]).all()


def test_selection_reserved_selects_every_model_on_the_never_mined_lesions(env, toy_manifest, recipe, tmp_path):
    """Variants of non-reserved val lesions train; the model is chosen on the reserve alone, and variants of a
    reserved lesion are refused before any training."""
    from sklearn.metrics import balanced_accuracy_score

    from lesiongen.data.reserve import reserved_groups

    val = load_manifest(toy_manifest).split("val").df
    reserve = reserved_groups(val, 0.3)
    outside = set(val["group_id"].astype(str)) - reserve
    synthetic = make_synthetic_manifest(toy_manifest, tmp_path / "outside", split="val", per_class=2, lesions=outside)
    out = tmp_path / "reserved"
    result = cli("train-classifier", "--manifest", toy_manifest, "--synthetic", synthetic, "--config", recipe,
                 "--selection", "reserved", "--selection-reserve", "0.3", "--out", out)
    assert "model selection on the selection reserve" in result.output
    training = json.loads((out / "classifier.json").read_text())["training"]
    predictions = pd.read_csv(out / "eval-val" / "predictions.csv")
    held = predictions[predictions["group_id"].astype(str).isin(reserve)]
    assert training["selection"]["rule"] == "reserved" and training["selection"]["rows"] == len(held)
    assert training["selection"]["reserved_lesions"] == len(reserve)
    assert training["selection"]["classes_without_rows"] == []  # every class keeps a reserved lesion
    assert training["val_balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(held["label"], held["pred"]), abs=1e-9)
    history = pd.read_csv(out / "history.csv")
    assert history["val_all_balanced_accuracy"].notna().all()
    # the operating thresholds come from the reserve too, and the test evaluation applies those
    from lesiongen.metrics.clinical import ClinicalSpec, operating_points

    classes = load_manifest(toy_manifest).classes
    probs = torch.tensor(held[[f"prob_{c}" for c in classes]].to_numpy())
    target = torch.tensor([classes.index(label) for label in held["label"]])
    expected = {name: t for name, (_, t) in operating_points(probs, target, ClinicalSpec.default_for(classes)).items()}
    chosen = json.loads((out / "eval-val" / "metrics.json").read_text())["selection"]
    assert chosen["rule"] == "reserved" and chosen["n_images"] == len(held)
    assert {k: v for k, v in chosen["thresholds"].items() if v is not None} == pytest.approx(
        {k: v for k, v in expected.items() if math.isfinite(v)}, abs=1e-6)
    cli("evaluate", "--model", out, "--manifest", toy_manifest, "--split", "test", "--bootstrap", "0",
        "--out", tmp_path / "reserved-test")
    fixed = json.loads((tmp_path / "reserved-test" / "metrics.json").read_text())["fixed_thresholds"]
    assert "on the 14 validation images that selected the model (selection: reserved)".replace(
        "14", str(len(held))) in fixed["from"]
    assert {k: v for k, v in fixed["thresholds"].items() if v is not None and math.isfinite(v)} == pytest.approx(
        {k: v for k, v in chosen["thresholds"].items() if v is not None})

    inside = make_synthetic_manifest(toy_manifest, tmp_path / "inside", split="val", per_class=1, lesions=reserve)
    refused = cli("train-classifier", "--manifest", toy_manifest, "--synthetic", inside, "--config", recipe,
                  "--selection", "reserved", "--out", tmp_path / "refused", expect=2)
    assert "lesion(s) of the selection reserve" in refused.output and "--selection-reserve 0.3" in refused.output
    assert not (tmp_path / "refused" / "classifier.json").exists()
    unused = cli("train-classifier", "--manifest", toy_manifest, "--config", recipe, "--selection-reserve", "0.2",
                 "--out", tmp_path / "unused", expect=2)
    assert "only --selection reserved uses it" in " ".join(unused.output.replace("│", " ").split())


def test_a_tied_selection_score_goes_to_the_lower_validation_loss(tmp_path):
    from lesiongen.classifier.checkpoints import TrainerState
    from lesiongen.classifier.train import improves
    from lesiongen.utils.checkpoints import STATE_FILE

    state = TrainerState(best_score=0.95, best_loss=0.59, best_epoch=3)
    assert improves(0.96, 0.70, state) and not improves(0.94, 0.10, state)
    assert improves(0.95, 0.50, state) and not improves(0.95, 0.60, state)
    assert improves(0.0, 9.9, TrainerState())  # the first epoch is always the best so far
    (tmp_path / STATE_FILE).write_text(json.dumps(TrainerState().to_json()))  # infinities saved as null
    assert TrainerState.read(tmp_path).best_loss == float("inf")
    old = TrainerState().to_json()
    del old["best_loss"]  # a checkpoint written before the tie-break resumes
    (tmp_path / STATE_FILE).write_text(json.dumps(old))
    assert TrainerState.read(tmp_path).best_loss == float("inf")


def test_selection_all_and_the_fallback_when_every_val_lesion_was_used(toy_manifest, tmp_path):
    from lesiongen.classifier.config import TrainConfig
    from lesiongen.classifier.data import load_synthetic, selection_rows, training_table

    real = load_manifest(toy_manifest)
    val = real.split("val")
    everything = make_synthetic_manifest(toy_manifest, tmp_path / "all", split="val", per_class=1000)
    some = make_synthetic_manifest(toy_manifest, tmp_path / "some", split="val", per_class=1)
    lesions = val.df.groupby("group_id")["image"].count()
    used = load_manifest(some).df["group_id"].unique()
    for path, rule, expected_rows in [(some, "all", len(val)), (some, "unseen", len(val) - lesions[used].sum()),
                                      (everything, "unseen", len(val))]:
        config = TrainConfig(manifest=toy_manifest, synthetic=[path], selection=rule)
        table = training_table(real, load_synthetic([path], real), config)
        chosen = selection_rows(val, table, rule)
        assert chosen.summary["rows"] == chosen.mask.sum() == expected_rows
        assert chosen.summary["source_rows"] == (~chosen.unseen).sum() == lesions[table.rows.loc[
            table.rows["synthetic"], "group_id"].unique()].sum()
    assert chosen.summary["rule"] == "all" and "not held out" in chosen.summary["note"]
    assert TrainConfig().selection == "all"
    with pytest.raises(ValueError, match="selection must be one of"):
        TrainConfig(selection="val")


def load_manifest_path(model_dir) -> str:
    return yaml.safe_load((model_dir / "config.yaml").read_text())["manifest"]


def test_evaluate_writes_the_prediction_contract(trained, toy_manifest, tmp_path):
    out = tmp_path / "eval"
    result = cli("evaluate", "--model", trained, "--manifest", toy_manifest, "--split", "test", "--out", out,
                 "--bootstrap", "50")
    assert "balanced_accuracy" in result.output
    predictions = pd.read_csv(out / "predictions.csv", dtype={"group_id": str})
    assert list(predictions.columns) == PREDICTION_COLUMNS
    test_rows = load_manifest(toy_manifest).split("test").df
    assert predictions["image"].tolist() == test_rows["image"].tolist()
    assert predictions["label"].tolist() == test_rows["label"].tolist()
    probs = predictions[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    true = probs[np.arange(len(probs)), [CLASSES.index(c) for c in predictions["label"]]]
    assert np.allclose(predictions["loss"], -np.log(true), atol=1e-5)
    others = probs.copy()
    others[np.arange(len(probs)), [CLASSES.index(c) for c in predictions["label"]]] = -1
    assert np.allclose(predictions["margin"], true - others.max(1), atol=1e-6)
    assert (predictions["pred"] == [CLASSES[i] for i in probs.argmax(1)]).all()
    assert (predictions["correct"] == (predictions["pred"] == predictions["label"])).all()
    meta = json.loads((out / "predictions.meta.json").read_text())
    assert meta == {"manifest": str(toy_manifest), "manifest_sha256": sha256_file(toy_manifest), "split": "test",
                    "classes": CLASSES, "model": str(trained), "tta": "dihedral"}  # the model's own
    report = json.loads((out / "metrics.json").read_text())
    assert report["n_images"] == len(test_rows) and report["n_lesions"] == test_rows["group_id"].nunique()
    assert report["metrics"]["accuracy"] == pytest.approx(predictions["correct"].mean())
    low, high = report["ci95"]["balanced_accuracy"]
    assert 0 <= low <= high <= 1
    assert set(report["thresholds"]) == {k for k in report["metrics"] if k.startswith("mel_") and "val_" not in k}
    assert np.array(report["confusion_matrix"]["counts"]).sum() == len(test_rows)
    for image in ("confusion_matrix.png", "roc.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = cli("evaluate", "--model", trained, "--manifest", toy_manifest, "--out", out, expect=2)
    assert "already exists" in again.output

    single_view = tmp_path / "eval-no-tta"
    cli("evaluate", "--model", trained, "--manifest", toy_manifest, "--split", "test", "--out", single_view,
        "--bootstrap", "0", "--tta", "none")
    assert json.loads((single_view / "predictions.meta.json").read_text())["tta"] == "none"
    one_view = pd.read_csv(single_view / "predictions.csv")[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert not np.allclose(one_view, probs, atol=1e-4)  # 1 view, not the average of 8


def test_resume_from_a_mid_epoch_checkpoint_reproduces_the_uninterrupted_run(env, toy_manifest, recipe, tmp_path):
    config = tmp_path / "every4.yaml"
    config.write_text(yaml.safe_dump({**TINY_RECIPE, "checkpoint_every_steps": 4}))
    full = tmp_path / "full"
    cli("train-classifier", "--manifest", toy_manifest, "--config", config, "--out", full)
    # Pretend the run died in the second epoch, right after its first mid-epoch checkpoint.
    steps = steps_per_epoch(toy_manifest)
    mid_second_epoch = (steps // 4 + 1) * 4
    assert steps < mid_second_epoch < 2 * steps
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copy(full / "config.yaml", crashed / "config.yaml")
    shutil.copytree(full / f"checkpoint-{mid_second_epoch}", crashed / f"checkpoint-{mid_second_epoch}")
    result = cli("train-classifier", "--out", crashed, "--resume", "latest")
    assert "resumed from" in result.output
    for name in (f"checkpoint-{2 * steps}/model.safetensors", "model.safetensors"):
        a, b = load_file(full / name), load_file(crashed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    pd.testing.assert_frame_equal(pd.read_csv(full / "history.csv"), pd.read_csv(crashed / "history.csv"))
    changed = cli("train-classifier", "--out", crashed, "--resume", "latest", "--epochs", "3", expect=2)
    assert "started with another config" in changed.output and "epochs: 2 -> 3" in changed.output


def test_resume_refuses_a_manifest_whose_content_changed_under_the_same_path(env, toy_manifest, recipe, tmp_path):
    """A re-indexed manifest (another split) or a synthetic folder that grew keeps its path: the run records
    the files' hashes when it starts and a resume on other content is refused before any training. A copy of
    the run, resumed on copies of its inputs, is checked the same way and describes the files it read."""
    real = load_manifest(toy_manifest)
    manifest = tmp_path / "manifest.csv"
    write_manifest(Manifest(real.df, real.root, real.classes), manifest)
    synthetic = make_synthetic_manifest(toy_manifest, tmp_path / "synthetic", split="train", per_class=1)
    out = tmp_path / "run"
    cli("train-classifier", "--manifest", manifest, "--synthetic", synthetic, "--config", recipe, "--out", out)
    recorded = json.loads((out / "inputs.json").read_text())
    assert recorded == {"--manifest": sha256_file(manifest), "--synthetic #1": sha256_file(synthetic)}
    moved = tmp_path / "moved"  # a copy that keeps its last checkpoint: its best model is from before a resume
    shutil.copytree(out, moved / "run")
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    shutil.rmtree(last)  # as if killed before its last checkpoint
    df = real.df.copy()
    df.loc[df.index[df["split"] == "train"][:5], "split"] = "test"
    write_manifest(Manifest(df, real.root, real.classes), manifest)
    refused = cli("train-classifier", "--out", out, "--resume", "latest", expect=2)
    text = " ".join(refused.output.replace("│", " ").split())
    assert "was started from other files under the same paths (--manifest: content changed since" in text
    assert "start a new --out, or pass --overwrite" in text and not last.exists()
    write_manifest(Manifest(real.df, real.root, real.classes), manifest)  # the original content resumes
    # A copied run names its synthetic sets by their new paths (the loop does so); the check still holds.
    shutil.copytree(Path(synthetic).parent, moved / "synthetic")
    moved_synthetic = moved / "synthetic" / Path(synthetic).name
    grown = load_manifest(moved_synthetic)
    write_manifest(Manifest(pd.concat([grown.df, grown.df.head(1)]), grown.root, grown.classes), moved_synthetic)
    config = from_dict(TrainConfig, {**load_yaml(out / "config.yaml"), "synthetic": [str(moved_synthetic)]})
    with pytest.raises(InputError, match=r"other files under the same paths \(--synthetic #1: content changed"):
        train_classifier(config, moved / "run", resume="latest", overwrite=True)
    shutil.copy(synthetic, moved_synthetic)  # the same content: the copy resumes, and says what it read
    train_classifier(config, moved / "run", resume="latest", overwrite=True)
    training = json.loads((moved / "run" / "classifier.json").read_text())["training"]
    assert training["data"]["synthetic_manifests"] == [str(moved_synthetic)]
    assert training["config"]["synthetic"] == [str(moved_synthetic)] and "best_epoch" in training
    assert load_yaml(moved / "run" / "config.yaml")["synthetic"] == [str(moved_synthetic)]
    assert "resumed from" in cli("train-classifier", "--out", out, "--resume", "latest").output


def test_bad_inputs_fail_with_clear_errors(env, toy_manifest, recipe, tmp_path):
    manifest = load_manifest(toy_manifest)
    out = tmp_path / "never"
    result = cli("train-classifier", "--manifest", toy_manifest, "--config", recipe, "--arch", "resnet_9000",
                 "--out", out, expect=2)
    assert "unknown architecture 'resnet_9000'" in result.output
    wrong = tmp_path / "resnet10t.safetensors"
    save_file(timm.create_model("resnet10t").state_dict(), str(wrong))
    result = cli("train-classifier", "--manifest", toy_manifest, "--config", recipe, "--pretrained", wrong,
                 "--out", out, expect=2)
    assert "does not match architecture 'test_efficientnet'" in result.output
    no_val = tmp_path / "no-val.csv"
    write_manifest(manifest.subset(manifest.df["split"] != "val"), no_val)
    result = cli("train-classifier", "--manifest", no_val, "--config", recipe, "--out", out, expect=2)
    assert "no-val.csv has no rows in split 'val'" in result.output
    synthetic = make_synthetic_manifest(toy_manifest, tmp_path / "syn", split="train", per_class=1,
                                        labels=["scc"] * 7)
    result = cli("train-classifier", "--manifest", toy_manifest, "--synthetic", synthetic, "--config", recipe,
                 "--out", out, expect=2)
    assert "synthetic classes ['scc'] are not classes of the real manifest" in result.output
    assert not out.exists()  # refused runs leave nothing behind
    all_synthetic_test = tmp_path / "syn-test.csv"
    df = manifest.df.assign(synthetic=(manifest.df["split"] == "test").astype(int))
    write_manifest(Manifest(df, manifest.root, manifest.classes), all_synthetic_test)
    result = cli("evaluate", "--model", tmp_path, "--manifest", all_synthetic_test, "--out", tmp_path / "e", expect=2)
    assert "not a trained classifier" in result.output
    result = cli("evaluate", "--manifest", toy_manifest, expect=2)
    assert "--model" in result.output


def test_resume_from_another_trainers_checkpoint_and_a_real_manifest_as_synthetic(env, toy_manifest, recipe,
                                                                                   tmp_path):
    finetune = tmp_path / "fk" / "checkpoint-300"  # what `lesiongen finetune` leaves in a checkpoint
    finetune.mkdir(parents=True)
    (finetune / "trainer_state.json").write_text(json.dumps({"step": 300, "losses": []}))
    save_file({"x": torch.zeros(1)}, str(finetune / "trainable.safetensors"))
    out = tmp_path / "clf"
    result = cli("train-classifier", "--manifest", toy_manifest, "--config", recipe, "--out", out,
                 "--resume", finetune, expect=2)
    assert f"{finetune} is not a classifier checkpoint" in result.output
    result = cli("train-classifier", "--manifest", toy_manifest, "--synthetic", toy_manifest, "--config", recipe,
                 "--out", out, expect=2)
    assert f"{toy_manifest}: has no synthetic rows (column synthetic = 1)" in result.output
    assert not out.exists()


def test_evaluate_refuses_an_empty_split(trained, toy_manifest, tmp_path):
    manifest = load_manifest(toy_manifest)
    path = tmp_path / "syn-test.csv"
    write_manifest(Manifest(manifest.df.assign(synthetic=(manifest.df["split"] == "test").astype(int)),
                            manifest.root, manifest.classes), path)
    result = cli("evaluate", "--model", trained, "--manifest", path, "--split", "test", "--out", tmp_path / "e",
                 expect=2)
    assert "split 'test' has no real images" in result.output


def test_compare_two_models_paired(trained, toy_manifest, recipe, tmp_path):
    other = tmp_path / "other"
    cli("train-classifier", "--manifest", toy_manifest, "--config", recipe, "--epochs", "1", "--seed", "1",
        "--out", other)
    out = tmp_path / "compare"
    result = cli("evaluate", "--compare", trained, other, "--manifest", toy_manifest, "--split", "test",
                 "--bootstrap", "30", "--out", out)
    assert "McNemar" in result.output
    comparison = json.loads((out / "comparison.json").read_text())
    row = comparison["metrics"]["balanced_accuracy"]
    assert row["difference"] == pytest.approx(row["b"] - row["a"])
    a = json.loads((out / "a" / "metrics.json").read_text())["metrics"]["balanced_accuracy"]
    assert row["a"] == pytest.approx(a)
    assert {"only_a_correct", "only_b_correct", "p_value"} <= set(comparison["mcnemar"])
    # Evaluation folders compare directly, with the same numbers.
    again = cli("evaluate", "--compare", out / "a", out / "b", "--bootstrap", "30", "--out", tmp_path / "again")
    assert json.loads((tmp_path / "again" / "comparison.json").read_text())["metrics"] == comparison["metrics"]
    assert "B-A" in again.output


def test_ddp_training_on_two_cpu_processes_gathers_the_single_process_evaluation(env, toy_manifest, recipe, tmp_path):
    """`accelerate launch` with two gloo processes on the CPU, then a one-process `evaluate` of the same weights.

    accelerate 1.x runs `--cpu --num_processes 2` as ONE process unless MPI is installed; torchrun-style
    multi-process on the CPU is `--multi_gpu` with ACCELERATE_USE_CPU=true (the processes then use gloo).
    The test asserts two processes really trained. Validation uses batches of 4 over 17 images, so the
    last batches are padded with duplicates that the gather must drop.
    """
    out = tmp_path / "ddp"
    run = launch("train-classifier", "--manifest", toy_manifest, "--config", recipe, "--out", out, timeout=300)
    assert run.returncode == 0, failure(run)
    info = json.loads((out / "classifier.json").read_text())
    assert info["training"]["num_processes"] == 2 and info["training"]["effective_batch_size"] == 16
    steps = steps_per_epoch(toy_manifest, processes=2)
    assert {p.name for p in out.glob("checkpoint-*")} == {f"checkpoint-{steps}", f"checkpoint-{2 * steps}"}

    # Its first-epoch checkpoint, resumed on one process, would train another run's epochs and schedule.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("config.yaml", "inputs.json", f"checkpoint-{steps}"):
        (shutil.copytree if (out / name).is_dir() else shutil.copy)(out / name, crashed / name)
    refused = cli("train-classifier", "--out", crashed, "--resume", "latest", expect=2)
    assert f"checkpoint-{steps} was written by 2 processes, but this run has 1" in refused.output
    assert "Resume on 2 (`accelerate launch --num_processes 2 -m lesiongen ...`" in refused.output
    assert sorted(p.name for p in crashed.iterdir()) == ["checkpoint-" + str(steps), "config.yaml", "inputs.json"]

    # The same batches of 4 as the processes scored (their shards are whole batches): same arithmetic.
    cli("evaluate", "--model", out, "--manifest", toy_manifest, "--split", "val", "--bootstrap", "0",
        "--batch-size", "4", "--out", tmp_path / "single")
    gathered = pd.read_csv(out / "eval-val" / "predictions.csv")
    single = pd.read_csv(tmp_path / "single" / "predictions.csv")
    assert len(gathered) == len(load_manifest(toy_manifest).split("val")) == len(single)
    assert gathered["image"].tolist() == single["image"].tolist()
    assert (gathered["pred"] == single["pred"]).all()
    prob_columns = [f"prob_{c}" for c in CLASSES]
    assert np.allclose(gathered[prob_columns], single[prob_columns], rtol=0, atol=1e-7)
    gathered_metrics = json.loads((out / "eval-val" / "metrics.json").read_text())["metrics"]
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())["metrics"]
    assert gathered_metrics == pytest.approx(single_metrics, abs=1e-6)


def colour_manifest(folder) -> str:
    """Seven classes that differ only in hue (51 degrees apart) with noise: learnable in a few epochs."""
    import colorsys

    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for c, name in enumerate(CLASSES):
        rgb = np.array(colorsys.hsv_to_rgb(c / 7, 0.8, 0.8)) * 255
        for i in range(16):
            pixels = np.clip(rgb + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
            image = f"images/{name}-{i}.png"
            (folder / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / image)
            rows.append({"image": image, "label": name, "split": "train" if i < 12 else "val",
                         "group_id": f"{name}{i}"})
    write_manifest(Manifest(pd.DataFrame(rows), folder, CLASSES), folder / "manifest.csv")
    return str(folder / "manifest.csv")


def test_training_learns_an_easy_problem(env, recipe, tmp_path):
    """Images, labels and sampled positions stay aligned: a colour-coded problem is learned."""
    manifest = colour_manifest(tmp_path / "colours")
    out = tmp_path / "model"
    cli("train-classifier", "--manifest", manifest, "--config", recipe, "--epochs", "6", "--lr", "0.01", "--out", out)
    history = pd.read_csv(out / "history.csv")
    assert history["val_balanced_accuracy"].max() >= 0.7  # chance is 1/7
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation exists only on a GPU")
def test_a_training_step_never_waits_for_the_gpu(env, toy_manifest, tmp_path):
    """A step that blocks on the GPU (a synchronous copy, a `.item()`) stops the CPU from queueing the
    next step's kernels; the data pipeline then falls behind synthetic inputs (bench/classifier_throughput.py)."""
    import itertools

    from lesiongen.classifier.config import TrainConfig
    from lesiongen.classifier.train import ClassifierTrainer

    config = TrainConfig(manifest=str(toy_manifest), arch="test_efficientnet", pretrained="none", img_size=32,
                         load_size=32, batch_size=8, epochs=1, augment={"hue": 0.05})
    trainer = ClassifierTrainer(config, tmp_path / "run")
    trainer.setup()
    batches = iter(trainer.train_loader)
    trainer.train_step(next(batches))  # first step: cuDNN autotuning may synchronise
    torch.cuda.set_sync_debug_mode("error")
    try:
        for index in itertools.islice(batches, 3):
            trainer.train_step(index)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_evaluate_overwrite_never_deletes_a_folder_it_did_not_make(trained, toy_manifest, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels.csv").write_text("image,label\n")
    result = cli("evaluate", "--model", trained, "--manifest", toy_manifest, "--split", "val", "--bootstrap", "0",
                 "--out", data, "--overwrite", expect=2)
    assert "is not an evaluation output folder made by lesiongen (it holds images/, labels.csv)" in result.output
    assert (data / "labels.csv").is_file()
    (tmp_path / "file").write_text("x")
    result = cli("train-classifier", "--manifest", toy_manifest, "--out", tmp_path / "file", expect=2)
    assert "is a file; expected a folder" in result.output


def test_compare_checks_both_inputs_before_writing(trained, toy_manifest, tmp_path):
    out = tmp_path / "cmp"
    result = cli("evaluate", "--compare", trained, tmp_path / "nope", "--manifest", toy_manifest, "--split", "val",
                 "--bootstrap", "0", "--out", out, expect=2)
    assert "--compare B" in result.output and "nope" in result.output
    assert not out.exists()  # nothing half-written blocks the corrected rerun


def _edited_copy(evaluation: Path, to: Path, *, meta=None, edit=None) -> Path:
    shutil.copytree(evaluation, to)
    if meta is not None:
        (to / "predictions.meta.json").write_text(meta((to / "predictions.meta.json").read_text()))
    if edit is not None:
        frame = pd.read_csv(to / "predictions.csv", dtype=str)
        edit(frame).to_csv(to / "predictions.csv", index=False)
    return to


def _set(frame: pd.DataFrame, column: str, value: str, row: int = 3) -> pd.DataFrame:
    frame.loc[row, column] = value
    return frame


@pytest.mark.parametrize("case, change, message", [
    ("truncated-meta", {"meta": lambda text: text[:40]}, r"predictions\.meta\.json: not valid JSON"),
    ("no-classes", {"meta": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "classes"})},
     r"predictions\.meta\.json: missing key\(s\) \['classes'\]"),
    ("text-probability", {"edit": lambda f: _set(f, "prob_mel", "x")},
     r"predictions\.csv: column 'prob_mel' row 5: 'x' is not a number in \[0\.0, 1\.0\]"),
    ("no-image-column", {"edit": lambda f: f.drop(columns=["image"])},
     r"predictions\.csv: missing column\(s\) \['image'\]"),
    ("unknown-label", {"edit": lambda f: _set(f, "label", "melanoma")},
     r"predictions\.csv row 5: label 'melanoma' is not one of"),
    ("relabelled", {"edit": lambda f: _set(f, "label", "df" if f.loc[3, "label"] != "df" else "nv")},
     r"is labelled '\w+' in A \(.*\) but '\w+' in B \(.*relabelled\); a paired comparison needs the same labels"),
    ("missing-row", {"edit": lambda f: f.drop(index=3)},
     r"do not cover the same images: 1 \(e\.g\. '.*'\) only in A \(.*\), 0 only in B"),
])
def test_compare_checks_evaluation_folders_and_keeps_the_old_result(trained, toy_manifest, tmp_path, case, change,
                                                                    message):
    """Each malformed evaluation folder is named with its file, column or row (not a traceback, and never a
    comparison made with A's labels); the comparison it was to replace (--overwrite) is kept."""
    evaluation = tmp_path / "eval"
    cli("evaluate", "--model", trained, "--manifest", toy_manifest, "--split", "val", "--bootstrap", "0",
        "--out", evaluation)
    out = tmp_path / "cmp"
    cli("evaluate", "--compare", evaluation, evaluation, "--bootstrap", "0", "--out", out)
    before = (out / "comparison.json").read_text()
    broken = _edited_copy(evaluation, tmp_path / case, **change)
    result = cli("evaluate", "--compare", evaluation, broken, "--bootstrap", "0", "--out", out, "--overwrite",
                 expect=2)
    assert re.search(message, result.output), result.output
    assert (out / "comparison.json").read_text() == before


def test_evaluating_an_unfinished_training_run_says_so(trained, toy_manifest, tmp_path):
    from lesiongen.utils.outdir import write_marker

    killed = tmp_path / "killed"
    shutil.copytree(trained, killed)
    write_marker(killed, "classifier", complete=False)  # what a run killed mid-training leaves
    result = cli("evaluate", "--model", killed, "--manifest", toy_manifest, "--split", "val", "--bootstrap", "0",
                 "--out", tmp_path / "eval")
    assert f"WARNING: {killed} is an unfinished run" in result.output and "--resume latest" in result.output


def test_training_on_the_manifest_of_an_unfinished_generate_run_says_so(env, toy_manifest, recipe, tmp_path):
    from lesiongen.utils.outdir import write_marker

    folder = tmp_path / "killed-generate"
    synthetic = make_synthetic_manifest(toy_manifest, folder, split="train", per_class=1)
    write_marker(folder, "generation", complete=False)  # killed after a few batches: manifest.csv holds those
    result = cli("train-classifier", "--manifest", toy_manifest, "--synthetic", synthetic, "--config", recipe,
                 "--epochs", "1", "--out", tmp_path / "model")
    assert f"WARNING: {folder} is an unfinished run" in result.output
    assert "the same `lesiongen generate` command again" in result.output


def test_a_diverging_run_stops_with_the_epoch_and_keeps_what_came_before(env, toy_manifest, recipe, tmp_path):
    out = tmp_path / "clf"
    result = cli("train-classifier", "--manifest", toy_manifest, "--config", recipe, "--lr", "1e30", "--out", out,
                 expect=2)
    assert "training diverged" in result.output and "in epoch 1" in result.output
    assert "no checkpoint was saved before it" in result.output and "--lr (now 1e+30)" in result.output
    assert not out.exists()  # nothing was saved, so nothing blocks the corrected rerun
    # Diverging after a good epoch: its checkpoint and best model are kept, no checkpoint after it is made.
    cli("train-classifier", "--manifest", toy_manifest, "--config", recipe, "--out", out)
    steps = steps_per_epoch(toy_manifest)
    shutil.rmtree(out / f"checkpoint-{2 * steps}")  # as if the run had been at epoch 2 and the head then blew up
    first = out / f"checkpoint-{steps}"
    weights = load_file(first / "model.safetensors")
    weights["classifier.weight"] = torch.full_like(weights["classifier.weight"], 3e38)  # finite; the logits overflow
    save_file(weights, str(first / "model.safetensors"))
    result = cli("train-classifier", "--out", out, "--resume", "latest", expect=2)
    assert "the training loss became NaN or infinite in epoch 2" in result.output
    assert f"checkpoint-{steps} in {out} is the last checkpoint, from before it" in result.output
    assert "model.safetensors holds the best epoch so far (1)" in result.output and "--overwrite" in result.output
    assert sha256_file(out / "model.safetensors") == sha256_file(first / "best" / "model.safetensors")
    assert [p.name for p in out.glob("checkpoint-*")] == [first.name]


def test_scores_that_are_not_held_out_carry_a_leakage_warning(trained, toy_manifest, recipe, tmp_path):
    clean = cli("evaluate", "--model", trained, "--manifest", toy_manifest, "--split", "test", "--bootstrap", "0",
                "--out", tmp_path / "clean")
    assert "WARNING" not in clean.output
    assert "leakage_warnings" not in json.loads((tmp_path / "clean" / "metrics.json").read_text())
    # variants of test images in training (what test mining gives): every score of the model says so
    from_test = make_synthetic_manifest(toy_manifest, tmp_path / "syn", split="test", per_class=1)
    leaky = tmp_path / "leaky"
    ran = cli("train-classifier", "--manifest", toy_manifest, "--synthetic", from_test, "--config", recipe,
              "--epochs", "1", "--out", leaky)
    assert "LEAKAGE" not in ran.output  # by default test-split variants do not train: nothing leaks
    assert json.loads((leaky / "classifier.json").read_text())["training"]["data"]["leakage_warnings"] == []
    yaml_config = tmp_path / "all-splits.yaml"
    yaml_config.write_text(yaml.safe_dump({**TINY_RECIPE, "epochs": 1, "synthetic_splits": ["train", "val", "test"]}))
    ran = cli("train-classifier", "--manifest", toy_manifest, "--synthetic", from_test, "--config", yaml_config,
              "--out", leaky, "--overwrite")
    assert "WARNING: LEAKAGE: 7 synthetic images were made from TEST-split images" in ran.output
    warned = json.loads((leaky / "classifier.json").read_text())["training"]["data"]["leakage_warnings"]
    assert len(warned) == 1 and "made from TEST-split images" in warned[0]
    cli("evaluate", "--compare", trained, leaky, "--manifest", toy_manifest, "--split", "test", "--bootstrap", "0",
        "--out", tmp_path / "cmp")
    assert json.loads((tmp_path / "cmp" / "b" / "metrics.json").read_text())["leakage_warnings"] == warned
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["leakage_warnings"] == warned
    # the same images indexed again with another split: earlier training images are now 'test' images
    real = load_manifest(toy_manifest)
    df = real.df.copy()
    moved = df.index[df["split"] == "train"][:5]
    df.loc[moved, "split"] = "test"
    resplit = tmp_path / "resplit.csv"
    write_manifest(Manifest(df, real.root, real.classes), resplit)
    ran = cli("evaluate", "--model", trained, "--manifest", resplit, "--split", "test", "--bootstrap", "0",
              "--out", tmp_path / "resplit-eval")
    expected = f"LEAKAGE: 5 of the {int((df['split'] == 'test').sum())} 'test' images of {resplit}"
    assert expected in ran.output
    assert expected in json.loads((tmp_path / "resplit-eval" / "metrics.json").read_text())["leakage_warnings"][0]


def test_test_scores_apply_the_thresholds_validation_chose(trained, toy_manifest, tmp_path):
    val = json.loads((trained / "eval-val" / "metrics.json").read_text())
    assert "fixed_thresholds" not in val and not any("val_threshold" in k for k in val["metrics"])
    assert "selection" not in val  # every val row selected it (selection: all): the thresholds are the top-level ones
    ran = cli("evaluate", "--model", trained, "--manifest", toy_manifest, "--split", "test", "--bootstrap", "20",
              "--out", tmp_path / "test")
    report = json.loads((tmp_path / "test" / "metrics.json").read_text())
    finite = {k: v for k, v in report["fixed_thresholds"]["thresholds"].items() if v is not None}
    assert finite == pytest.approx({k: v for k, v in val["thresholds"].items() if v is not None})
    predictions = pd.read_csv(tmp_path / "test" / "predictions.csv")
    threshold = val["thresholds"]["mel_sensitivity@specificity=0.90"]  # null: only +inf reached 0.90 on val
    threshold = math.inf if threshold is None else threshold
    called, mel = predictions["prob_mel"] >= threshold, predictions["label"] == "mel"
    key = "mel_sensitivity@val_threshold(specificity=0.90)"
    assert report["metrics"][key] == pytest.approx((called & mel).sum() / mel.sum(), abs=1e-6)
    assert report["metrics"]["mel_specificity@val_threshold(specificity=0.90)"] == pytest.approx(
        (~called & ~mel).sum() / (~mel).sum(), abs=1e-6)
    assert key in report["ci95"] and key in ran.output
    # other views than the model's own (dihedral) give other probabilities: the val thresholds do not apply
    for tta, applies in (("dihedral", True), ("none", False)):
        cli("evaluate", "--model", trained, "--manifest", toy_manifest, "--split", "test", "--bootstrap", "0",
            "--tta", tta, "--out", tmp_path / tta)
        assert ("fixed_thresholds" in json.loads((tmp_path / tta / "metrics.json").read_text())) is applies
