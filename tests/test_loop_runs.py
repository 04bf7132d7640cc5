"""The run-folder machinery (`lesiongen.runs`): stage records, write-then-rename, resume, adoption, lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from lesiongen.errors import InputError, LesiongenError
from lesiongen.runs import STAGE_RECORD, RunDir, Stage, StageRunner


def _writer(calls: list[str], name: str, text: str = "done"):
    def build(folder: Path) -> dict:
        calls.append(name)
        (folder / "out.txt").write_text(text)
        return {"chars": len(text)}

    return build


def test_stages_run_once_and_are_recorded(tmp_path):
    run = RunDir.create(tmp_path / "run", "name: t\n")
    calls: list[str] = []
    runner = StageRunner(run)
    for name in ("a", "b/c"):
        result = runner(Stage(name, name, _writer(calls, name)))
        assert not result.skipped and (run.stage_dir(name) / "out.txt").read_text() == "done"
        assert json.loads((run.stage_dir(name) / STAGE_RECORD).read_text())["name"] == name
    assert list(run.finished()) == ["a", "b/c"]
    assert run.finished()["a"]["summary"] == {"chars": 4}

    again = StageRunner(RunDir.open(run.root))
    assert again(Stage("a", "a", _writer(calls, "a"))).skipped
    assert calls == ["a", "b/c"]


class ThreadProcesses:
    """Two threads standing in for two processes; the barrier's timeout plays the collective timeout."""

    def __init__(self, barrier: threading.Barrier, main: bool) -> None:
        self.barrier, self.is_main_process = barrier, main

    def wait_for_everyone(self) -> None:
        self.barrier.wait()


def test_a_main_only_stage_may_outlast_the_collective_timeout(tmp_path, monkeypatch):
    """The other processes wait for the stage's folder, not at a barrier that would time out."""
    import lesiongen.runs

    monkeypatch.setattr(lesiongen.runs, "POLL_SECONDS", 0.05)
    root = RunDir.create(tmp_path / "run", "x: 1\n").root
    barrier = threading.Barrier(2, timeout=1.0)
    calls: list[str] = []

    def slow(folder: Path) -> dict:
        time.sleep(2.0)  # twice the "collective timeout"
        return _writer(calls, "slow")(folder)

    results: dict[bool, object] = {}

    def process(main: bool) -> None:
        runner = StageRunner(RunDir.open(root), processes=ThreadProcesses(barrier, main))
        results[main] = runner(Stage("slow", "slow", slow))

    threads = [threading.Thread(target=process, args=(main,)) for main in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not barrier.broken and calls == ["slow"]
    assert set(results) == {True, False} and RunDir.open(root).is_finished("slow")


def test_failed_stage_leaves_no_finished_folder(tmp_path):
    run = RunDir.create(tmp_path / "run", "x: 1\n")

    def fails(folder: Path) -> dict:
        (folder / "half.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        StageRunner(run)(Stage("s", "s", fails))
    assert not run.stage_dir("s").exists() and not run.is_finished("s")
    assert (run.partial_dir("s") / "half.bin").exists()

    seen: list[list[str]] = []

    def look(folder: Path) -> dict:
        seen.append(sorted(p.name for p in folder.iterdir()))
        return {}

    StageRunner(run)(Stage("s", "s", look))  # not resumable: starts from an empty folder
    assert seen == [[]] and run.is_finished("s") and not run.partial_dir("s").exists()


def test_a_stage_that_stops_on_bad_input_is_named_in_the_message(tmp_path):
    run = RunDir.create(tmp_path / "run", "x: 1\n")

    def bad_row(folder: Path) -> dict:
        raise InputError("labels.csv row 7: label 'xyz' is not a class")

    with pytest.raises(InputError, match=r"^stage seed-0/round-1/mined/mine: labels\.csv row 7: label 'xyz'"):
        StageRunner(run)(Stage("seed-0/round-1/mined/mine", "mine", bad_row))
    assert not run.is_finished("seed-0/round-1/mined/mine")


def test_resumable_stage_keeps_its_partial_folder(tmp_path):
    run = RunDir.create(tmp_path / "run", "x: 1\n")
    run.partial_dir("t").mkdir(parents=True)
    (run.partial_dir("t") / "checkpoint-3").mkdir()
    found = []
    StageRunner(run)(Stage("t", "t", lambda folder: found.append((folder / "checkpoint-3").is_dir()) or {},
                           resumable=True))
    assert found == [True]


def test_folder_in_place_but_unrecorded_is_adopted(tmp_path):
    """Killed between the rename and the state update: the stage is finished, not redone."""
    run = RunDir.create(tmp_path / "run", "x: 1\n")
    calls: list[str] = []
    StageRunner(run)(Stage("a", "a", _writer(calls, "a")))
    state = run.state()
    state["finished"].clear()
    run.state_path.write_text(json.dumps(state))
    assert StageRunner(run)(Stage("a", "a", _writer(calls, "a"))).skipped
    assert calls == ["a"] and run.is_finished("a")


def test_folder_without_record_is_not_trusted(tmp_path):
    run = RunDir.create(tmp_path / "run", "x: 1\n")
    run.stage_dir("a").mkdir()
    (run.stage_dir("a") / "stale.txt").write_text("left by hand")
    calls: list[str] = []
    StageRunner(run)(Stage("a", "a", _writer(calls, "a")))
    assert calls == ["a"] and not (run.stage_dir("a") / "stale.txt").exists()


def test_create_refuses_existing_run_and_open_checks_folder(tmp_path):
    RunDir.create(tmp_path / "run", "x: 1\n")
    with pytest.raises(LesiongenError, match="--resume"):
        RunDir.create(tmp_path / "run", "x: 1\n")
    RunDir.create(tmp_path / "run", "x: 2\n", overwrite=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("image,label\n")
    with pytest.raises(LesiongenError, match="not a loop run output folder"):
        RunDir.create(tmp_path / "data", "x: 1\n", overwrite=True)
    assert (tmp_path / "data" / "labels.csv").is_file()
    with pytest.raises(InputError, match="not a run folder"):
        RunDir.open(tmp_path)
    with pytest.raises(ValueError, match="plain folder names"):
        Stage("../escape", "x", lambda f: {})


def test_lock_refuses_a_live_process_and_takes_over_a_dead_one(tmp_path):
    run = RunDir.create(tmp_path / "run", "x: 1\n")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run.root / ".lock").write_text(f"{sleeper.pid}\n")
        with pytest.raises(LesiongenError, match=f"in use by process {sleeper.pid}"):
            run.lock()
    finally:
        sleeper.kill()
        sleeper.wait()
    run.lock()  # the holder is dead now
    assert (run.root / ".lock").read_text().split()[0] == str(os.getpid())
    run.unlock()
    assert not (run.root / ".lock").exists()


_KILLABLE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lesiongen.runs import RunDir, Stage, StageRunner

    run = RunDir.open(sys.argv[1])
    runner = StageRunner(run)
    def quick(folder):
        (folder / "out.txt").write_text("quick")
        with open(Path(sys.argv[1]) / "calls.log", "a") as log:
            log.write("quick\\n")
        return {}
    def slow(folder):
        with open(folder / "big.bin", "wb") as handle:
            handle.write(b"x" * 1000)
            handle.flush()
            print("writing", flush=True)
            time.sleep(float(sys.argv[2]))   # killed here, mid-write
            handle.write(b"y" * 1000)
        return {"bytes": 2000}
    runner(Stage("quick", "quick", quick))
    runner(Stage("slow", "slow", slow))
    print("finished", flush=True)
""")


def test_sigkill_mid_stage_then_resume(tmp_path):
    run = RunDir.create(tmp_path / "run", "x: 1\n")
    script = tmp_path / "killable.py"
    script.write_text(_KILLABLE)
    proc = subprocess.Popen([sys.executable, str(script), str(run.root), "60"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run.is_finished("quick") and not run.is_finished("slow")
    assert not run.stage_dir("slow").exists()  # the half-written file never appears under a finished name

    done = subprocess.run([sys.executable, str(script), str(run.root), "0"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert (run.root / "calls.log").read_text() == "quick\n"  # the finished stage was not redone
    assert (run.stage_dir("slow") / "big.bin").stat().st_size == 2000
    assert list(run.finished()) == ["quick", "slow"]
    # Resuming a finished run: nothing runs, nothing changes.
    before = run.state_path.read_text()
    again = subprocess.run([sys.executable, str(script), str(run.root), "0"], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and run.state_path.read_text() == before
    assert (run.root / "calls.log").read_text() == "quick\n"
