"""An error that one process of an `accelerate launch` run meets stops all of them, and is printed once.

Threads stand in for processes here (the exchange `together` makes is swapped for one between threads);
test_finetune_cli and test_generate run the same on two real gloo processes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import lesiongen.runs
import lesiongen.utils.distributed as distributed
from lesiongen.cli.app import _Group, app
from lesiongen.errors import InputError, ProcessFailedError
from lesiongen.runs import RunDir, Stage, StageRunner
from lesiongen.utils.distributed import is_shared, shared, together


class ThreadGroup:
    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=10)  # broken, not hung, if a thread never comes
        self.slots: list = [None] * size


class ThreadProcess:
    """What `together` and `StageRunner` use of accelerate's `PartialState`."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.process_index, self.num_processes = group, rank, group.size
        self.is_main_process = rank == 0

    def wait_for_everyone(self) -> None:
        self.group.barrier.wait()


def thread_gather(processes: ThreadProcess, item):
    group = processes.group
    group.slots[processes.process_index] = item
    group.barrier.wait()
    gathered = list(group.slots)
    group.barrier.wait()
    return gathered


@pytest.fixture
def threads(monkeypatch):
    """`run(fn)`: fn(process) on two thread-processes; returns {rank: result or exception}."""
    monkeypatch.setattr(distributed, "gather", thread_gather)
    monkeypatch.setattr(lesiongen.runs, "POLL_SECONDS", 0.05)

    def run(fn) -> dict:
        group, outcome = ThreadGroup(2), {}

        def body(rank: int) -> None:
            try:
                outcome[rank] = fn(ThreadProcess(group, rank))
            except Exception as err:
                outcome[rank] = err

        workers = [threading.Thread(target=body, args=(rank,), daemon=True) for rank in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=20)
        assert set(outcome) == {0, 1}, f"a process hung: {outcome}"
        return outcome

    return run


def test_an_error_of_the_main_process_is_raised_on_every_process(threads):
    def prepare_out(processes):
        with together(processes):
            if processes.is_main_process:
                raise InputError("--out taken holds another run")
        return "went on"

    outcome = threads(prepare_out)
    for rank in (0, 1):
        err = outcome[rank]
        assert isinstance(err, InputError) and str(err) == "--out taken holds another run" and is_shared(err)


def test_an_error_of_another_process_reaches_the_main_one(threads):
    def shard(processes):
        with together(processes):
            if processes.process_index == 1:
                raise InputError("images/x.png: not an image")

    outcome = threads(shard)
    assert [str(outcome[rank]) for rank in (0, 1)] == ["images/x.png: not an image"] * 2
    assert all(is_shared(outcome[rank]) for rank in (0, 1))


def test_an_unexpected_error_keeps_its_traceback_where_it_happened(threads):
    def buggy(processes):
        with together(processes):
            if processes.process_index == 1:
                raise ZeroDivisionError("division by zero")

    outcome = threads(buggy)
    assert type(outcome[1]) is ZeroDivisionError and outcome[1].__traceback__ is not None
    assert not is_shared(outcome[1])  # printed as a traceback by its own process
    assert isinstance(outcome[0], ProcessFailedError) and is_shared(outcome[0])
    assert "process 1 stopped with ZeroDivisionError: division by zero" in str(outcome[0])


def test_nothing_changes_when_no_process_fails(threads):
    def fine(processes):
        with together(processes):
            value = processes.process_index * 10
        return value

    assert threads(fine) == {0: 0, 1: 10}


def test_a_failed_main_only_stage_stops_the_waiting_processes(threads, tmp_path):
    """The others wait for a main-only stage's folder (not at a barrier); a failure file tells them to stop."""
    root = RunDir.create(tmp_path / "run", "x: 1\n").root

    def bad_base(folder: Path) -> dict:
        time.sleep(0.3)  # the others are polling by now
        raise InputError("base /models/x: not a diffusers folder")

    def process(processes):
        return StageRunner(RunDir.open(root), processes=processes)(Stage("base", "base", bad_base))

    outcome = threads(process)
    for rank in (0, 1):
        assert isinstance(outcome[rank], InputError)
        assert str(outcome[rank]) == "stage base: base /models/x: not a diffusers folder"
    assert is_shared(outcome[1]) and not RunDir.open(root).is_finished("base")


def _app(error: Exception | None) -> typer.Typer:
    """An application whose one command `fail` raises `error` (None: finishes)."""
    app = typer.Typer(cls=_Group)

    @app.callback()
    def root() -> None:
        pass

    @app.command()
    def fail() -> None:
        if error is not None:
            raise error

    return app


@pytest.mark.parametrize("rank, raised_by_all, printed", [
    ("0", True, True), ("1", True, False),  # every process raised it: the main process says it
    ("1", False, True),  # met by this process alone: it says it
])
def test_the_cli_prints_a_shared_error_on_the_main_process_only(monkeypatch, rank, raised_by_all, printed):
    monkeypatch.setenv("RANK", rank)
    err = InputError("manifest.csv row 3: no such image")
    wrapped = InputError("stage data: manifest.csv row 3: no such image")  # as StageRunner re-raises
    wrapped.__cause__ = shared(err) if raised_by_all else err
    result = CliRunner().invoke(_app(wrapped), ["fail"])
    assert result.exit_code == 2
    assert ("Error: stage data: manifest.csv row 3" in result.output) is printed


def test_the_unfinished_run_warning_is_printed_once(monkeypatch, tmp_path, capsys):
    from lesiongen.utils.outdir import warn_if_unfinished, write_marker

    write_marker(tmp_path, "generation", complete=False)
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        warn_if_unfinished(tmp_path, "the same command again")
    assert capsys.readouterr().err.count("WARNING:") == 1


@pytest.mark.parametrize("name, args", [
    ("base pretrain", ["--manifest", "m.csv", "--out", "base"]), ("data index", ["data/"]), ("report", ["run/"]),
    ("mine", ["--predictions", "p"]),
])
def test_a_one_process_command_under_several_processes_is_refused_once(monkeypatch, name, args):
    """Launched on two processes, `base pretrain` would pretrain twice into one folder, racing on its
    checkpoints: every process refuses, and the main one says why."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        result = CliRunner().invoke(app, [*name.split(), *args])
        assert result.exit_code == 2, result.output
        said = " ".join(result.output.split())
        assert (f"`lesiongen {name}` runs on one process, but `accelerate launch` started 2" in said) is printed, said


@pytest.mark.parametrize("command", [["version"], ["base", "pretrain", "--help"], ["loop", "--help"]])
def test_help_and_version_run_under_several_processes(monkeypatch, command):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert CliRunner().invoke(app, command).exit_code == 0


@pytest.fixture
def process_group(tmp_path):
    """A real gloo process group of one process, as `accelerate launch` leaves one for the command."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("error, closed", [
    (None, True),  # a finished command: every process is here
    (shared(InputError("raised by every process")), True),
    (InputError("met by this process alone"), False),  # the others may be inside a collective still
])
def test_the_cli_closes_the_process_group_where_every_process_arrives(process_group, error, closed):
    """Left to the interpreter's teardown, a gloo group can abort a finished process (SIGABRT, 'terminate
    called without an active exception'), failing the launch after all its work was done."""
    result = CliRunner().invoke(_app(error), ["fail"])
    assert result.exit_code == (0 if error is None else 2), result.output
    assert process_group.is_initialized() is not closed
