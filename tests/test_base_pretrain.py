"""`lesiongen base pretrain`: the in-house base trains, pauses, resumes exactly, and loads like SD."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import timm
import torch
from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.diffusion.loading import load_pipeline
from lesiongen.diffusion.pretrain import PretrainConfig, UnetStageConfig, VaeStageConfig, pretrain_base
from lesiongen.diffusion.pretrain import checkpoints as ckpt
from lesiongen.errors import InputError, TrainingDivergedError

runner = CliRunner(env={"COLUMNS": "500"})


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: far faster than two on a CPU shared by parallel jobs; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quick_config(**changes) -> PretrainConfig:
    config = PretrainConfig(
        preset="tiny", vae=VaeStageConfig(steps=3, batch_size=4), unet=UnetStageConfig(steps=4, batch_size=4),
        log_every=1, sample_every=2, samples_per_class=1, sample_steps=2, checkpoint_every=2,
        checkpoint_dtype="float32", checkpoints_total_limit=None)
    return dataclasses.replace(config, **changes)


def _unet_weights(folder):
    return {k: v.clone() for k, v in load_pipeline(folder).unet.state_dict().items()}


def test_pretrain_cli_pauses_resumes_and_saves_an_sd_folder(toy_manifest, tmp_path):
    out = tmp_path / "base"
    args = ["base", "pretrain", "--manifest", str(toy_manifest), "--out", str(out), "--preset", "tiny",
            "--vae-steps", "3", "--unet-steps", "4", "--vae-batch-size", "4", "--unet-batch-size", "4",
            "--sample-every", "2", "--checkpoint-every", "2", "--cpu-threads", "1"]
    result = runner.invoke(app, [*args, "--stop-after-steps", "5"])
    assert result.exit_code == 0, result.output
    assert "paused" in result.output and not (out / "model_index.json").exists()
    assert [p.name for p in ckpt.checkpoints_in(out)] == ["checkpoint-4", "checkpoint-5"]
    assert any((out / "cache").iterdir())  # the UNet stage's latents, kept for the resume
    # as if killed between checkpoint-5 and its sample grid: the resumed run draws the grid it missed
    (out / "samples" / "step-000005.png").unlink()

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output  # no silent restart over a run
    assert "--resume latest" in again.output  # it holds checkpoints

    result = runner.invoke(app, [*args, "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "finished at step 7" in result.output

    pipe = load_pipeline(out)
    image = pipe("a dermoscopy image of <derm-mel> melanoma", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    provenance = json.loads((out / "lesiongen_base.json").read_text())
    assert provenance["kind"] == "pretrained" and provenance["steps"] == {"vae": 3, "unet": 4}
    assert provenance["classes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert (out / "samples" / "final.png").is_file() and (out / "samples" / "step-000005.png").is_file()
    assert not (out / "cache").exists()  # a finished base is not resumed: its latents go
    # The data set's latent scale, not SD's 0.18215, is in the saved VAE config.
    assert pipe.vae.config.scaling_factor == pytest.approx(provenance["latent_scaling_factor"])
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)

    finished = runner.invoke(app, args)
    assert finished.exit_code == 2 and "it holds a finished base: pass --overwrite" in finished.output
    info = runner.invoke(app, ["base", "info", str(out), "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["provenance"]["kind"] == "pretrained"


def test_resume_reproduces_an_uninterrupted_run(toy_manifest, tmp_path):
    config = quick_config(unet=UnetStageConfig(steps=4, batch_size=4, class_balance=1.0))  # seeded weighted draws
    pretrain_base(toy_manifest, tmp_path / "straight", config=config, log=lambda _: None)
    paused = pretrain_base(toy_manifest, tmp_path / "chained", config=config, stop_after_steps=2, log=lambda _: None)
    assert not paused.finished and paused.global_step == 2  # inside the VAE stage
    paused = pretrain_base(toy_manifest, tmp_path / "chained", config=config, resume="latest", stop_after_steps=3,
                           log=lambda _: None)
    assert not paused.finished and paused.global_step == 5  # inside the UNet stage
    done = pretrain_base(toy_manifest, tmp_path / "chained", config=config, resume="latest", log=lambda _: None)
    assert done.finished and done.global_step == 7
    straight, chained = _unet_weights(tmp_path / "straight"), _unet_weights(tmp_path / "chained")
    assert all(torch.equal(straight[k], chained[k]) for k in straight)
    assert load_pipeline(tmp_path / "chained").vae.config.scaling_factor == pytest.approx(
        load_pipeline(tmp_path / "straight").vae.config.scaling_factor)


def test_fp16_shards_without_optimizer_still_resume(toy_manifest, tmp_path):
    config = quick_config(checkpoint_dtype="float16", save_optimizer=False, max_shard_mib=1, max_shards=8)
    pretrain_base(toy_manifest, tmp_path / "run", config=config, stop_after_steps=4, log=lambda _: None)
    checkpoint = ckpt.checkpoints_in(tmp_path / "run")[-1]
    shards = sorted(checkpoint.glob("weights-*.safetensors"))
    assert 1 < len(shards) <= 8 and all(s.stat().st_size <= 1 << 20 for s in shards)
    assert not (checkpoint / ckpt.OPTIMIZER_FILE).exists()
    tensors = ckpt.load_checkpoint_tensors(checkpoint)
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
    assert any(k.startswith("ema_unet.") for k in tensors)
    done = pretrain_base(toy_manifest, tmp_path / "run", config=config, resume="latest", log=lambda _: None)
    assert done.finished and (tmp_path / "run" / "model_index.json").is_file()


def test_resume_refuses_a_changed_recipe(toy_manifest, tmp_path):
    config = quick_config()
    pretrain_base(toy_manifest, tmp_path / "run", config=config, stop_after_steps=2, log=lambda _: None)
    changed = dataclasses.replace(config, unet=dataclasses.replace(config.unet, noise_schedule="cosine"))
    with pytest.raises(InputError, match=r"unet\.noise_schedule: 'zero_snr' -> 'cosine'"):
        pretrain_base(toy_manifest, tmp_path / "run", config=changed, resume="latest", log=lambda _: None)


def test_a_diverging_run_saves_nothing_bad_and_resumes_from_the_last_good_checkpoint_at_a_lower_rate(
        toy_manifest, tmp_path):
    """Resumed from checkpoint-2 at a VAE rate of 1e30, step 3's update blows the weights up (checkpoint-3 is
    still finite) and step 4's loss is infinite. Logging is off at these steps: the check before every save
    finds it, writes no checkpoint-4, sets checkpoint-3 aside and names checkpoint-2, from which a resume
    with a lower rate (a change a resume accepts) finishes."""
    out = tmp_path / "base"
    args = ["base", "pretrain", "--manifest", str(toy_manifest), "--out", str(out), "--preset", "tiny",
            "--vae-steps", "5", "--unet-steps", "2", "--vae-batch-size", "4", "--unet-batch-size", "4",
            "--sample-every", "0", "--cpu-threads", "1"]
    assert runner.invoke(app, [*args, "--checkpoint-every", "2", "--stop-after-steps", "2"]).exit_code == 0
    hot, sane = tmp_path / "hot.yaml", tmp_path / "sane.yaml"
    hot.write_text("vae:\n  learning_rate: 1.0e+30\n")
    sane.write_text("vae:\n  learning_rate: 1.0e-3\n")

    result = runner.invoke(app, [*args, "--checkpoint-every", "1", "--config", str(hot), "--resume", "latest"])
    assert result.exit_code == 2, result.output
    assert "training diverged: the vae loss became NaN or infinite at step 4" in result.output
    assert "checkpoint-2 in" in result.output and "is the last good checkpoint" in result.output
    assert "Lower vae.learning_rate (now 1e+30)" in result.output and "--resume latest" in result.output
    assert [p.name for p in ckpt.checkpoints_in(out)] == ["checkpoint-2"]
    assert (out / ckpt.CHECKPOINTS_DIR / "checkpoint-3.diverged").is_dir()

    result = runner.invoke(app, [*args, "--config", str(sane), "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "checkpoint-2" in result.output and "finished at step 7" in result.output
    assert all(t.isfinite().all() for t in _unet_weights(out).values())
    assert all(t.isfinite().all() for t in load_pipeline(out).vae.state_dict().values())


def test_a_run_diverging_before_its_first_checkpoint_leaves_no_folder(toy_manifest, tmp_path):
    config = quick_config(vae=VaeStageConfig(steps=3, batch_size=4, learning_rate=1e30, warmup_steps=1))
    with pytest.raises(TrainingDivergedError, match="no checkpoint from before it is left") as caught:
        pretrain_base(toy_manifest, tmp_path / "run", config=config, log=lambda _: None)
    assert "the vae loss became NaN or infinite at step 2" in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_progress_metrics_and_perceptual_term_use_a_classifier(toy_manifest, tmp_path):
    """A `train-classifier`-format folder judges the sample grids (class fidelity, domain distance) and
    lends its features to the VAE's perceptual term."""
    from lesiongen.classifier.models import ClassifierInfo, create_classifier, save_classifier
    from lesiongen.data.manifest import load_manifest

    model = create_classifier("test_efficientnet", 7)
    info = ClassifierInfo("test_efficientnet", load_manifest(toy_manifest).classes, 32, (0.5,) * 3, (0.5,) * 3,
                          num_features=model.num_features, tta="none")
    classifier = save_classifier(model, info, tmp_path / "classifier")
    config = quick_config(eval_classifier=str(classifier), samples_per_class=2,
                          vae=VaeStageConfig(steps=2, batch_size=4, perceptual_weight=0.1,
                                             perceptual_classifier=str(classifier)))
    result = pretrain_base(toy_manifest, tmp_path / "run", config=config, log=lambda _: None)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert [e["global_step"] for e in evals] == [4, 6, 6]  # every 2 UNet steps, then the final grid
    fidelity = result.metrics["class_fidelity"]
    assert 0.0 <= fidelity["overall"] <= 1.0 and set(fidelity["per_class"]) == set(info.classes)
    assert "domain_distance" in result.metrics  # None with a note when there are too few samples for FID
    provenance = json.loads((tmp_path / "run" / "lesiongen_base.json").read_text())
    assert provenance["final_samples"]["class_fidelity"] == fidelity
    # the finished VAE judged once, on the held-out validation images' round trips
    vae_evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                 if '"vae_eval"' in line]
    assert len(vae_evals) == 1 and vae_evals[0]["split"] == "val" and vae_evals[0]["global_step"] == 2
    assert set(vae_evals[0]["round_trip"]["per_class"]) == set(info.classes) and vae_evals[0]["rmse"] > 0


class _PixelVae(torch.nn.Module):
    """An autoencoder whose latents are the pixels, optionally blanked on the way back."""

    def __init__(self, blank: bool) -> None:
        super().__init__()
        self.blank = blank
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device and a dtype
        self.config = SimpleNamespace(scaling_factor=1.0)

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z, return_dict=True):
        out = torch.zeros_like(z) if self.blank else z
        return SimpleNamespace(sample=out) if return_dict else (out,)


def test_vae_class_evidence_is_judged_on_the_round_trips(toy_manifest, tmp_path):
    from lesiongen.classifier.models import ClassifierInfo, save_classifier
    from lesiongen.diffusion.pretrain.data import load_class_images
    from lesiongen.diffusion.pretrain.evaluation import SampleJudge

    held_out = load_class_images(toy_manifest, "val", 32)
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=len(held_out.classes))
    info = ClassifierInfo("test_efficientnet", held_out.classes, 32, (0.5,) * 3, (0.5,) * 3,
                          num_features=model.num_features, tta="none")
    judge = SampleJudge(save_classifier(model, info, tmp_path / "judge"), held_out.images, held_out.classes,
                        torch.device("cpu"))
    exact = judge.reconstruction(_PixelVae(blank=False), held_out.images, held_out.labels)
    assert exact["rmse"] == 0 and exact["round_trip"] == exact["original"]
    blank = judge.reconstruction(_PixelVae(blank=True), held_out.images, held_out.labels)
    # one grey image for all: the judge gives every round trip the same class, so one class is all right
    assert blank["rmse"] > 10 and blank["original"] == exact["original"]
    assert sorted(blank["round_trip"]["per_class"].values())[-2:] == [0.0, 1.0]


def test_stage_fitter_plans_the_steps_that_fit_from_the_measured_speed(monkeypatch):
    from lesiongen.diffusion.pretrain.budget import StageFitter

    clock = iter(float(t) for t in range(10_000))  # every reading of the clock is one second later
    monkeypatch.setattr(StageFitter, "_now", lambda self: next(clock))
    fitter = StageFitter(max_steps=1_000, seconds_left=100.0, device=torch.device("cpu"), warmup_steps=2,
                         timed_steps=4)  # made at t=0
    plans = [fitter.observe(step) for step in range(1, 7)]  # reads the clock at step 2 (t=1) and step 6 (t=2)
    # 4 steps took 1 s; 98 s are left at step 6: 392 more steps
    assert plans == [None] * 5 + [6 + 392]
    short = StageFitter(max_steps=50, seconds_left=100.0, device=torch.device("cpu"), warmup_steps=0, timed_steps=1)
    assert short.observe(0) is None and short.observe(1) == 50  # never past the configured steps
    spent = StageFitter(max_steps=50, seconds_left=-3.0, device=torch.device("cpu"))
    assert spent.observe(7) == 7  # the budget was gone before the stage began


def test_time_budget_plans_each_stage_once_and_a_resume_keeps_the_plan(toy_manifest, tmp_path):
    out = tmp_path / "base"
    args = ["base", "pretrain", "--manifest", str(toy_manifest), "--out", str(out), "--preset", "tiny",
            "--vae-steps", "100000", "--unet-steps", "100000", "--vae-batch-size", "4", "--unet-batch-size", "4",
            "--sample-every", "0", "--checkpoint-every", "1000", "--cpu-threads", "1"]
    result = runner.invoke(app, [*args, "--time-budget", "0.1", "--stop-after-steps", "35"])
    assert result.exit_code == 0, result.output
    assert "time budget: vae planned at" in result.output
    paused = ckpt.TrainerState.read(ckpt.checkpoints_in(out)[-1])
    vae_steps = paused.planned_steps["vae"]
    assert 30 <= vae_steps < 100_000 and paused.elapsed_s > 0
    # a new budget on resume (allowed) leaves the planned VAE alone; the UNet gets planned from it
    result = runner.invoke(app, [*args, "--time-budget", "0.2", "--resume", "latest"])
    assert result.exit_code == 0, result.output
    provenance = json.loads((out / "lesiongen_base.json").read_text())
    assert provenance["steps"]["vae"] == vae_steps
    assert 1 <= provenance["steps"]["unet"] < 100_000
    assert f"finished at step {vae_steps + provenance['steps']['unet']}" in result.output
    assert 0 < provenance["training_minutes"]
    # both stages are planned now: another budget or step count could not take effect, so it is refused
    resumed = runner.invoke(app, [*args, "--time-budget", "0.5", "--resume", "latest"])
    assert resumed.exit_code == 2, resumed.output
    assert "already fitted its steps to the time budget" in resumed.output
    assert "time_budget_minutes: 0.2 -> 0.5 would not take effect" in " ".join(resumed.output.split())
    with pytest.raises(ValueError, match="time_budget_minutes must be > 0"):
        PretrainConfig(time_budget_minutes=0)


def test_checkpoint_size_limit_is_checked_before_training():
    with pytest.raises(InputError, match=r"max_shards=8 x max_shard_mib=16"):
        ckpt.check_checkpoint_size(100_000_000, torch.float16, max_shard_mib=16, max_shards=8)
    ckpt.check_checkpoint_size(60_000_000, torch.float16, max_shard_mib=16, max_shards=8)
    shards = ckpt.plan_shards({"a": torch.zeros(300), "b": torch.zeros(300), "c": torch.zeros(600)}, 2400)
    assert shards == [["a", "b"], ["c"]]
    big = {"w": torch.arange(1000.0).view(100, 10), "b": torch.ones(3)}
    pieces = ckpt.split_large(big, 1000)
    assert len(pieces) == 5 and all(t.numel() * 4 <= 1000 for t in pieces.values())
    joined = ckpt.join_pieces(pieces)
    assert joined.keys() == big.keys() and all(torch.equal(joined[k], big[k]) for k in big)


def test_missing_class_in_split_is_named(toy_manifest, tmp_path):
    from lesiongen.data.manifest import load_manifest, write_manifest

    manifest = load_manifest(toy_manifest)
    no_df = manifest.subset(~((manifest.df["label"] == "df") & (manifest.df["split"] == "train")))
    path = write_manifest(no_df, tmp_path / "no-df.csv")
    with pytest.raises(InputError, match=r"no-df\.csv: split 'train' has no real images of class\(es\) \['df'\]"):
        pretrain_base(path, tmp_path / "run", config=quick_config(), log=lambda _: None)
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing that blocks the corrected rerun


def test_eval_classifier_is_checked_before_training(toy_manifest, tmp_path, tiny_pipeline_dir):
    with pytest.raises(InputError, match=r"--eval-classifier: .*not a trained classifier \(no classifier.json\)"):
        pretrain_base(toy_manifest, tmp_path / "run", config=quick_config(eval_classifier=str(tiny_pipeline_dir)),
                      log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_prompt_file_must_cover_the_classes(toy_manifest, tmp_path):
    prompts = tmp_path / "two.yaml"
    prompts.write_text("classes:\n  mel: {name: melanoma, token: '<m>', init_words: [melanoma]}\n"
                       "  nv: {name: nevus, token: '<n>', init_words: [mole]}\n")
    with pytest.raises(InputError, match=r"classes \['akiec', 'bcc', 'bkl', 'df', 'vasc'\] have no entry"):
        pretrain_base(toy_manifest, tmp_path / "run", config=quick_config(prompts=str(prompts)), log=lambda _: None)


def test_bad_recipe_values_are_named(tmp_path, toy_manifest):
    result = runner.invoke(app, ["base", "pretrain", "--manifest", str(toy_manifest), "--out", str(tmp_path / "x"),
                                 "--preset", "huge"])
    assert result.exit_code == 2 and "huge" in result.output
    config = tmp_path / "recipe.yaml"
    config.write_text("unet:\n  caption_dropout: 1.5\n")
    result = runner.invoke(app, ["base", "pretrain", "--manifest", str(toy_manifest), "--out", str(tmp_path / "x"),
                                 "--config", str(config)])
    assert result.exit_code == 2 and "unet" in result.output and "caption_dropout" in result.output


def test_bad_device_is_named(tmp_path, toy_manifest, monkeypatch):
    result = runner.invoke(app, ["base", "pretrain", "--manifest", str(toy_manifest), "--out", str(tmp_path / "x"),
                                 "--preset", "tiny", "--device", "tpu"])
    assert result.exit_code == 2, result.output
    assert "--device tpu: expected auto, cpu, cuda or cuda:N" in result.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="--device cuda: no CUDA GPU is visible"):
        pretrain_base(toy_manifest, tmp_path / "y", config=quick_config(device="cuda"), log=lambda _: None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_class_balance_evens_out_the_classes_drawn():
    from lesiongen.diffusion.pretrain.latents import LatentSet

    labels = torch.tensor([0] * 90 + [1] * 10)
    latents = LatentSet(torch.zeros(100, 4, 2, 2), torch.ones(100, 4, 2, 2), labels)

    def share_of_the_rare_class(balance: float) -> float:
        index = latents.draw(20_000, latents.row_weights(balance), torch.Generator().manual_seed(0))
        return float((labels[index] == 1).float().mean())

    assert share_of_the_rare_class(0.0) == pytest.approx(0.10, abs=0.01)  # as in the data
    assert share_of_the_rare_class(0.5) == pytest.approx(0.25, abs=0.015)  # sqrt(10) / (sqrt(90) + sqrt(10))
    assert share_of_the_rare_class(1.0) == pytest.approx(0.50, abs=0.015)
    with pytest.raises(ValueError, match=r"unet\.class_balance must be in \[0, 1\]"):
        UnetStageConfig(class_balance=1.5)


def test_min_snr_weights_and_schedule():
    from diffusers import DDIMScheduler
    from diffusers.training_utils import compute_snr

    from lesiongen.diffusion.pretrain.objectives import loss_weights, lr_at

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 500, 999])
    snr = compute_snr(scheduler, t)
    expected = torch.stack([snr, 5 * torch.ones_like(snr)]).min(dim=0).values
    assert torch.allclose(loss_weights(scheduler.alphas_cumprod, t, "epsilon", 5.0), expected / snr)
    assert torch.allclose(loss_weights(scheduler.alphas_cumprod, t, "v_prediction", 5.0), expected / (snr + 1))
    assert torch.equal(loss_weights(scheduler.alphas_cumprod, t, "epsilon", None), torch.ones(4))
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1) and lr_at(99, 100, 1.0, 10) == pytest.approx(0.1, abs=1e-3)


@pytest.mark.slow
def test_pretrained_tiny_base_is_class_dependent(tmp_path):
    """~10 CPU minutes: a tiny base pretrained on toy data draws each class recognisably (class fidelity,
    judged by a probe CNN trained on the real toy images, far above the 1/7 chance level; measured 0.64
    at 2,000 UNet steps, bench/RESULTS.md)."""
    from lesiongen.data.index import index_dataset
    from lesiongen.data.prompts import load_prompts
    from lesiongen.data.toy import make_toy_dataset
    from lesiongen.diffusion.pretrain.data import load_class_images
    from lesiongen.diffusion.pretrain.probe import train_probe

    data = make_toy_dataset(tmp_path / "toy", n_per_class=32, size=64, seed=0)
    manifest = tmp_path / "manifest.csv"
    index_dataset(data, out=manifest, seed=0)
    config = quick_config(vae=VaeStageConfig(steps=800, batch_size=16, learning_rate=2e-3),
                          unet=UnetStageConfig(steps=2000, batch_size=16, learning_rate=2e-3, warmup_steps=20),
                          log_every=500, sample_every=0, checkpoint_every=1000, guidance_scale=4.0)
    pretrain_base(manifest, tmp_path / "base", config=config, log=lambda _: None)

    train = load_class_images(manifest, "train", 64)
    probe = train_probe(train.images, train.labels, len(train.classes), steps=600)
    pipe = load_pipeline(tmp_path / "base")
    pipe.set_progress_bar_config(disable=True)
    prompts = load_prompts("ham10000")
    images, labels = [], []
    for label, name in enumerate(train.classes):
        generators = [torch.Generator().manual_seed(100 * label + i) for i in range(16)]
        out = pipe([prompts.class_prompt(name)] * 16, num_inference_steps=25, guidance_scale=4.0,
                   generator=generators, output_type="pt").images
        images.append((out * 255).round().to(torch.uint8))
        labels += [label] * 16
    fidelity = probe.class_fidelity(torch.cat(images), torch.tensor(labels))["overall"]
    assert fidelity > 0.3, fidelity  # chance is 1/7 = 0.143


def test_a_resume_says_which_values_a_repeated_config_changes(tmp_path):
    from lesiongen.config import save_config
    from lesiongen.diffusion.pretrain.run import resolve_config

    out = tmp_path / "run"
    out.mkdir()
    save_config(quick_config(), out / "config.yaml")  # the first job: --unet-steps 4 over a YAML with 9
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("preset: tiny\nunet:\n  steps: 9\n")
    said: list[str] = []
    config = resolve_config(recipe, {"log_every": 5}, out, "latest", log=said.append)
    assert config.unet.steps == 9 and config.log_every == 5
    assert said == [
        f"resume: log_every changes from 1 (in {out / 'config.yaml'}) to 5 (from a flag)",
        f"resume: unet.steps changes from 4 (in {out / 'config.yaml'}) to 9 (from --config {recipe}; repeat the "
        "first job's flag to keep it)"]
    said.clear()
    resolve_config(None, {}, out, "latest", log=said.append)
    assert said == []


def test_a_run_killed_once_its_latents_are_cached_resumes_to_the_same_base(toy_manifest, tmp_path, monkeypatch):
    """The resumed run reads the latents back from the cache the killed one wrote; the latent scale (and so
    every UNet weight) must not depend on which of the two computed it. (A float32 sum differed in its last
    bit between the two on 56 toy images after 20 VAE steps; these smaller runs happen to agree either way.)"""
    from lesiongen.diffusion.pretrain.trainer import CACHE_DIR, Pretrainer

    config = quick_config()
    pretrain_base(toy_manifest, tmp_path / "straight", config=config, log=lambda _: None)

    class Killed(Exception):
        pass

    def killed(self, should_pause):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(Pretrainer, "_train_unet", killed)
        with pytest.raises(Killed):
            pretrain_base(toy_manifest, tmp_path / "killed", config=config, log=lambda _: None)
    assert any((tmp_path / "killed" / CACHE_DIR).glob("latents-*.safetensors"))
    done = pretrain_base(toy_manifest, tmp_path / "killed", config=config, resume="latest", log=lambda _: None)
    assert done.finished
    straight, resumed = load_pipeline(tmp_path / "straight"), load_pipeline(tmp_path / "killed")
    assert resumed.vae.config.scaling_factor == straight.vae.config.scaling_factor
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_manifest_whose_content_changed(toy_manifest, tmp_path):
    from lesiongen.data.manifest import Manifest, load_manifest, write_manifest

    real = load_manifest(toy_manifest)
    manifest = tmp_path / "manifest.csv"
    write_manifest(Manifest(real.df, real.root, real.classes), manifest)
    pretrain_base(manifest, tmp_path / "run", config=quick_config(), stop_after_steps=2, log=lambda _: None)
    write_manifest(Manifest(real.df.iloc[:-3], real.root, real.classes), manifest)
    with pytest.raises(InputError, match=r"other files under the same paths \(--manifest: content changed"):
        pretrain_base(manifest, tmp_path / "run", config=quick_config(), resume="latest", log=lambda _: None)
