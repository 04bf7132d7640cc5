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


def test_demo_on_a_finished_run_resumes_and_reports_what_the_run_measured(tiny_loop_run):
    done = lesiongen("demo", "--out", str(tiny_loop_run.run_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming the demo" in done.stdout and "nothing to do" in done.stdout
    _check_demo_output(done.stdout, tiny_loop_run.run_dir)


@pytest.mark.slow
def test_full_demo_from_scratch(tmp_path):
    started = time.monotonic()
    done = lesiongen("demo", "--out", str(tmp_path / "demo"), timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _check_demo_output(done.stdout, tmp_path / "demo")
    print(f"demo wall time {time.monotonic() - started:.0f} s")
