"""Shared fixtures. Everything runs offline on CPU with the project's own toy data and tiny SD."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

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
