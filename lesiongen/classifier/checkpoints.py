"""`checkpoint-N/` folders (N = optimizer steps) holding accelerate's state plus the trainer's own.

Every process writes its part (model, optimizer, scheduler, its RNG state) into a hidden partial folder;
the main process then adds `trainer_state.json` and the best model so far (`best/`), and renames it, so a
folder named `checkpoint-N` is complete and self-contained. Only the newest `total_limit` are kept.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lesiongen.errors import InputError
from lesiongen.utils.checkpoints import list_checkpoints, read_state, resolve_resume, save_accelerate_checkpoint

__all__ = ["TrainerState", "list_checkpoints", "resolve_resume", "save_checkpoint", "restore_best"]


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
        data = read_state(checkpoint)
        data["best_score"] = -math.inf if data.get("best_score") is None else data["best_score"]
        try:
            return cls(**data)
        except TypeError as err:
            raise InputError(f"{checkpoint}: not a classifier checkpoint ({err})") from err

    def to_json(self) -> dict:
        data = asdict(self)
        data["best_score"] = None if math.isinf(self.best_score) else self.best_score
        return data


BEST_DIR = "best"


def save_checkpoint(accelerator, out_dir: Path, state: TrainerState, total_limit: int | None,
                    best_files: list[Path] = ()) -> Path:
    """Collective: every process must call it. `best_files` (the best model so far) are copied in."""

    def add_best(folder: Path) -> None:
        if best_files:
            (folder / BEST_DIR).mkdir()
            for path in best_files:
                shutil.copy2(path, folder / BEST_DIR / path.name)

    return save_accelerate_checkpoint(accelerator, out_dir, state.global_step, state.to_json(), total_limit, add_best)


def restore_best(checkpoint: Path, out_dir: Path) -> None:
    """Put the checkpoint's best model back in the output folder (it may have been lost or be newer)."""
    from lesiongen.utils.atomic import atomic_path

    best = checkpoint / BEST_DIR
    if not best.is_dir():
        return
    for path in sorted(best.iterdir()):
        with atomic_path(out_dir / path.name) as tmp:
            shutil.copy2(path, tmp)
