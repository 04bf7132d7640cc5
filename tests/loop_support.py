"""One real, tiny loop run shared by the loop and report tests, killed with SIGKILL mid-way and resumed.

The run goes through the CLI in subprocesses (`python -m lesiongen loop ...`) on the project's toy data
(32 px) with the tiny random-weight SD pipeline as its base: every stage runs for real, only small.
Built once per test session (a session fixture, registered in conftest.py as a plugin).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

KILL_IN_STAGE = "seed-0/round-1/mined/vary"  # resumable inside (per-source records): killed part-way


def tiny_loop_config(base: Path) -> dict:
    return {
        "name": "tiny-loop-test",
        "demo": True,
        "rounds": 1,
        "seeds": [0],
        "cpu_threads": 1,
        "data": {"toy": {"n_per_class": 12, "size": 32}},
        "base": {"path": str(base)},
        "finetune": {"steps": 3, "batch_size": 4, "checkpoint_every": 2, "validate_every": 0,
                     "validation_steps": 2, "validation_images_per_class": 1},
        "classifier": {"arch": "test_efficientnet", "pretrained": "none", "img_size": 32, "epochs": 2,
                       "batch_size": 32, "tta": "none", "early_stopping_patience": None},
        "evaluate": {"bootstrap": 50},
        "mining": {"margin_threshold": 0.5, "per_class_quota": 1},
        "synthesis": {"batch_size": 1, "inversion": {"steps": 4},
                      "variants": {"per_image": 2, "strength": 0.5, "guidance": 2.0},
                      "filters": {"min_label_prob": 0.0, "min_inversion_psnr": None}},
        "generate": {"steps": 3, "guidance": 2.0, "batch_size": 8, "oversample": 1.0},
        "quality": {"inception_feature": None},
    }


@dataclass
class TinyRun:
    run_dir: Path
    config_file: Path
    killed_state: dict  # state.json's finished stages when the first process was killed
    resume_output: str  # stdout of `loop --resume` after the kill


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def lesiongen(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lesiongen", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _wait_for_first_record(records: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until the stage has finished its first source (one record per source, batch size 1), so
    the kill lands after some of the stage's files exist and before the stage is done, on any machine."""
    deadline = time.monotonic() + timeout
    while not (records.is_dir() and any(records.glob("*.json"))):
        assert proc.poll() is None, "the loop exited before the stage to kill wrote anything"
        assert time.monotonic() < deadline, f"no record in {records} after {timeout} s"
        time.sleep(0.05)


def _build(root: Path, base: Path) -> TinyRun:
    config_file = root / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_loop_config(base)))
    run_dir = root / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lesiongen", "loop", "--config", str(config_file), "--out",
                             str(run_dir), "--no-report"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"({KILL_IN_STAGE})" in line:
            stage = run_dir / KILL_IN_STAGE  # built in its `.partial` sibling until the stage is done
            _wait_for_first_record(stage.with_name(f".{stage.name}.partial") / "records", proc)
            break
    os.kill(proc.pid, signal.SIGKILL)  # without warning, part-way through the stage
    proc.wait()
    assert any(f"({KILL_IN_STAGE})" in line for line in lines), "".join(lines)
    killed_state = json.loads((run_dir / "state.json").read_text())["finished"]

    resumed = lesiongen("loop", "--resume", str(run_dir), "--no-report")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return TinyRun(run_dir, config_file, killed_state, resumed.stdout)


@pytest.fixture(scope="session")
def tiny_loop_run(tmp_path_factory, tiny_pipeline_dir) -> TinyRun:
    return _build(tmp_path_factory.mktemp("tiny-loop"), Path(tiny_pipeline_dir))
