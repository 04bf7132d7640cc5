"""`lesiongen finetune` on the real derm-dev images with the small base (slow, opt-in with -m slow)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lesiongen.cli.app import app

pytestmark = pytest.mark.slow
runner = CliRunner(env={"COLUMNS": "2000"})


def test_finetune_on_derm_dev_writes_a_per_class_validation_grid(derm_dev_dir, tmp_path):
    from PIL import Image

    from lesiongen.diffusion.build import build_pipeline

    manifest = tmp_path / "manifest.csv"
    assert runner.invoke(app, ["data", "index", derm_dev_dir, "--out", str(manifest)]).exit_code == 0
    base = tmp_path / "small-base"
    build_pipeline("small", seed=0).save_pretrained(base, safe_serialization=True)
    settings = tmp_path / "settings.yaml"
    settings.write_text("augment: []\nvalidation_steps: 4\nvalidation_images_per_class: 2\n")
    out = tmp_path / "adapter"
    result = runner.invoke(app, ["finetune", "--base", str(base), "--manifest", str(manifest), "--out", str(out),
                                 "--config", str(settings), "--steps", "6", "--batch-size", "8", "--log-every", "2"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "adapter.json").read_text())
    assert info["resolution"] == 64 and info["training"]["num_train_images"] > 8000
    grid = Image.open(out / "validation" / "step-000006.png")
    assert grid.size[1] == 7 * 64  # one row per class
    losses = json.loads((out / "train_log.json").read_text())
    assert len(losses) == 3 and all(0 < e["loss"] < 10 for e in losses)
