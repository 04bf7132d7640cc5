"""`checkpoint-N/` folders: written under a temporary name and renamed, found again by `--resume`.

A checkpoint holds accelerate's state (optimizer, LR scheduler, RNG, EMA) plus `trainable.safetensors`
(only what trains: LoRA, learned token rows, or the UNet for `full`) and `trainer_state.json`, written
last before the rename, so every `checkpoint-N` on disk is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from lesiongen.errors import InputError
from lesiongen.utils.atomic import write_json

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for path in out_dir.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(out_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """`latest` -> the newest checkpoint (None when there is none yet); a name or path must exist."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(out_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = Path(out_dir) / resume
    if not (path / STATE_FILE).is_file():
        available = [p.name for _, p in list_checkpoints(out_dir)]
        raise InputError(f"--resume {resume}: no complete checkpoint there "
                         f"(available in {out_dir}: {available or 'none'})")
    return path


def read_state(checkpoint: str | os.PathLike) -> dict:
    path = Path(checkpoint) / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable trainer state ({err})") from err


def save_checkpoint(accelerator, out_dir: str | os.PathLike, step: int, state: dict, limit: int | None) -> Path:
    """Save accelerate's state into `checkpoint-<step>` atomically, then drop the oldest beyond `limit`.

    Every process calls this (accelerate writes one RNG file per process); the main process renames.
    """
    out_dir = Path(out_dir)
    final = out_dir / f"{PREFIX}{step}"
    tmp = out_dir / f".{PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if limit is not None:
            for _, old in list_checkpoints(out_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
