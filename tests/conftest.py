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
