"""`lesiongen generate`: class and free prompts -> PNGs + a manifest the classifier reads; resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from launch_support import failure, launch
from PIL import Image
from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.data.manifest import load_manifest

runner = CliRunner(env={"COLUMNS": "2000"})
QUICK = ["--steps", "2", "--guidance", "3.0"]


def generate(*args: str):
    return runner.invoke(app, ["generate", *map(str, args)])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(scope="module")
def df_images(finetuned_adapter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("generated") / "df"
    result = generate("--adapter", finetuned_adapter_dir, "--class", "df", "--n", "3", "--batch-size", "2",
                      "--out", out, *QUICK)
    assert result.exit_code == 0, result.output
    return out


def test_class_prompted_generation_writes_images_and_a_manifest_with_provenance(df_images, finetuned_adapter_dir):
    manifest = load_manifest(df_images / "manifest.csv")
    df = manifest.df
    assert len(df) == 3 and set(df["label"]) == {"df"} and set(df["split"]) == {"train"}
    assert manifest.classes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert manifest.is_synthetic.all() and df["group_id"].str.startswith("gen-").all()
    assert df["group_id"].is_unique and df["seed"].astype(int).tolist() == [0, 1, 2]
    adapter = json.loads((finetuned_adapter_dir / "adapter.json").read_text())
    assert set(df["base_hash"]) == {adapter["base_hash"]} and df["adapter_hash"].str.len().eq(64).all()
    assert df["generator_hash"].nunique() == 1
    assert set(df["prompt"]) == {"a dermoscopy image of <derm-df> dermatofibroma"}
    assert set(df["negative_prompt"]).pop().startswith("text, watermark")
    assert df[["steps", "guidance", "scheduler"]].drop_duplicates().values.tolist() == [["2", "3.0", "dpmpp"]]
    for path in manifest.image_paths():
        assert Image.open(path).size == (32, 32)


def test_rerun_fills_in_only_the_missing_images(df_images, finetuned_adapter_dir):
    kept = df_images / "images/df/df-00000.png"
    before = kept.stat().st_mtime_ns
    removed = df_images / "images/df/df-00001.png"
    original = pixels(removed)
    removed.unlink()
    result = generate("--adapter", finetuned_adapter_dir, "--class", "df", "--n", "4",
                      "--batch-size", "2", "--out", df_images, *QUICK)
    assert result.exit_code == 0, result.output
    assert kept.stat().st_mtime_ns == before
    assert np.array_equal(pixels(removed), original)  # one seeded generator per image: same image alone
    assert len(load_manifest(df_images / "manifest.csv")) == 4
    other = generate("--adapter", finetuned_adapter_dir, "--class", "df",
                     "--n", "4", "--out", df_images, "--steps", "3")
    assert other.exit_code == 2 and "steps: 2 -> 3" in other.output


def test_two_processes_render_the_same_images_as_one(df_images, finetuned_adapter_dir, tmp_path):
    """Each process renders every other image; one seeded generator per image makes the split invisible."""
    out = tmp_path / "two"
    run = launch("generate", "--adapter", finetuned_adapter_dir, "--class", "df", "--n", "3", "--batch-size", "1",
                 "--out", out, *QUICK, timeout=300)
    assert run.returncode == 0, failure(run)
    assert len(load_manifest(out / "manifest.csv")) == 3
    # Same seeds give the same images; only float rounding may differ, since the processes run one torch
    # thread (OMP_NUM_THREADS=1) and batch 1 where the reference ran in this process at batch 2.
    for index in range(3):
        name = f"images/df/df-{index:05d}.png"
        difference = np.abs(pixels(out / name) - pixels(df_images / name))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01, (name, difference.max())
    other_seed = np.abs(pixels(out / "images/df/df-00001.png") - pixels(df_images / "images/df/df-00000.png"))
    assert other_seed.mean() > 10  # the tolerance is far below what another seed changes


def test_two_processes_stop_together_when_the_main_process_refuses_out(df_images, finetuned_adapter_dir):
    """Only the main process compares --out's settings with the request (after the pipeline loads); the
    other process stops with the same error, not at the next barrier, and the message comes once."""
    import re

    before = sorted(p.name for p in df_images.rglob("*.png"))
    run = launch("generate", "--adapter", finetuned_adapter_dir, "--class", "df", "--n", "4", "--out", df_images,
                 "--steps", "3", timeout=120)
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert len(re.findall(r"^Error: .*steps: 2 -> 3", output, re.M)) == 1, failure(run)
    assert not re.search(r"\[rank\d\]: Traceback|Connection closed by peer", output), failure(run)
    assert sorted(p.name for p in df_images.rglob("*.png")) == before


def test_free_prompt_is_labelled_by_its_class_token(finetuned_adapter_dir, tmp_path):
    out = tmp_path / "free"
    result = generate("--adapter", finetuned_adapter_dir, "--prompt", "dermoscopy of <derm-vasc> on the back",
                      "--n", "2", "--out", out, "--scheduler", "euler", *QUICK)
    assert result.exit_code == 0, result.output
    df = load_manifest(out / "manifest.csv").df
    assert set(df["label"]) == {"vasc"} and set(df["scheduler"]) == {"euler"}
    unlabelled = generate("--adapter", finetuned_adapter_dir, "--prompt", "a skin lesion", "--out", tmp_path / "u")
    assert unlabelled.exit_code == 2 and "pass --class" in unlabelled.output


def test_each_class_may_have_its_own_count(finetuned_adapter_dir, tmp_path):
    out = tmp_path / "counts"
    result = generate("--adapter", finetuned_adapter_dir, "--class", "df=2", "--class", "vasc", "--n", "1",
                      "--out", out, *QUICK)
    assert result.exit_code == 0, result.output
    assert load_manifest(out / "manifest.csv").df["label"].value_counts().to_dict() == {"df": 2, "vasc": 1}
    for bad in ("df=0", "df=two"):
        refused = generate("--adapter", finetuned_adapter_dir, "--class", bad, "--out", tmp_path / "bad")
        assert refused.exit_code == 2 and f"--class {bad}: expected CLASS or CLASS=N" in refused.output
        assert not (tmp_path / "bad").exists()
    refused = generate("--adapter", finetuned_adapter_dir, "--prompt", "a lesion", "--class", "mel=3",
                       "--out", tmp_path / "bad")
    assert refused.exit_code == 2 and "with --prompt, --class is only the images' label" in refused.output
    assert "--n" in refused.output and not (tmp_path / "bad").exists()


def test_a_class_not_in_the_prompt_file_is_refused(finetuned_adapter_dir, tmp_path):
    result = generate("--adapter", finetuned_adapter_dir, "--class", "scc", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "class 'scc' is not in the prompt file" in result.output


def test_an_adapter_trained_on_another_base_is_refused(finetuned_adapter_dir, tmp_path):
    from lesiongen.diffusion.build import build_pipeline

    other_base = tmp_path / "other-base"
    build_pipeline("tiny", seed=1).save_pretrained(other_base, safe_serialization=True)
    result = generate("--adapter", finetuned_adapter_dir, "--base", other_base, "--class", "df", "--n", "1",
                      "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert "was trained on another base" in " ".join(result.output.split()) and not (tmp_path / "x").exists()


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow, id="compiled")])
def test_fast_renderer_matches_the_plain_pipeline(finetuned_adapter_dir, tiny_pipeline_dir, compile):
    """Folded LoRA, fused QKV, cached prompt states and `torch.compile` (a minute of CPU compiling, so
    opt-in) change sums' order, not the images."""
    from lesiongen.data.prompts import load_prompts
    from lesiongen.diffusion.adapters import load_adapted_pipeline
    from lesiongen.diffusion.generate import (
        GenerationSettings,
        Renderer,
        class_requests,
        optimize_for_inference,
        set_scheduler,
    )

    prompts = load_prompts("ham10000")
    requests = class_requests(prompts, {"mel": 1, "nv": 1}, seed=5)
    plain = load_adapted_pipeline(tiny_pipeline_dir, finetuned_adapter_dir)
    plain.set_progress_bar_config(disable=True)
    set_scheduler(plain, "ddim")
    expected = plain([r.prompt for r in requests], negative_prompt=[prompts.negative_prompt] * 2, num_inference_steps=3,
                     guidance_scale=5.0, generator=[torch.Generator().manual_seed(r.seed) for r in requests],
                     height=32, width=32, output_type="pt").images
    fast = optimize_for_inference(load_adapted_pipeline(tiny_pipeline_dir, finetuned_adapter_dir), compile=compile)
    fast.set_progress_bar_config(disable=True)
    set_scheduler(fast, "ddim")
    assert not getattr(fast.unet, "peft_config", None)  # LoRA folded into the weights
    assert any("to_qkv" in name for name, _ in fast.unet.named_parameters())  # fused projections
    trainable = [name for module in (fast.unet, fast.vae, fast.text_encoder)
                 for name, p in module.named_parameters() if p.requires_grad]
    assert not trainable, trainable[:3]  # null-text and embedding fits must not compute weight gradients
    renderer = Renderer(fast, GenerationSettings(steps=3, guidance=5.0, scheduler="ddim"), prompts.negative_prompt, 32)
    ours = renderer(requests).float() / 255
    assert (ours - expected).abs().max() <= 1 / 255 + 1e-3  # uint8 rounding


def test_another_request_into_a_generation_folder_is_refused(finetuned_adapter_dir, tmp_path):
    out = tmp_path / "gen"
    first = generate("--adapter", finetuned_adapter_dir, "--class", "mel=1", "--class", "df", "--n", "1",
                     "--out", out, *QUICK)
    assert first.exit_code == 0, first.output
    changed = generate("--adapter", finetuned_adapter_dir, "--class", "mel=2", "--out", out, *QUICK)
    assert changed.exit_code == 2 and "request" in changed.output and "{'mel': 1, 'df': 1}" in changed.output
    assert set(load_manifest(out / "manifest.csv").df["label"]) == {"mel", "df"}  # nothing rewritten
    data = tmp_path / "data"  # a data set's own manifest.csv is never replaced
    (data / "images").mkdir(parents=True)
    (data / "manifest.csv").write_text("image,label,split\n")
    refused = generate("--adapter", finetuned_adapter_dir, "--class", "mel=1", "--out", data, "--overwrite", *QUICK)
    assert refused.exit_code == 2 and "is not a generation output folder" in refused.output
    assert (data / "manifest.csv").read_text() == "image,label,split\n"


def test_a_wrong_out_is_refused_before_the_pipeline_loads(finetuned_adapter_dir, tmp_path, monkeypatch):
    out = tmp_path / "gen"
    first = generate("--adapter", finetuned_adapter_dir, "--class", "mel=1", "--out", out, *QUICK)
    assert first.exit_code == 0, first.output

    def no_load(**loading):
        raise AssertionError("the pipeline was loaded for a request that was going to be refused")

    monkeypatch.setattr("lesiongen.diffusion.generate.load_generator", no_load)
    fewer = generate("--adapter", finetuned_adapter_dir, "--prompt", "a photo", "--class", "mel", "--out", out)
    assert fewer.exit_code == 2 and "request" in fewer.output, fewer.output
    reseeded = generate("--adapter", finetuned_adapter_dir, "--class", "mel=1", "--seed", "7", "--out", out)
    assert reseeded.exit_code == 2 and "seed: 0 -> 7" in reseeded.output, reseeded.output
    unlabelled = generate("--adapter", finetuned_adapter_dir, "--prompt", "a photo", "--out", tmp_path / "new")
    assert unlabelled.exit_code == 2 and "cannot tell which class" in unlabelled.output
    not_ours = tmp_path / "notes"
    not_ours.mkdir()
    (not_ours / "todo.txt").write_text("mine\n")
    foreign = generate("--adapter", finetuned_adapter_dir, "--class", "mel", "--out", not_ours)
    assert foreign.exit_code == 2 and "is not a generation output folder" in foreign.output


def test_each_process_renders_its_own_shard_whatever_the_others_wrote_first(tmp_path):
    """Process 1 of 2 looks after process 0 has written its first image: it must still draw exactly its own
    images (listing the missing ones first and sharding that list would shift the shards, leaving some images
    to nobody)."""
    from types import SimpleNamespace

    from lesiongen.diffusion.generate import ImageRequest, _render, save_png

    requests = [ImageRequest("mel", "p", seed, f"images/mel/mel-{seed:05d}.png") for seed in range(6)]

    class Recording:  # a renderer that notes what it was asked to draw
        settings, negative_prompt, drawn = SimpleNamespace(batch_size=2), "", []

        def __call__(self, batch):
            self.drawn.extend(r.image for r in batch)
            return [torch.zeros(3, 8, 8, dtype=torch.uint8) for _ in batch]

    stub = Recording()
    (tmp_path / "images" / "mel").mkdir(parents=True)
    save_png(torch.zeros(3, 8, 8, dtype=torch.uint8), tmp_path / requests[0].image)  # process 0's first image
    rank1 = SimpleNamespace(process_index=1, num_processes=2, wait_for_everyone=lambda: None)
    _render(stub, requests, tmp_path, record=None, main=False, progress=False, processes=rank1, folder=None)
    assert stub.drawn == [r.image for r in requests[1::2]]
