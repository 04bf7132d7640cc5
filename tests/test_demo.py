"""`lesiongen demo`: says it is a demonstration, prints the before/after table read back from the run's
own metrics, writes the report, and resumes like a loop run. The full demo (minutes on CPU) is `slow`."""

from __future__ import annotations

import json
import re
import time

import pytest
from loop_support import lesiongen


def _table_values(output: str) -> dict[tuple[str, str], str]:
    """(arm, round) -> balanced-accuracy cell of the table the demo printed."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]
    return {(r["arm"], r["round"]): r["balanced accuracy"] for r in rows}


def _check_demo_output(output: str, run_dir) -> None:
    assert "DEMONSTRATION" in output and "procedural toy" in output
    printed = _table_values(output)
    for metrics_file in run_dir.glob("seed-0/round-*/*/eval-test/metrics.json"):
        metrics = json.loads(metrics_file.read_text())
        arm, round_ = metrics_file.parts[-3], metrics_file.parts[-4].removeprefix("round-")
        value, (low, high) = metrics["metrics"]["balanced_accuracy"], metrics["ci95"]["balanced_accuracy"]
        assert printed[(arm, round_)] == f"{value:.3f} [{low:.3f}, {high:.3f}]"
    assert (run_dir / "report.html").is_file() and re.search(r"demo wall time: \d+ min", output)


def test_demo_on_a_finished_run_resumes_and_reports_what_the_run_measured(tiny_loop_run, monkeypatch):
    from pathlib import Path

    from lesiongen.loop import demo
    from lesiongen.loop.config import absolute_paths, load_loop_config

    # The demo resumes only its own runs: here the tiny run stands in for the demo's (same config).
    monkeypatch.setattr(demo, "demo_config",
                        lambda: absolute_paths(load_loop_config(tiny_loop_run.config_file), Path.cwd()))
    printed: list[str] = []
    demo.run_demo(tiny_loop_run.run_dir, echo=printed.append)
    output = "\n".join(printed)
    assert "resuming the demo" in output and "nothing to do" in output
    _check_demo_output(output, tiny_loop_run.run_dir)


@pytest.mark.slow
def test_full_demo_from_scratch(tmp_path):
    started = time.monotonic()
    done = lesiongen("demo", "--out", str(tmp_path / "demo"), timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _check_demo_output(done.stdout, tmp_path / "demo")
    print(f"demo wall time {time.monotonic() - started:.0f} s")


def test_demo_resumes_only_its_own_runs(tmp_path):
    from dataclasses import replace

    from lesiongen.errors import OutputExistsError
    from lesiongen.loop.config import config_yaml
    from lesiongen.loop.demo import demo_config, run_demo
    from lesiongen.runs import RunDir

    other = replace(demo_config(), seeds=[0, 1])  # `demo: true`, but not the demo's run
    RunDir.create(tmp_path / "run1", config_yaml(other))
    with pytest.raises(OutputExistsError, match="run1 holds a loop run that is not the demo .*seeds"):
        run_demo(tmp_path / "run1", echo=lambda _: None)
    classifier = tmp_path / "clf"
    classifier.mkdir()
    (classifier / "classifier.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="not a loop run output folder") as refused:
        run_demo(classifier, echo=lambda _: None)
    assert "--resume" not in str(refused.value)  # demo has no --resume
