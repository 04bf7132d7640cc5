"""A wheel built from pyproject ships the CLI as lesiongen.cli, the prompt files, configs and the demo base."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_cli_prompts_configs_and_demo_base(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    names = zipfile.ZipFile(next(tmp_path.glob("lesiongen-*.whl"))).namelist()
    for expected in ("lesiongen/cli/app.py", "lesiongen/prompts/ham10000.yaml", "lesiongen/configs/demo.yaml",
                     "lesiongen/assets/demo-base.safetensors"):
        assert expected in names
    assert not [n for n in names if n.startswith("cli/")]  # never a top-level package named `cli`
