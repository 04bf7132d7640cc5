"""`lesiongen base tiny` / `base info` through the CLI."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.diffusion.loading import load_pipeline, pipeline_hash

runner = CliRunner(env={"COLUMNS": "500"})  # rich would wrap long paths in error boxes


def test_base_tiny_then_info(tmp_path, tiny_pipeline_dir):
    out = tmp_path / "tiny-base"
    result = runner.invoke(app, ["base", "tiny", "--out", str(out), "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert (out / "model_index.json").is_file() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.rglob("*.bin"))
    # Same seed, same model: the CLI's folder hashes like the fixture's (provenance file excluded).
    assert pipeline_hash(out) == pipeline_hash(tiny_pipeline_dir)
    assert load_pipeline(out).unet.config.sample_size == 16

    result = runner.invoke(app, ["base", "info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["resolution"] == 32 and info["prediction_type"] == "epsilon"
    assert info["components"]["tokenizer"]["vocab_size"] == 49_408
    assert info["components"]["unet"]["parameters"] == sum(p.numel() for p in load_pipeline(out).unet.parameters())
    assert info["hash"] == pipeline_hash(out)
    assert info["provenance"]["preset"] == "tiny"

    table = runner.invoke(app, ["base", "info", str(out)])
    assert table.exit_code == 0 and "32 px" in table.output and info["hash"] in table.output


def test_base_tiny_refuses_to_overwrite(tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = runner.invoke(app, ["base", "tiny", "--out", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.output and "existing" in result.output
    assert (out / "keep.txt").is_file()


def test_base_tiny_bad_preset_is_named(tmp_path):
    result = runner.invoke(app, ["base", "tiny", "--out", str(tmp_path / "x"), "--preset", "huge"])
    assert result.exit_code == 2 and "huge" in result.output


def test_base_info_bad_path_exit_2(tmp_path):
    result = runner.invoke(app, ["base", "info", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "missing" in result.output and "no such file or folder" in result.output


def test_base_tiny_overwrite_replaces_only_a_base(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels.csv").write_text("image,label\n")
    result = runner.invoke(app, ["base", "tiny", "--out", str(data), "--overwrite"])
    assert result.exit_code == 2 and "is not a base model output folder" in result.output
    assert (data / "labels.csv").is_file()
