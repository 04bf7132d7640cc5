"""`checkpoint-N/` folders shared by every trainer (classifier, fine-tuning, base pretraining).

N is the optimizer step. A folder counts as a checkpoint only once its `trainer_state.json` is in place,
and it is written under a hidden temporary name and renamed, so a killed run never leaves a folder
that looks complete. `--resume latest` picks the newest; only the newest `total_limit` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from lesiongen.errors import InputError
from lesiongen.utils.atomic import readable_by_umask, write_json
from lesiongen.utils.distributed import shared, together

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
PROCESSES_FILE = "processes.json"  # how many processes wrote the checkpoint
RNG_FILE = re.compile(r"^random_states_(\d+)\.pkl$")  # accelerate's, one per process (older checkpoints)
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `folder`, oldest (lowest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_step(checkpoint: str | os.PathLike) -> int:
    match = _NAME.match(Path(checkpoint).name)
    if not match:
        raise InputError(f"{checkpoint}: not a {PREFIX}N folder")
    return int(match.group(1))


def resolve_resume(folder: str | os.PathLike, resume: str | None) -> Path | None:
    """`latest` -> the newest checkpoint (None when there is none yet); otherwise a path or a name in
    `folder` that must hold a complete checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(folder)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = Path(folder) / resume
    if not (path / STATE_FILE).is_file():
        available = [p.name for p in list_checkpoints(folder)]
        raise InputError(f"--resume {resume}: no complete checkpoint there (no {STATE_FILE}); pass 'latest' or "
                         f"one of {available or f'the {PREFIX}N folders (none in {folder} yet)'}")
    return path


def read_state(checkpoint: str | os.PathLike) -> dict:
    path = Path(checkpoint) / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable trainer state ({err})") from err


def saved_process_count(checkpoint: str | os.PathLike) -> int | None:
    """How many processes wrote `checkpoint`: its `processes.json`, or for a checkpoint written before that
    file existed, the number of RNG files accelerate wrote (one per process); None when neither says."""
    checkpoint = Path(checkpoint)
    try:
        return int(json.loads((checkpoint / PROCESSES_FILE).read_text(encoding="utf-8"))["num_processes"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        pass
    ranks = [int(m.group(1)) for p in checkpoint.iterdir() if (m := RNG_FILE.match(p.name))]
    return max(ranks) + 1 if ranks else None


def check_process_count(checkpoint: str | os.PathLike, num_processes: int) -> None:
    """Refuse to resume `checkpoint` on another number of processes than wrote it.

    Each process draws its own batches, so the effective batch size (batch x processes), the steps of an
    epoch, the position a mid-epoch checkpoint skips to and the learning-rate schedule's position all
    depend on the count: resumed on another, training would silently continue as a different run (measured:
    a classifier killed at step 8 of 18 on one process and resumed on two stopped at step 12, its one-cycle
    schedule unfinished).
    """
    saved = saved_process_count(checkpoint)
    if saved is None or saved == num_processes:
        return
    how = "without `accelerate launch`, or with --num_processes 1" if saved == 1 else \
        f"`accelerate launch --num_processes {saved} -m lesiongen ...`"
    raise shared(InputError(  # every process reads the same checkpoint: the main one says it
        f"{checkpoint} was written by {saved} process{'es' if saved != 1 else ''}, but this run has "
        f"{num_processes}: the effective batch size, the data order and the learning-rate schedule depend on the "
        f"count, so training cannot continue as the same run. Resume on {saved} ({how}, same arguments), "
        "or start again with --overwrite"))


def prune_checkpoints(folder: str | os.PathLike, total_limit: int | None) -> None:
    """Delete all but the newest `total_limit` checkpoints (None keeps all)."""
    if total_limit is None:
        return
    for old in list_checkpoints(folder)[:-total_limit] if total_limit > 0 else list_checkpoints(folder):
        shutil.rmtree(old, ignore_errors=True)


def set_aside_diverged(folder: str | os.PathLike, first_bad_step: int) -> Path | None:
    """The loss of step k is computed with the weights after k - 1 updates, so when it is the first bad one,
    every checkpoint from step k - 1 on holds diverged (or diverging) weights: each is renamed
    `checkpoint-N.diverged` (kept for a look, skipped by --resume latest). Returns the newest one left."""
    kept = []
    for checkpoint in list_checkpoints(folder):
        if checkpoint_step(checkpoint) < first_bad_step - 1:
            kept.append(checkpoint)
            continue
        aside = checkpoint.with_name(checkpoint.name + ".diverged")
        shutil.rmtree(aside, ignore_errors=True)
        checkpoint.rename(aside)
    return kept[-1] if kept else None


def save_accelerate_checkpoint(accelerator, folder: str | os.PathLike, step: int, state: dict,
                               total_limit: int | None,
                               add_files: Callable[[Path], None] | None = None) -> Path:
    """Collective (every process calls it): accelerate's state (model, optimizer, scheduler, one RNG file
    per process) into a hidden folder; the main process adds `add_files(tmp)` and the trainer state,
    renames it to `checkpoint-<step>` and prunes."""
    folder = Path(folder)
    final = folder / f"{PREFIX}{step}"
    partial = folder / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    with together(accelerator):  # e.g. a full disk stops every process
        if accelerator.is_main_process:
            if add_files is not None:
                add_files(partial)
            readable_by_umask(partial)
            write_json(partial / PROCESSES_FILE, {"num_processes": accelerator.num_processes})
            write_json(partial / STATE_FILE, state)  # last: its presence marks the folder complete
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            prune_checkpoints(folder, total_limit)
    return final
