"""`lesiongen finetune` end to end on the tiny base and toy data: outputs, loss, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from launch_support import failure, launch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from lesiongen.cli.app import app

runner = CliRunner(env={"COLUMNS": "2000"})  # rich would cut long paths in error boxes


def finetune(*args: str):
    return runner.invoke(app, ["finetune", *map(str, args)])


def test_adapter_folder_holds_every_format_with_self_describing_metadata(finetuned_adapter_dir):
    out = finetuned_adapter_dir
    info = json.loads((out / "adapter.json").read_text())
    assert info["method"] == "lora+ti" and info["steps"] == 24 and info["resolution"] == 32
    assert info["classes"]["df"] == "<derm-df>" and info["num_vectors"] == 2 and len(info["base_hash"]) == 64
    for name in ("pytorch_lora_weights.safetensors", "derm-tiny_kohya.safetensors", "learned_embeds.safetensors",
                 "embeddings/derm-vasc.safetensors", "README.md", "config.yaml", "train_log.json",
                 "validation/step-000012.png", "validation/step-000024.png"):
        assert (out / name).is_file(), name
    with safe_open(str(out / "derm-tiny_kohya.safetensors"), "pt") as f:
        header = f.metadata()
        alphas = {f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")}
    assert alphas == {8.0}  # the true alpha, not the rank diffusers' converter would write
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "8"
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert header["lesiongen.base_hash"] == info["base_hash"]
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        adapter_config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert adapter_config["unet.r"] == 4 and adapter_config["unet.lora_alpha"] == 8
    with safe_open(str(out / "embeddings/derm-vasc.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (2, 32)
        assert f.metadata()["lesiongen.token"] == "<derm-vasc>"
    card = (out / "README.md").read_text()
    assert "`<derm-df>`" in card and "load_textual_inversion" in card and "rank 4, alpha 8" in card


def test_loss_decreases_over_a_short_run(finetuned_adapter_dir):
    losses = [e["loss"] for e in json.loads((finetuned_adapter_dir / "train_log.json").read_text())]
    assert len(losses) == 6
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first - 0.03, losses


def test_resume_latest_continues_to_the_same_weights_as_an_uninterrupted_run(finetuned_adapter_dir, tmp_path):
    """Every random draw of a step is seeded by (seed, step), so stop + resume is bit-identical."""
    config = finetuned_adapter_dir / "config.yaml"
    out = tmp_path / "resumed"
    assert finetune("--config", config, "--out", out, "--steps", "2", "--checkpoint-every", "2").exit_code == 0
    refused = finetune("--config", config, "--out", out, "--steps", "4")
    assert refused.exit_code == 2 and "--resume latest" in refused.output
    result = finetune("--config", config, "--out", out, "--steps", "4", "--resume", "latest")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["step"] == 4
    resumed = load_file(out / "checkpoint-4" / "trainable.safetensors")
    uninterrupted = load_file(finetuned_adapter_dir / "checkpoint-4" / "trainable.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in resumed.items())
    changed = finetune("--out", out, "--steps", "6", "--rank", "8", "--resume", "latest")
    text = " ".join(changed.output.replace("│", " ").split())
    assert changed.exit_code == 2 and "other settings (lora.rank: 4 -> 8)" in text, text


def test_resume_refuses_a_manifest_whose_content_changed_under_the_same_path(finetuned_adapter_dir, toy_manifest,
                                                                            tmp_path):
    """The settings name the manifest by path; a re-split manifest there would continue on other images."""
    from lesiongen.data.manifest import Manifest, load_manifest, write_manifest
    from lesiongen.utils.hashing import sha256_file

    real = load_manifest(toy_manifest)
    manifest = tmp_path / "manifest.csv"
    write_manifest(Manifest(real.df, real.root, real.classes), manifest)
    config = finetuned_adapter_dir / "config.yaml"
    out = tmp_path / "run"
    first = finetune("--config", config, "--manifest", manifest, "--out", out, "--steps", "2",
                     "--checkpoint-every", "2")
    assert first.exit_code == 0, first.output
    assert json.loads((out / "inputs.json").read_text())["--manifest"] == sha256_file(manifest)
    df = real.df.copy()
    df.loc[df.index[df["split"] == "train"][:5], "split"] = "test"
    write_manifest(Manifest(df, real.root, real.classes), manifest)
    refused = finetune("--out", out, "--steps", "4", "--resume", "latest")
    text = " ".join(refused.output.replace("│", " ").split())
    assert refused.exit_code == 2 and "(--manifest: content changed since" in text, text
    assert not (out / "checkpoint-4").exists()


def test_a_base_that_is_not_a_pipeline_is_refused(toy_data_dir, toy_manifest, tmp_path):
    result = finetune("--base", toy_data_dir, "--manifest", toy_manifest, "--out", tmp_path / "x", "--steps", "1")
    assert result.exit_code == 2
    assert "not a diffusers pipeline folder" in result.output and "model_index.json" in result.output
    assert not (tmp_path / "x").exists()  # a failed start leaves nothing that blocks the corrected rerun
    (tmp_path / "file").write_text("x")
    result = finetune("--base", toy_data_dir, "--manifest", toy_manifest, "--out", tmp_path / "file", "--steps", "1")
    assert result.exit_code == 2 and "is a file; expected a folder" in result.output


def test_a_missing_image_file_names_the_manifest_row(tiny_pipeline_dir, toy_manifest, tmp_path):
    from lesiongen.data.manifest import Manifest, load_manifest, write_manifest

    manifest = load_manifest(toy_manifest)
    df = manifest.df.copy()
    i = int(df.index[df["split"] == "train"][3])
    df.loc[i, "image"] = "images/gone.png"
    broken = write_manifest(Manifest(df, manifest.root, manifest.classes), tmp_path / "broken.csv")
    result = finetune("--base", tiny_pipeline_dir, "--manifest", broken, "--out", tmp_path / "x", "--steps", "1")
    assert result.exit_code == 2, result.output
    assert f"broken.csv row {i + 2}, column 'image': image file 'images/gone.png' not found" in result.output


def test_a_class_missing_from_the_prompt_file_is_refused(tiny_pipeline_dir, toy_manifest, tmp_path):
    text = (load_prompt_text()).replace("  vasc:\n", "  vascular-unused:\n")
    prompts = tmp_path / "six.yaml"
    prompts.write_text(text)
    result = finetune("--base", tiny_pipeline_dir, "--manifest", toy_manifest, "--prompts", prompts,
                      "--out", tmp_path / "x", "--steps", "1")
    assert result.exit_code == 2
    assert "['vasc'] are not in the prompt file" in result.output and "--prompts" in result.output


def load_prompt_text() -> str:
    from lesiongen.data.prompts import builtin_prompt_file

    return builtin_prompt_file("ham10000").read_text()


def test_a_token_that_already_exists_in_the_tokenizer_is_refused(tiny_pipeline_dir, toy_manifest, tmp_path):
    from lesiongen.diffusion.loading import load_pipeline

    pipe = load_pipeline(tiny_pipeline_dir)
    pipe.tokenizer.add_tokens(["<derm-bcc>"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    pipe.save_pretrained(tmp_path / "base-with-tokens")
    result = finetune("--base", tmp_path / "base-with-tokens", "--manifest", toy_manifest, "--out", tmp_path / "x",
                      "--steps", "1")
    assert result.exit_code == 2
    assert "token '<derm-bcc>' already exists in the tokenizer" in result.output


def test_a_resolution_the_vae_cannot_take_is_refused(tiny_pipeline_dir, toy_manifest, tmp_path):
    result = finetune("--base", tiny_pipeline_dir, "--manifest", toy_manifest, "--out", tmp_path / "x",
                      "--resolution", "20", "--steps", "1")  # a multiple of the VAE x UNet 4 px, not of 8
    assert result.exit_code == 2
    assert "--resolution 20" in result.output and "multiple of 8" in result.output


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_pipeline_dir, toy_manifest,
                                                                               tmp_path):
    """Resumed at --lr 1e30 (a resumed run takes the new rate), step 3's update blows the weights up and step
    4's loss is NaN: checkpoint-3 already holds the bad weights, so checkpoint-2 is the good one; resuming from
    it at a sane rate finishes."""
    out = tmp_path / "diverged"
    common = ["--base", tiny_pipeline_dir, "--manifest", toy_manifest, "--out", out, "--method", "lora",
              "--batch-size", "2", "--checkpoint-every", "1", "--log-every", "1", "--validate-every", "0"]
    assert finetune(*common, "--lr", "1e-4", "--steps", "2").exit_code == 0
    result = finetune(*common, "--lr", "1e30", "--steps", "6", "--resume", "latest")
    assert result.exit_code == 2, result.output
    assert "training diverged: the loss became nan at step 4" in result.output
    assert "checkpoint-2 in" in result.output and "is the last good checkpoint" in result.output
    assert "Lower --lr" in result.output
    assert (out / "checkpoint-3.diverged" / "trainable.safetensors").is_file() and not (out / "checkpoint-3").exists()
    good = load_file(str(out / "checkpoint-2" / "trainable.safetensors"))
    assert all(t.abs().max() < 1e3 for t in good.values())  # the diverged update made them ~1e30
    result = finetune(*common, "--lr", "1e-4", "--steps", "6", "--resume", "latest")
    assert result.exit_code == 0, result.output
    log = json.loads((out / "train_log.json").read_text())
    assert [e["step"] for e in log][-4:] == [3, 4, 5, 6] and max(e["lr"] for e in log if e["step"] > 2) <= 1e-4


def test_a_run_diverging_before_its_first_good_checkpoint_says_to_start_again(tiny_pipeline_dir, toy_manifest,
                                                                              tmp_path):
    out = tmp_path / "diverged"
    result = finetune("--base", tiny_pipeline_dir, "--manifest", toy_manifest, "--out", out, "--method", "lora",
                      "--lr", "1e30", "--steps", "4", "--batch-size", "2", "--checkpoint-every", "1",
                      "--log-every", "1", "--validate-every", "0")
    assert result.exit_code == 2, result.output
    assert "training diverged: the loss became nan at step 2" in result.output
    assert "no checkpoint from before the divergence is left: start again with a lower --lr" in result.output
    assert not out.exists()  # nothing good to resume: the failed start leaves no folder to block the rerun


def test_two_processes_stop_together_at_a_divergence(tiny_pipeline_dir, toy_manifest, tmp_path):
    """Every process judges the losses of all of them: a process that stopped alone would leave the other
    waiting in the next gradient all-reduce. Both stop at the same step, the main one says so, and the good
    checkpoint is kept.

    On the way, a checkpoint two processes wrote is refused on one: the effective batch, each process's
    batches and the schedule's position depend on the count."""
    out = tmp_path / "diverged"
    common = ["--base", tiny_pipeline_dir, "--manifest", toy_manifest, "--out", out, "--method", "lora",
              "--batch-size", "2", "--checkpoint-every", "1", "--log-every", "1", "--validate-every", "0"]
    run = launch("finetune", *common, "--lr", "1e-4", "--steps", "2", timeout=300)
    assert run.returncode == 0, failure(run)
    before = sorted(p.name for p in out.iterdir())
    refused = finetune(*common, "--lr", "1e-4", "--steps", "4", "--resume", "latest")
    assert refused.exit_code == 2
    assert "checkpoint-2 was written by 2 processes, but this run has 1" in " ".join(refused.output.split())
    assert sorted(p.name for p in out.iterdir()) == before
    run = launch("finetune", *common, "--lr", "1e30", "--steps", "6", "--resume", "latest", timeout=300)
    assert run.returncode != 0, failure(run)
    output = run.stdout + run.stderr
    assert output.count("training diverged: the loss became nan at step 4") == 1, failure(run)  # said once
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-3.diverged").is_dir()


def test_two_processes_stop_together_when_the_main_process_refuses_out(tiny_pipeline_dir, toy_manifest, tmp_path):
    """Only the main process prepares --out. Its refusal reaches the other process, which stops with it (not
    with a gloo "Connection closed by peer" traceback at the barrier after), and the message comes once."""
    import re

    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    run = launch("finetune", "--base", tiny_pipeline_dir, "--manifest", toy_manifest, "--out", out, "--method", "lora",
                 "--steps", "2", "--batch-size", "2", "--validate-every", "0", timeout=120)
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert len(re.findall(r"^Error: .*is not a finetune output folder", output, re.M)) == 1, failure(run)
    assert not re.search(r"\[rank\d\]: Traceback|Connection closed by peer", output), failure(run)
    assert (out / "notes.txt").read_text() == "mine"


def test_bad_flag_values_are_rejected_before_any_work(tmp_path):
    result = finetune("--base", "b", "--manifest", tmp_path / "m.csv", "--method", "dreambooth")
    assert result.exit_code == 2 and "dreambooth" in result.output


def test_flags_that_would_change_nothing_are_refused(tiny_pipeline_dir, toy_manifest, tmp_path):
    import importlib.util

    out = tmp_path / "x"
    common = ["--base", tiny_pipeline_dir, "--manifest", toy_manifest, "--out", out, "--steps", "1"]
    result = finetune(*common, "--method", "ti", "--rank", "64", "--text-encoder-lora")
    assert result.exit_code == 2
    assert "--rank, --text-encoder-lora: --method ti trains no LoRA" in " ".join(result.output.split())
    result = finetune(*common, "--method", "lora", "--num-vectors", "2")
    assert result.exit_code == 2 and "--num-vectors: --method lora learns no class tokens" in " ".join(
        result.output.split())
    assert not out.exists()
    if not torch.cuda.is_available():
        result = finetune(*common, "--mixed-precision", "fp16")
        assert result.exit_code == 2 and "--mixed-precision fp16 needs a CUDA GPU" in result.output
        result = finetune(*common, "--method", "lora+ti", "--mixed-precision", "bf16")
        assert result.exit_code == 2 and "bf16 on the CPU trains only the UNet's LoRA" in result.output
    if importlib.util.find_spec("tensorboard") is None:
        result = finetune(*common, "--tensorboard")
        assert result.exit_code == 2 and "--tensorboard needs the tensorboard package" in result.output
    assert not out.exists()


@pytest.mark.parametrize("method, options", [
    ("ti", ["--grad-accum", "2", "--gradient-checkpointing", "--no-cache-latents", "--resolution", "24"]),
    ("full", ["--ema", "--noise-offset", "0.05", "--checkpoint-limit", "1"]),
])
def test_other_methods_and_options_train_and_load_back(method, options, tiny_pipeline_dir, toy_manifest, tmp_path):
    """`ti` writes only embeddings, `full` a whole pipeline; load_adapted_pipeline loads both."""
    from lesiongen.diffusion.adapters import load_adapted_pipeline

    out = tmp_path / method
    result = finetune("--base", tiny_pipeline_dir, "--manifest", toy_manifest, "--out", out, "--method", method,
                      "--steps", "2", "--batch-size", "2", "--checkpoint-every", "1", "--validate-every", "0",
                      "--config", quick_config(tmp_path), *options)
    assert result.exit_code == 0, result.output
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert (out / "pipeline" / "model_index.json").is_file() == (method == "full")
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == (["checkpoint-2"] if method == "full" else
                                                                   ["checkpoint-1", "checkpoint-2"])
    assert json.loads((out / "adapter.json").read_text())["resolution"] == (24 if method == "ti" else 32)
    pipe = load_adapted_pipeline(tiny_pipeline_dir, out)
    assert "<derm-mel>" in pipe.tokenizer.get_vocab()


def quick_config(tmp_path):
    path = tmp_path / "quick.yaml"
    path.write_text("validation_steps: 1\nvalidation_images_per_class: 1\naugment: []\n")
    return path
