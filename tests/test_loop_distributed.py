"""The loop's per-seed stages under `accelerate launch` with two CPU processes (gloo): the run that the
shared tiny run's data, base and adapter start is finished by two processes, every classifier is
trained by both, and the stage records are written once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

from lesiongen.runs import RunDir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_per_seed_stages_run_on_two_processes(tiny_loop_run, tmp_path):
    source = tiny_loop_run.run_dir
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("seed-*", "report*", "metrics.json"))
    run = RunDir.open(run_dir)
    run.forget([name for name in run.finished() if name.startswith("seed-")])
    assert list(run.finished()) == ["data", "base", "finetune"]

    # accelerate 1.x runs `--cpu --num_processes 2` as one process; torchrun-style CPU processes are
    # `--multi_gpu` with ACCELERATE_USE_CPU (gloo).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "lesiongen", "loop", "--resume", str(run_dir)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    finished = run.finished()
    assert set(finished) == set(json.loads((source / "state.json").read_text())["finished"])
    assert done.stdout.count("all ") == 1 and done.stdout.count("[1") >= 1  # one progress display (main only)
    for info_file in run_dir.glob("seed-0/round-*/*/train/classifier.json"):
        assert json.loads(info_file.read_text())["training"]["num_processes"] == 2, info_file
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert all(m["test"] and m["test"]["n_images"] > 0 for m in summary["models"])
    # the sharded stages' outputs are complete: every mined source has its record and variants
    vary = run_dir / "seed-0/round-1/mined/vary"
    assert len(list((vary / "records").glob("*.json"))) == finished["seed-0/round-1/mined/vary"]["summary"]["sources"]
    assert (run_dir / "report.html").is_file()
