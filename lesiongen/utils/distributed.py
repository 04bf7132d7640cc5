"""One way to ask accelerate for the process group, whether or not the run is on CPU."""

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
