"""Run directories: a resolved config, a record of finished stages, one folder per stage.

Layout (DESIGN.md)::

    RUN/config.yaml                      the resolved config the run was started with
    RUN/state.json                       finished stages, in the order they finished
    RUN/<stage name>/                    e.g. RUN/seed-0/round-1/mined/mine/
    RUN/<stage name>/stage.json          written last inside the stage folder: the folder is complete
    RUN/<parent>/.<leaf>.partial/        a stage being built (kept across a kill for stages that resume)

A stage is built in its `.partial` folder and renamed onto its final name only when its function has
returned; `stage.json` goes in before the rename, so a folder under a final name is always complete.
`state.json` is rewritten (write-then-rename) after the rename. A run killed anywhere, `kill -9`
included, therefore leaves either a finished stage (its folder, possibly not yet in `state.json`: it is
adopted on resume, not redone) or a `.partial` folder that the next attempt wipes or resumes inside.

Under `accelerate launch` every process runs the same plan: only the main process writes the run
folder's bookkeeping, and the processes meet at a barrier around every stage.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from lesiongen.errors import InputError, LesiongenError
from lesiongen.utils.atomic import replace_dir, write_json, write_text
from lesiongen.utils.distributed import peer_failure, report_failure, together

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"
STAGE_RECORD = "stage.json"
STAGE_FAILED = "failed.json"  # in a main-only stage's partial folder: why the others stop waiting
LOCK_FILE = ".lock"
STATE_VERSION = 1


class Processes(Protocol):
    """What the runner needs from a process group (accelerate's `PartialState` has exactly this)."""

    @property
    def is_main_process(self) -> bool: ...

    def wait_for_everyone(self) -> None: ...


class SingleProcess:
    """The process group of a plain `python -m lesiongen` run."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        return None


def current_processes() -> Processes:
    """accelerate's view of the processes when launched by `accelerate launch`, else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from lesiongen.utils.distributed import process_state

        return process_state()
    return SingleProcess()


@dataclass(frozen=True)
class Stage:
    """One unit of resumable work: `build(folder)` fills `folder` and returns a summary for the record.

    `distributed` stages run on every process (the function shards its own work, e.g. DDP training or
    sharded generation); the others run on the main process while the rest wait. `resumable` stages
    keep the partial folder of a killed attempt so the function can continue inside it (e.g. from a
    `checkpoint-N/`); the others start from an empty folder.
    """

    name: str
    title: str
    build: Callable[[Path], dict[str, Any] | None]
    distributed: bool = False
    resumable: bool = False

    def __post_init__(self) -> None:
        parts = self.name.split("/")
        if not self.name or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise ValueError(f"stage name '{self.name}' must be a relative path of plain folder names")


@dataclass
class StageResult:
    name: str
    folder: Path
    summary: dict[str, Any]
    skipped: bool
    seconds: float


class RunDir:
    """A run folder on disk; the main process owns its bookkeeping files."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    # -- creation and opening ---------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike, config_text: str, *, overwrite: bool = False) -> RunDir:
        """Start a new run folder holding `config_text` as its resolved config; --overwrite replaces only
        an earlier loop run (never a folder of anything else)."""
        from lesiongen.utils.outdir import OutputFolder

        run = cls(root)
        folder = OutputFolder(run.root, "loop")
        if folder.existing and not overwrite:
            raise LesiongenError(f"run folder {run.root} already exists; resume it with --resume {run.root} "
                                 "or pass --overwrite to start again")
        folder.start(replace=overwrite)
        write_text(run.config_path, config_text)
        run._write_state({"version": STATE_VERSION, "created": _now(), "finished": {}})
        return run

    @classmethod
    def open(cls, root: str | os.PathLike) -> RunDir:
        run = cls(root)
        if not run.config_path.is_file() or not run.state_path.is_file():
            raise InputError(f"{run.root} is not a run folder (expected {CONFIG_FILE} and {STATE_FILE} in it)")
        run.state()  # validates
        return run

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{self.state_path}: unreadable run state ({err})") from err
        if not isinstance(state, dict) or not isinstance(state.get("finished"), dict):
            raise InputError(f"{self.state_path}: expected a mapping with a 'finished' mapping")
        return state

    def finished(self) -> dict[str, dict[str, Any]]:
        """Finished stages (name -> record) in the order they finished."""
        return self.state()["finished"]

    def is_finished(self, name: str) -> bool:
        return name in self.finished()

    def stage_dir(self, name: str) -> Path:
        return self.root / name

    def partial_dir(self, name: str) -> Path:
        final = self.stage_dir(name)
        return final.with_name(f".{final.name}.partial")

    def record(self, name: str, record: dict[str, Any]) -> None:
        state = self.state()
        state["finished"][name] = record
        state["updated"] = _now()
        self._write_state(state)

    def forget(self, names: Iterable[str]) -> None:
        """Drop stages from the record (their folders go too), so the next run redoes them."""
        state = self.state()
        for name in names:
            state["finished"].pop(name, None)
            shutil.rmtree(self.stage_dir(name), ignore_errors=True)
        self._write_state(state)

    def _write_state(self, state: dict[str, Any]) -> None:
        write_json(self.state_path, state)

    # -- one process at a time --------------------------------------------------------------------
    def holds_progress(self, besides: Iterable[str] = ()) -> bool:
        """Anything a resumed run would keep: a finished stage (other than the cheap ones named in `besides`),
        or a checkpoint of one being built."""
        try:
            if set(self.finished()) - set(besides):
                return True
        except InputError:
            return True  # unreadable state: leave the folder for the user to look at
        return any(p.is_dir() for p in self.root.glob("**/checkpoint-*"))

    def lock(self) -> None:
        """Claim the run for this process; a lock left by a killed process (dead pid) is taken over."""
        path = self.root / LOCK_FILE
        if path.is_file():
            try:
                pid = int(path.read_text().split()[0])
            except (ValueError, IndexError, OSError):
                pid = 0
            if pid and pid != os.getpid() and _pid_alive(pid):
                raise LesiongenError(f"run folder {self.root} is in use by process {pid}; wait for it or stop it")
        write_text(path, f"{os.getpid()}\n")

    def unlock(self) -> None:
        path = self.root / LOCK_FILE
        try:
            if int(path.read_text().split()[0]) == os.getpid():
                path.unlink()
        except (OSError, ValueError, IndexError):
            pass


POLL_SECONDS = 2.0


def wait_for_file(path: Path, failed: Path | None = None) -> None:
    """Block until `path` exists; raise the main process's error if `failed` (its `report_failure`) appears
    first. If the process that makes it dies, `accelerate launch` (torchrun) stops this one too."""
    while not path.exists():
        if failed is not None and failed.is_file():
            try:
                report = json.loads(failed.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):  # being written: read it at the next look
                report = None
            if report is not None:
                raise peer_failure(0, report)
        time.sleep(POLL_SECONDS)


@dataclass
class StageRunner:
    """Runs stages in order, skipping finished ones; `on_event` drives a progress display."""

    run: RunDir
    processes: Processes = field(default_factory=SingleProcess)
    on_event: Callable[[str, Stage, dict[str, Any]], None] | None = None

    def __call__(self, stage: Stage) -> StageResult:
        return self.execute(stage)

    def execute(self, stage: Stage) -> StageResult:
        final = self.run.stage_dir(stage.name)
        main = self.processes.is_main_process
        with together(self.processes):
            if main:
                self._adopt_if_complete(stage.name)
        finished = self.run.finished()
        if stage.name in finished:
            self._emit("skip", stage, finished[stage.name])
            return StageResult(stage.name, final, finished[stage.name].get("summary", {}), True, 0.0)

        partial = self.run.partial_dir(stage.name)
        with together(self.processes):
            if main:
                if partial.exists() and not stage.resumable:
                    shutil.rmtree(partial)
                partial.mkdir(parents=True, exist_ok=True)
                (partial / STAGE_FAILED).unlink(missing_ok=True)  # a killed attempt's
            self._emit("start", stage, {})
        start = time.perf_counter()
        summary: dict[str, Any] = {}
        if stage.distributed or main:
            try:
                summary = stage.build(partial) or {}
            except LesiongenError as err:  # an hours-long run says which of its stages stopped
                raise self._failed(stage, partial, type(err)(f"stage {stage.name}: {err}")) from err
            except Exception as err:
                self._failed(stage, partial, err)
                raise
        if stage.distributed:
            self.processes.wait_for_everyone()  # every process's share is in `partial`
        elif not main:
            # A main-only stage (a base pretrained for hours) outlasts the process group's collective
            # timeout (10 min under NCCL): the others wait for its finished folder, not at a barrier,
            # and stop with the main process's error if it fails.
            wait_for_file(final / STAGE_RECORD, partial / STAGE_FAILED)
        seconds = time.perf_counter() - start
        record = {"title": stage.title, "finished_at": _now(), "seconds": round(seconds, 3), "summary": summary}
        with together(self.processes):
            if main:
                write_json(partial / STAGE_RECORD, {"name": stage.name, **record})
                replace_dir(partial, final)
                self.run.record(stage.name, record)
        self._emit("done", stage, record)
        return StageResult(stage.name, final, summary, False, seconds)

    def _failed(self, stage: Stage, partial: Path, err: Exception) -> Exception:
        """`err`, after telling the processes waiting for a main-only stage why it will not finish."""
        if not stage.distributed and getattr(self.processes, "num_processes", 1) > 1:
            try:
                write_json(partial / STAGE_FAILED, report_failure(err))
            except OSError:
                pass  # they are stopped with this process anyway
        return err

    def _adopt_if_complete(self, name: str) -> None:
        """A folder renamed into place but killed before `state.json` was updated is finished work."""
        if self.run.is_finished(name):
            return
        final = self.run.stage_dir(name)
        record_file = final / STAGE_RECORD
        if record_file.is_file():
            try:
                record = json.loads(record_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and record.get("name") == name:
                record.pop("name")
                self.run.record(name, record)
                return
        if final.exists():  # not made by the runner (no record): never trust it as finished
            shutil.rmtree(final)

    def _emit(self, event: str, stage: Stage, info: dict[str, Any]) -> None:
        if self.on_event is not None and self.processes.is_main_process:
            self.on_event(event, stage, info)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
