"""`lesiongen mine-and-generate` end to end on the tiny base and toy data, through the CLI.

The inputs are made by the project's own commands: `train-classifier` + `evaluate` give predictions.csv,
`finetune` gives the adapter. Then mine -> invert -> vary -> filter runs, and every synthetic row must
trace back to a mined real image of the same class, split and lesion.
"""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest
import torch
import yaml
from launch_support import failure, launch
from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.data.manifest import load_manifest
from lesiongen.synthesis.mining import LEAKAGE_WARNING
from lesiongen.synthesis.variants import variant_seed

runner = CliRunner()
CLASSIFIER_RECIPE = {
    "arch": "test_efficientnet", "pretrained": "none", "img_size": 32, "load_size": 40, "epochs": 1,
    "batch_size": 8, "eval_batch_size": 8, "early_stopping_patience": None, "checkpoints_total_limit": None,
    "tta": "none",
}
# Cheap settings for runs that check bookkeeping rather than reconstruction quality.
QUICK = ["--inversion-steps", "10", "--variants-per-image", "1", "--min-inversion-psnr", "0", "--batch-size", "4"]


def cli(*args, expect: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == expect, result.output + (repr(result.exception) if result.exception else "")
    return result


@pytest.fixture(scope="module")
def made(tmp_path_factory, toy_manifest, tiny_pipeline_dir):
    """A classifier, its predictions on val and test, and an adapter, all made through the CLI."""
    root = tmp_path_factory.mktemp("synthesis-inputs")
    saved = {k: os.environ.get(k) for k in ("LESIONGEN_CACHE", "OMP_NUM_THREADS")}
    os.environ.update(LESIONGEN_CACHE=str(root / "cache"), OMP_NUM_THREADS="1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; spinning threads crawl
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(CLASSIFIER_RECIPE))
    cli("train-classifier", "--manifest", toy_manifest, "--config", recipe, "--out", root / "classifier")
    for split in ("val", "test"):
        cli("evaluate", "--model", root / "classifier", "--manifest", toy_manifest, "--split", split,
            "--bootstrap", "0", "--out", root / f"eval-{split}")
    cli("finetune", "--base", tiny_pipeline_dir, "--manifest", toy_manifest, "--steps", "1", "--batch-size", "2",
        "--validate-every", "1000", "--out", root / "adapter")
    yield root
    torch.set_num_threads(threads)
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def common(made, toy_manifest, tiny_pipeline_dir, out, split="val"):
    return ["mine-and-generate", "--predictions", made / f"eval-{split}" / "predictions.csv",
            "--manifest", toy_manifest, "--base", tiny_pipeline_dir, "--out", out]


def test_mine_invert_vary_filter_traces_every_row_back(made, toy_manifest, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "hard"
    args = [*common(made, toy_manifest, tiny_pipeline_dir, out), "--adapter", made / "adapter",
            "--classifier", made / "classifier", "--max-cases", "2", "--batch-size", "1", "--inversion-steps", "50",
            "--fixed-point-iterations", "10", "--variants-per-image", "2", "--strength", "0.4", "--guidance", "2",
            "--min-label-prob", "0.05"]
    result = cli(*args)
    assert "2 hard cases inverted" in result.output

    real = load_manifest(toy_manifest).df.set_index("image")
    hard = pd.read_csv(out / "hard_cases.csv")
    predictions = pd.read_csv(made / "eval-val" / "predictions.csv").set_index("image")
    assert len(hard) == 2 and set(hard["split"]) == {"val"}
    for case in hard.itertuples():
        assert case.image in predictions.index and case.reason in ("misclassified", "low-margin", "high-loss")
        assert (case.reason == "misclassified") == (predictions.loc[case.image, "pred"] != case.label)
        # the round trip is reported per image; 50 refined steps reproduce the latent (see test_synthesis_inversion)
        assert case.latent_error < 0.05 and case.inversion_psnr > 30 and 0 < case.recon_psnr < 100
        assert (out / "reconstructions" / case.label).is_dir()

    synthetic = load_manifest(out / "manifest.csv")  # the shared loader validates the contract
    summary = json.loads((out / "summary.json").read_text())
    candidates = pd.read_csv(out / "candidates.csv")
    assert len(candidates) == 4 and summary["variants"] == 4 and summary["kept"] == len(synthetic) > 0
    assert synthetic.classes == load_manifest(toy_manifest).classes
    assert (summary["adapter_hash"] and summary["label_filter"].startswith("on")
            and summary["memorization_filter"] == "on")
    # inverted only as far as strength 0.4 of 50 steps reaches, and the round trip measured from there
    assert summary["inversion_depth"] == 20 and (synthetic.df["inversion_depth"].astype(int) == 20).all()
    mined = hard.set_index("image")
    for row in synthetic.df.itertuples():
        assert row.source_image in mined.index  # a mined image ...
        source = real.loc[row.source_image]  # ... that is a real image of the manifest
        assert (row.label, row.split, row.group_id) == (source["label"], source["split"], source["group_id"])
        assert str(row.synthetic) == "1" and row.method == "img2img" and float(row.strength) == 0.4
        assert int(row.seed) == variant_seed(0, row.source_image, int(row.variant_index))
        assert row.generator_hash == summary["generator_hash"] and row.adapter_hash == summary["adapter_hash"]
        assert float(row.p_label) >= 0.05 and (out / row.image).is_file() and row.image.startswith("images/")
    rejected = candidates[candidates["keep"] == 0]
    assert all((out / image).is_file() and image.startswith("rejected/") for image in rejected["image"])
    assert not set(rejected["image"]) & set(synthetic.df["image"])
    assert "leakage_warning" not in yaml.safe_load((out / "config.yaml").read_text())

    # Resume: a finished run redoes nothing; a lost source is made again, identically. (Batches of one:
    # CPU kernels round differently at other batch sizes, which moves a pixel by 1 at most, see
    # test_variants_depend_on_their_seed_not_on_their_batch.)
    first_manifest = (out / "manifest.csv").read_bytes()
    records = sorted((out / "records").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in records]
    cli(*args)
    assert [p.stat().st_mtime_ns for p in records] == stamps
    lost = json.loads(records[0].read_text())
    before = {v["image"]: (out / v["image"]).read_bytes() for v in lost["variants"]}
    records[0].unlink()
    for image in before:
        (out / image).unlink()
    cli(*args)
    assert {image: (out / image).read_bytes() for image in before} == before
    assert (out / "manifest.csv").read_bytes() == first_manifest
    # a run of an older version saved no setting added since (here a nested one): it resumes, redoing nothing
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["mining"]["selection_reserve"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    cli(*args)
    assert [p.stat().st_mtime_ns for p in records[1:]] == stamps[1:]

    changed = cli(*args[:-1], "0.2", expect=2)  # --min-label-prob changed
    text = " ".join(changed.output.replace("│", " ").split())
    assert "other settings (filters.min_label_prob: 0.05 -> 0.2)" in text and "--overwrite" in text


def test_test_split_mining_is_flagged_everywhere(made, toy_manifest, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "leaky"
    refused = cli(*common(made, toy_manifest, tiny_pipeline_dir, out, "test"), "--split", "test", *QUICK, expect=2)
    assert "--allow-test-mining" in refused.output and not out.exists()
    result = cli(*common(made, toy_manifest, tiny_pipeline_dir, out, "test"), "--split", "test",
                 "--allow-test-mining", "--max-cases", "2", "--no-memorization-filter", *QUICK)
    assert "LEAKAGE" in result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["leakage_warning"] == LEAKAGE_WARNING
    assert json.loads((out / "summary.json").read_text())["leakage_warning"] == LEAKAGE_WARNING
    assert json.loads((out / "manifest.meta.json").read_text())["leakage_warning"] == LEAKAGE_WARNING
    for table in ("manifest.csv", "candidates.csv", "hard_cases.csv"):
        frame = pd.read_csv(out / table)
        assert len(frame) and (frame["leakage_warning"] == LEAKAGE_WARNING).all(), table
    assert set(pd.read_csv(out / "manifest.csv")["split"]) == {"test"}


def test_failed_reconstructions_make_no_variants(made, toy_manifest, tiny_pipeline_dir, tmp_path):
    # plain DDIM inversion on the random tiny base is far off (see test_synthesis_inversion): all fail 20 dB
    out = tmp_path / "failed"
    result = cli(*common(made, toy_manifest, tiny_pipeline_dir, out), "--max-cases", "2", "--inversion-steps", "10",
                 "--inversion-depth", "full", "--no-memorization-filter")
    assert "2 failed" in result.output
    assert json.loads((out / "summary.json").read_text())["inversion_depth"] == 10  # round trip from pure noise
    hard = pd.read_csv(out / "hard_cases.csv")
    assert hard["verdict"].str.startswith("failed-reconstruction").all() and (hard["kept_variants"] == 0).all()
    assert len(pd.read_csv(out / "manifest.csv")) == 0 and not (out / "images").exists()


def test_bad_input(made, toy_manifest, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "bad"
    base = common(made, toy_manifest, tiny_pipeline_dir, out)
    for strength in ("0", "1.5", "-0.1"):
        result = cli(*base, "--strength", strength, expect=2)
        assert "--strength" in result.output and "(0, 1]" in result.output
    result = cli(*base, "--method", "img2img", "--lambda", "0.3", expect=2)
    said = " ".join(result.output.replace("│", " ").split())
    assert "--lambda: only --method embedding uses them (this run's method is img2img)" in said

    other_manifest = tmp_path / "other" / "manifest.csv"
    other_manifest.parent.mkdir()
    shutil.copy(toy_manifest, other_manifest)
    shutil.copy(toy_manifest.with_name("manifest.meta.json"), other_manifest.with_name("manifest.meta.json"))
    frame = pd.read_csv(other_manifest)
    frame.iloc[::-1].to_csv(other_manifest, index=False)  # same rows, another file
    result = cli("mine-and-generate", "--predictions", made / "eval-val" / "predictions.csv", "--manifest",
                 other_manifest, "--base", tiny_pipeline_dir, "--out", out, expect=2)
    assert "made from another manifest" in result.output and "manifest_sha256" in result.output

    from lesiongen.diffusion.build import build_pipeline

    other_base = tmp_path / "other-base"
    build_pipeline("tiny", seed=1).save_pretrained(other_base, safe_serialization=True)
    result = cli("mine-and-generate", "--predictions", made / "eval-val" / "predictions.csv", "--manifest",
                 toy_manifest, "--base", other_base, "--adapter", made / "adapter", "--out", out, *QUICK, expect=2)
    assert "was trained on another base" in result.output and str(other_base) in result.output

    empty = tmp_path / "eval-perfect" / "predictions.csv"
    empty.parent.mkdir()
    predictions = pd.read_csv(made / "eval-val" / "predictions.csv")
    probs = [c for c in predictions if c.startswith("prob_")]
    predictions[probs] = 0.01
    for i, label in enumerate(predictions["label"]):  # a perfect, confident classifier
        predictions.loc[i, f"prob_{label}"] = 0.94
    predictions = predictions.assign(pred=predictions["label"], correct=1, loss=0.062, margin=0.93)
    predictions.to_csv(empty, index=False)
    shutil.copy(made / "eval-val" / "predictions.meta.json", empty.with_name("predictions.meta.json"))
    result = cli("mine-and-generate", "--predictions", empty, "--manifest", toy_manifest, "--base",
                 tiny_pipeline_dir, "--out", out, expect=2)
    assert "Error: no hard cases" in result.output and "0 misclassified" in result.output
    assert not out.exists()
    # without --base, the adapter's own base is used (the same check then fails on the mining result)
    result = cli("mine-and-generate", "--predictions", empty, "--manifest", toy_manifest, "--adapter",
                 made / "adapter", "--out", out, expect=2)
    assert "Error: no hard cases" in result.output
    result = cli("mine-and-generate", "--predictions", empty, "--manifest", toy_manifest, "--out", out, expect=2)
    assert "--base is required (or --adapter" in result.output

    # a bad --classifier is found before --out is written, so the corrected rerun needs no --overwrite
    result = cli(*base, "--adapter", made / "adapter", "--classifier", tiny_pipeline_dir, *QUICK, expect=2)
    assert "--classifier" in result.output and "not a trained classifier" in result.output
    assert not out.exists()


def test_two_processes_make_the_same_images_as_one(made, toy_manifest, tiny_pipeline_dir, tmp_path):
    """Sharded over two gloo CPU processes (`--multi_gpu` + ACCELERATE_USE_CPU, see the classifier tests)."""
    # batches of one, so both runs compute each image alike (see the resume check above)
    args = ["--max-cases", "2", "--no-memorization-filter", "--variants-per-image", "2", "--inversion-steps", "10",
            "--min-inversion-psnr", "0", "--batch-size", "1"]
    one = tmp_path / "one"
    cli(*common(made, toy_manifest, tiny_pipeline_dir, one), *args)
    two = tmp_path / "two"
    run = launch(*common(made, toy_manifest, tiny_pipeline_dir, two), *args, timeout=300)
    assert run.returncode == 0, failure(run)
    single, sharded = pd.read_csv(one / "candidates.csv"), pd.read_csv(two / "candidates.csv")
    assert len(single) == 4 and single.equals(sharded)
    # two processes that each believed they were alone would also agree; the summary says who did the work
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    for image in single["image"]:
        assert (one / image).read_bytes() == (two / image).read_bytes()


def test_feature_cache_is_recorded_and_part_of_the_recipe(made, toy_manifest, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "cached"
    args = [*common(made, toy_manifest, tiny_pipeline_dir, out), "--max-cases", "2", "--no-memorization-filter",
            *QUICK]
    cli(*args, "--feature-cache", "2")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scheduler"].endswith("deep features recomputed every 2 steps (DeepCache)")
    assert (pd.read_csv(out / "candidates.csv")["scheduler"] == summary["scheduler"]).all()
    changed = cli(*args, "--feature-cache", "3", expect=2)  # it changes the images: not a resume
    assert "feature_cache: 2 -> 3" in changed.output

    # a run made before the setting existed (no key in its config.yaml) resumes with the default
    plain = tmp_path / "plain"
    plain_args = [*common(made, toy_manifest, tiny_pipeline_dir, plain), "--max-cases", "1",
                  "--no-memorization-filter", *QUICK]
    cli(*plain_args)
    config = yaml.safe_load((plain / "config.yaml").read_text())
    del config["feature_cache"]
    (plain / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cli(*plain_args)
    assert "feature_cache" in yaml.safe_load((plain / "config.yaml").read_text())


def test_a_resume_with_other_files_under_the_same_paths_is_refused(made, toy_manifest, tiny_pipeline_dir, tmp_path):
    """A retrained classifier, adapter or new predictions written over the old ones would mix two models'
    variants in one manifest: the run records its inputs' hashes and refuses to resume over changed files."""
    evaluation = tmp_path / "eval-val"
    shutil.copytree(made / "eval-val", evaluation)
    out = tmp_path / "run"
    args = ["mine-and-generate", "--predictions", evaluation / "predictions.csv", "--manifest", toy_manifest,
            "--base", tiny_pipeline_dir, "--out", out, "--max-cases", "1", "--no-memorization-filter", *QUICK]
    cli(*args)
    inputs = json.loads((out / "inputs.json").read_text())
    assert set(inputs) == {"base", "adapter", "classifier", "reference_classifier", "predictions", "manifest"}
    assert len(inputs["predictions"]) == 64 and inputs["adapter"] is None
    cli(*args)  # the same files: resumes (nothing left to do)
    predictions = pd.read_csv(evaluation / "predictions.csv")
    predictions.to_csv(evaluation / "predictions.csv", index=False, float_format="%.4f")  # same rows, new content
    refused = cli(*args, expect=2)
    assert "made from other files under the same paths (predictions: content changed" in refused.output
    assert json.loads((out / "inputs.json").read_text()) == inputs  # the refused call changed nothing


def test_a_record_left_half_written_by_a_kill_is_redone(made, toy_manifest, tiny_pipeline_dir, tmp_path):
    """kill -9 between writing a source's record and renaming it leaves `.NAME.XXXXXXXX.tmp.json`, empty or
    complete: the rerun neither reads it nor counts its source as done; it makes the source again."""
    out = tmp_path / "run"
    # batches of one: a source redone alone renders as it did (see test_mine_invert_vary_filter_traces_every_row_back)
    args = [*common(made, toy_manifest, tiny_pipeline_dir, out), "--max-cases", "2", "--no-memorization-filter",
            *QUICK, "--batch-size", "1"]
    cli(*args)
    first = (out / "manifest.csv").read_bytes()
    records = sorted((out / "records").glob("*.json"))
    assert len(records) == 2
    records[0].rename(records[0].with_name(f".{records[0].stem}.k3j2h1g0.tmp.json"))  # complete, not renamed
    (out / "records" / f".{records[1].stem}.a1b2c3d4.tmp.json").write_text("")  # killed mid-write
    cli(*args)
    assert sorted((out / "records").iterdir()) == records  # the source made again, the leftovers gone
    assert (out / "manifest.csv").read_bytes() == first


def test_overwrite_that_fails_on_bad_input_keeps_the_finished_run(made, toy_manifest, toy_data_dir,
                                                                   tiny_pipeline_dir, tmp_path):
    """The memorisation index reads every training image after the run has started: an unreadable one stops it,
    and the finished run that --overwrite was to replace is still there, whole."""
    out = tmp_path / "run"
    quick = ["--max-cases", "1", *QUICK]
    cli(*common(made, toy_manifest, tiny_pipeline_dir, out), "--no-memorization-filter", *quick)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    data = tmp_path / "data"  # the same manifest (same bytes, so the predictions still match it), one bad image
    shutil.copytree(toy_data_dir, data / "images-root")
    shutil.copy(toy_manifest, data / "manifest.csv")
    meta = json.loads(toy_manifest.with_name("manifest.meta.json").read_text())
    (data / "manifest.meta.json").write_text(json.dumps({**meta, "root": "images-root"}))
    train_image = load_manifest(data / "manifest.csv").split("train").image_paths()[0]
    train_image.write_bytes(b"not a png")
    predictions = ["--predictions", made / "eval-val" / "predictions.csv"]
    result = cli("mine-and-generate", *predictions, "--manifest", data / "manifest.csv", "--base", tiny_pipeline_dir,
                 "--out", out, "--overwrite", *quick, expect=2)
    assert train_image.name in result.output
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not any(p.name.endswith(".replaced") for p in tmp_path.iterdir())
