"""The shared stages of a loop run on their own: the data set and the three ways to get a base."""

from __future__ import annotations

import json
from functools import partial

import pytest

from lesiongen.diffusion.loading import load_pipeline
from lesiongen.errors import TrainingDivergedError
from lesiongen.loop import stages
from lesiongen.loop.config import config_yaml, load_loop_config
from lesiongen.loop.layout import RunLayout
from lesiongen.loop.run import create_run, run_loop
from lesiongen.runs import RunDir, Stage, StageRunner

TOY = {"toy": {"n_per_class": 6, "size": 32}}


def _run_shared_stages(root, base: dict):
    config = load_loop_config(None, {"data": TOY, "base": base, "cpu_threads": 1})
    run = RunDir.create(root, config_yaml(config))
    layout = RunLayout(run.root)
    ctx = stages.StageContext(config, layout)
    runner = StageRunner(run)
    runner(Stage(layout.DATA, "data", partial(stages.prepare_data, ctx)))
    runner(Stage(layout.BASE, "base", partial(stages.prepare_base, ctx), resumable=True))
    return ctx, json.loads(layout.base_record.read_text())


def test_base_pretrained_in_the_run_is_an_ordinary_pipeline(tmp_path):
    recipe = {"preset": "tiny", "vae": {"steps": 2, "batch_size": 8}, "unet": {"steps": 2, "batch_size": 8},
              "sample_every": 0, "samples_per_class": 1, "sample_steps": 2, "checkpoint_every": 2}
    ctx, record = _run_shared_stages(tmp_path / "run", {"pretrain": recipe})
    assert record["pretrained_in_run"] and record["path"] == stages.PRETRAINED_BASE  # relative: the run may move
    base = ctx.base_path()
    assert base.startswith(str(tmp_path / "run" / "base"))
    assert not list((tmp_path / "run" / "base" / "pipeline" / "checkpoints").glob("checkpoint-*"))
    pipe = load_pipeline(base)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32


def test_a_base_diverging_in_the_run_names_its_stage_and_the_keys_to_lower(tmp_path):
    recipe = {"preset": "tiny", "vae": {"steps": 3, "batch_size": 8, "learning_rate": 1e30, "warmup_steps": 1},
              "unet": {"steps": 2, "batch_size": 8}, "log_every": 1, "sample_every": 0, "checkpoint_every": 10}
    config = load_loop_config(None, {"data": TOY, "base": {"pretrain": recipe}, "cpu_threads": 1})
    run = create_run(config, tmp_path / "run")
    with pytest.raises(TrainingDivergedError) as caught:
        run_loop(run.root, echo=lambda _: None)
    message = str(caught.value)
    assert message.startswith("stage base: training diverged: the vae loss became NaN or infinite at step 2")
    assert "start a new run with a lower rate: --set classifier.lr=" in message
    assert "base.pretrain.vae.learning_rate" in message
    assert list(RunDir.open(run.root).finished()) == ["data"]


def test_base_from_a_path_is_recorded_not_copied(tmp_path, tiny_pipeline_dir):
    ctx, record = _run_shared_stages(tmp_path / "run", {"path": str(tiny_pipeline_dir)})
    assert record["path"] == str(tiny_pipeline_dir) and not record["pretrained_in_run"]
    assert ctx.base_path() == str(tiny_pipeline_dir) and len(record["hash"]) == 64
    assert ctx.real_manifest().class_counts()["mel"] == 6


def test_base_shipped_as_an_asset_loads_offline(tmp_path):
    ctx, record = _run_shared_stages(tmp_path / "run", {"asset": "demo-base.safetensors"})
    assert record["path"].endswith("lesiongen/assets/demo-base.safetensors")
    pipe = load_pipeline(ctx.base_path())
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32  # the demo's toy images are 32 px
