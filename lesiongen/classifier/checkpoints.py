"""`checkpoint-N/` folders (N = optimizer steps) holding accelerate's state plus the trainer's own.

Every process writes its part (model, optimizer, scheduler, its RNG state) into a hidden partial folder;
the main process then adds `trainer_state.json` and the best model so far (`best/`), and renames it, so a
folder named `checkpoint-N` is complete and self-contained. Only the newest `total_limit` are kept.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lesiongen.errors import InputError
from lesiongen.utils.atomic import write_json

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


@dataclass
class TrainerState:
    """Where training stands; restored with the checkpoint it was saved in."""

    epoch: int = 0  # the epoch in progress (0-based)
    batches_done: int = 0  # loader batches of `epoch` already trained on (per process)
    epoch_loss_sum: float = 0.0  # this process's summed training loss over those batches
    global_step: int = 0  # optimizer steps so far
    best_score: float = -math.inf  # best validation balanced accuracy
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    finished: bool = False
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)

    @classmethod
    def read(cls, checkpoint: Path) -> TrainerState:
        path = checkpoint / STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: unreadable trainer state ({err})") from err
        data["best_score"] = -math.inf if data.get("best_score") is None else data["best_score"]
        return cls(**data)

    def to_json(self) -> dict:
        data = asdict(self)
        data["best_score"] = None if math.isinf(self.best_score) else self.best_score
        return data


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def find_checkpoint(out_dir: Path, resume: str) -> Path | None:
    """`latest` -> the newest checkpoint in out_dir (None when there is none); otherwise a checkpoint path."""
    if resume == "latest":
        checkpoints = list_checkpoints(out_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise InputError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}); pass 'latest' or a "
                         f"{PREFIX}N folder")
    return path


BEST_DIR = "best"


def save_checkpoint(accelerator, out_dir: Path, state: TrainerState, total_limit: int | None,
                    best_files: list[Path] = ()) -> Path:
    """Collective: every process must call it. `best_files` (the best model so far) are copied in."""
    final = out_dir / f"{PREFIX}{state.global_step}"
    partial = out_dir / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(partial / STATE_FILE, state.to_json())
        if best_files:
            (partial / BEST_DIR).mkdir()
            for path in best_files:
                shutil.copy2(path, partial / BEST_DIR / path.name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit is not None:
            for old in list_checkpoints(out_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def restore_best(checkpoint: Path, out_dir: Path) -> None:
    """Put the checkpoint's best model back in the output folder (it may have been lost or be newer)."""
    from lesiongen.utils.atomic import atomic_path

    best = checkpoint / BEST_DIR
    if not best.is_dir():
        return
    for path in sorted(best.iterdir()):
        with atomic_path(out_dir / path.name) as tmp:
            shutil.copy2(path, tmp)
