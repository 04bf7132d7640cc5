"""Shared fixtures. Everything runs offline on CPU with the project's own toy data and tiny SD."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: on a small shared CPU box, OpenMP threads spinning against other processes make
# tiny-model tests 10-25x slower (measured: a 16x16 conv 0.8 ms with 1 thread, 20 ms with 2 under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

# The tiny loop run (killed and resumed) shared by the loop, report and demo tests.
pytest_plugins = ("loop_support",)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DERM_DEV = os.path.join(ROOT, "..", "shared", "data", "derm-dev")


@pytest.fixture(scope="session")
def derm_dev_dir() -> str:
    """The real dermoscopy set beside the checkout (slow tests only); skipped where absent."""
    if not os.path.isfile(os.path.join(DERM_DEV, "labels.csv")):
        pytest.skip("../shared/data/derm-dev is not present")
    return DERM_DEV


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory):
    """A small procedural toy data set (generic labels.csv + images/), 64 px, 7 classes."""
    from lesiongen.data.toy import make_toy_dataset

    root = tmp_path_factory.mktemp("toy-data")
    make_toy_dataset(root, n_per_class=16, size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def toy_manifest(toy_data_dir, tmp_path_factory):
    """Path of a manifest.csv indexing `toy_data_dir` with a lesion-aware 70/15/15 split (seed 0)."""
    from lesiongen.data.index import index_dataset

    out = tmp_path_factory.mktemp("toy-manifest") / "manifest.csv"
    index_dataset(toy_data_dir, out=out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A random-weight tiny SD pipeline saved with save_pretrained (the folder real bases look like)."""
    from lesiongen.diffusion.build import build_pipeline

    out = tmp_path_factory.mktemp("tiny-sd")
    build_pipeline("tiny", seed=0).save_pretrained(out, safe_serialization=True)
    return out


# Settings of the shared fine-tuning run: LoRA on the UNet and the text encoder + two-vector tokens, alpha !=
# rank, checkpoints every 4 steps (the resume test continues a shorter run and compares with checkpoint-4).
FINETUNE_TEST_ARGS = ["--method", "lora+ti", "--text-encoder-lora", "--rank", "4", "--alpha", "8", "--num-vectors", "2",
                      "--steps", "24", "--batch-size", "4", "--lr", "5e-3", "--token-lr", "2e-2",
                      "--checkpoint-every", "4", "--validate-every", "12", "--log-every", "4", "--seed", "0"]


@pytest.fixture(scope="session")
def finetuned_adapter_dir(tiny_pipeline_dir, toy_manifest, tmp_path_factory):
    """An adapter folder made by `lesiongen finetune` on the tiny base and toy data (lora+ti, 24 steps)."""
    from typer.testing import CliRunner

    from lesiongen.cli.app import app

    out = tmp_path_factory.mktemp("finetuned") / "derm-tiny"
    config = out.parent / "settings.yaml"
    config.write_text("validation_steps: 2\nvalidation_images_per_class: 1\ncheckpoint_limit: null\n")
    result = CliRunner().invoke(app, ["finetune", "--base", str(tiny_pipeline_dir), "--manifest", str(toy_manifest),
                                      "--out", str(out), "--config", str(config), *FINETUNE_TEST_ARGS])
    assert result.exit_code == 0, result.output
    return out
