"""Launching `lesiongen` on two real CPU processes with `accelerate launch` (gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

# accelerate 1.x runs `--cpu --num_processes 2` as ONE process unless MPI is installed; torchrun-style
# CPU processes are `--multi_gpu` with ACCELERATE_USE_CPU=true.
ENVIRONMENT = {"ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(*args, processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch -m lesiongen ARGS` on `processes` CPU processes; returns the finished process."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "lesiongen", *map(str, args)]
    return subprocess.run(command, env={**os.environ, **ENVIRONMENT}, capture_output=True, text=True,
                          timeout=timeout)


def failure(run: subprocess.CompletedProcess) -> str:
    """The ends of a failed launch's output, for an assertion message."""
    return run.stdout[-3000:] + run.stderr[-3000:]
