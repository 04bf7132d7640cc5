"""`checkpoint-N/` folders (N = optimizer steps) holding accelerate's state plus the trainer's own.

Every process writes its part (model, optimizer, scheduler, its RNG state) into a hidden partial folder;
the main process then adds `trainer_state.json` and the best model so far (`best/`), and renames it, so a
folder named `checkpoint-N` is complete and self-contained. Only the newest `total_limit` are kept.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lesiongen.errors import InputError
from lesiongen.utils.checkpoints import list_checkpoints, read_state, resolve_resume, save_accelerate_checkpoint

__all__ = ["TrainerState", "check_checkpoint", "list_checkpoints", "resolve_resume", "save_checkpoint", "restore_best"]


@dataclass
class TrainerState:
    """Where training stands; restored with the checkpoint it was saved in."""

    epoch: int = 0  # the epoch in progress (0-based)
    batches_done: int = 0  # loader batches of `epoch` already trained on (per process)
    epoch_loss_sum: float = 0.0  # this process's summed training loss over those batches
    global_step: int = 0  # optimizer steps so far
    best_score: float = -math.inf  # best validation balanced accuracy
    best_loss: float = math.inf  # the best epoch's validation loss: breaks ties of the score
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    finished: bool = False
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)

    @classmethod
    def read(cls, checkpoint: Path) -> TrainerState:
        data = read_state(checkpoint)
        data["best_score"] = -math.inf if data.get("best_score") is None else data["best_score"]
        data["best_loss"] = math.inf if data.get("best_loss") is None else data["best_loss"]
        try:
            return cls(**data)
        except TypeError as err:
            raise InputError(f"{checkpoint}: not a classifier checkpoint ({err})") from err

    def to_json(self) -> dict:
        data = asdict(self)
        data["best_score"] = None if math.isinf(self.best_score) else self.best_score
        data["best_loss"] = None if math.isinf(self.best_loss) else self.best_loss
        return data


BEST_DIR = "best"
# What accelerate's save_state writes for the one prepared model (safetensors; .bin with safe_serialization off).
MODEL_FILES = ("model.safetensors", "pytorch_model.bin")


def check_checkpoint(checkpoint: Path, resume: str) -> None:
    """Refuse a folder that is a complete checkpoint of another trainer (e.g. a fine-tuning checkpoint-N): its
    trainer_state.json lacks the classifier trainer's fields, or it holds no classifier weights."""
    data = read_state(checkpoint)
    known = {f.name for f in fields(TrainerState)}
    unknown = sorted(set(data) - known) if isinstance(data, dict) else []
    if not isinstance(data, dict) or unknown or "global_step" not in data:
        found = f"its trainer state has {unknown} instead of the classifier trainer's fields" if unknown else \
            "its trainer state lacks global_step"
        raise InputError(f"--resume {resume}: {checkpoint} is not a classifier checkpoint ({found}); pass a "
                         "checkpoint-N folder written by `lesiongen train-classifier`, or 'latest'")
    if not any((checkpoint / name).is_file() for name in MODEL_FILES):
        raise InputError(f"--resume {resume}: {checkpoint} is not a classifier checkpoint (no {MODEL_FILES[0]})")


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
