"""One way to ask accelerate for the process group, whether or not the run is on CPU, and for a stage's
`Accelerator` when one process runs several stages (the loop, the demo)."""

from __future__ import annotations

from typing import Any


def process_state() -> Any:
    """accelerate's `PartialState`, honouring ACCELERATE_USE_CPU.

    As `AcceleratorState` does: a first `PartialState()` without `cpu=True` ignores ACCELERATE_USE_CPU, so
    every process of a CPU `accelerate launch` would think it is the only one and do all the work.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def stage_accelerator(*, mixed_precision: str, **kwargs: Any) -> Any:
    """An `Accelerator` for one stage of a process that may run several with different mixed precision.

    accelerate keeps one `AcceleratorState` per process and refuses a second `Accelerator` whose
    `mixed_precision` differs ("AcceleratorState has already been initialized and cannot be changed"): on a GPU
    the loop's bf16 finetune followed by a classifier configured with "no" would crash. The process group
    (`PartialState`) stays; only the precision state is rebuilt.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, **kwargs)
