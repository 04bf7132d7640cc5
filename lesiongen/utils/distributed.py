"""One way to ask accelerate for the process group, whether or not the run is on CPU, and for a stage's
`Accelerator` when one process runs several stages (the loop, the demo)."""

from __future__ import annotations

from typing import Any, TypeVar

from lesiongen.errors import LesiongenError, ProcessFailedError


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


def launched_main() -> bool:
    """Whether this is the main process of an `accelerate launch` run (or no launch at all), from the
    launcher's environment alone: no process group is started, so an error handler may ask."""
    import os

    return os.environ.get("RANK", "0") == "0"


def close_process_group() -> None:
    """Destroy the default process group, if one was started, while the interpreter is still whole.

    Left to the interpreter's teardown, a gloo group's worker threads can abort a process whose work is done
    ("terminate called without an active exception", SIGABRT: pytorch#190489), which fails the whole
    `accelerate launch` (measured: 3 of 65 two-process gloo launches without it, 0 of 65 with it; NCCL prints a
    warning instead). Call it only where every process arrives (a finished command, or an error they raised
    together): with NCCL, destroying the group aborts its communicators collectively.
    """
    import sys

    if "torch.distributed" not in sys.modules:  # nothing started one; `--help` stays free of torch
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


SHARED = "_lesiongen_shared"
E = TypeVar("E", bound=BaseException)


def shared(err: E) -> E:
    """`err`, marked as raised by every process (the CLI prints it on the main process only)."""
    setattr(err, SHARED, True)
    return err


def is_shared(err: BaseException | None) -> bool:
    """Whether every process raised `err` (or the error it was re-raised `from`): see `together`."""
    while err is not None:
        if getattr(err, SHARED, False):
            return True
        err = err.__cause__
    return False


class together:
    """`with together(processes): ...` runs a block that may fail on some processes only (typically the
    main process's part before a barrier: preparing --out, writing the results) and ends with a barrier
    at which the processes learn whether any of them failed; if one did, every process raises.

    Without it, a process that raised skips the barrier and the others wait at it for a peer that has
    exited: gloo fails them with a "Connection closed by peer" traceback, NCCL holds them until its
    timeout. With it, the failing process raises its own exception; the others raise the same
    `LesiongenError` (the lowest failing rank's), or `ProcessFailedError` for any other exception. Both
    are marked shared (`is_shared`), so the CLI prints them on the main process only: the user reads the
    message once. The block must not itself wait for the other processes (it would wait at a different
    collective than a process that failed before it).
    """

    def __init__(self, processes: Any = None) -> None:
        self.processes = processes

    def __enter__(self) -> together:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        processes = self.processes
        if processes is None:
            return False
        if not hasattr(processes, "num_processes"):  # a plain `runs.Processes`: a barrier, as before
            if exc is None:
                processes.wait_for_everyone()
            return False
        if processes.num_processes <= 1 or (exc is not None and not isinstance(exc, Exception)):
            return False  # Ctrl-C and the like: the launcher stops every process
        reports = gather(processes, report_failure(exc))
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if not failed:
            return False
        if exc is not None:
            if isinstance(exc, LesiongenError):
                shared(exc)
            return False  # this process's own exception, traceback and all
        raise peer_failure(*failed[0])


def gather(processes: Any, item: Any) -> list[Any]:
    """`item` of every process, in rank order (accelerate's `gather_object`; the exchange `together` makes)."""
    from accelerate.utils import gather_object

    return gather_object([item])


def report_failure(exc: BaseException | None) -> dict[str, Any] | None:
    """What the other processes need to raise the same error (JSON, so it may also go through a file)."""
    if exc is None:
        return None
    kind = type(exc)
    return {"class": f"{kind.__module__}:{kind.__qualname__}", "name": kind.__name__, "message": str(exc),
            "user_error": isinstance(exc, LesiongenError)}


def peer_failure(rank: int, report: dict[str, Any]) -> LesiongenError:
    """The error to raise where process `rank` failed as `report` says: the same `LesiongenError`, or a
    `ProcessFailedError` naming an unexpected one. Marked shared: the CLI prints it on the main process only."""
    err: LesiongenError | None = None
    if report.get("user_error"):
        import importlib

        module, _, name = str(report.get("class", "")).partition(":")
        try:
            kind = getattr(importlib.import_module(module), name)
            err = kind(report["message"]) if issubclass(kind, LesiongenError) else None
        except Exception:  # not importable here, or another constructor
            err = None
        err = err or LesiongenError(report["message"])
    else:
        err = ProcessFailedError(f"process {rank} stopped with {report.get('name')}: {report.get('message')} "
                                 "(its traceback is above)")
    return shared(err)
