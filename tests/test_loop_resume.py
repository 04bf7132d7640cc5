"""A real (tiny) loop run killed with SIGKILL mid-stage continues with `loop --resume` without redoing
finished stages and ends complete; resuming a finished run does nothing."""

from __future__ import annotations

import json

from loop_support import KILL_IN_STAGE, lesiongen

from lesiongen.loop.config import load_resolved
from lesiongen.loop.layout import RunLayout, has_rows
from lesiongen.loop.plan import build_plan, models


def _files(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_killed_run_resumes_without_redoing_finished_stages(tiny_loop_run):
    run_dir = tiny_loop_run.run_dir
    state = json.loads((run_dir / "state.json").read_text())["finished"]
    killed = tiny_loop_run.killed_state
    assert "seed-0/round-0/real/train" in killed and "seed-0/round-1/random/train" not in killed
    for name, record in killed.items():  # same record, same finish time: the stage was not run again
        assert state[name] == record, name
    assert f"skipped {len(killed)} finished stage(s)" in tiny_loop_run.resume_output
    first_redone = next(name for name in state if name not in killed)
    assert f"({first_redone})" in tiny_loop_run.resume_output

    config = load_resolved(run_dir / "config.yaml")
    layout = RunLayout(run_dir)
    planned = [stage.name for stage in build_plan(config, layout)]
    assert list(state) == [name for name in planned if name in killed] + [n for n in planned if n not in killed]
    leftovers = [p for p in run_dir.rglob("*") if p.name.endswith((".partial", ".tmp", ".old")) or ".tmp" in p.name]
    assert not leftovers, leftovers

    summary = json.loads((run_dir / "metrics.json").read_text())
    assert [(m["arm"], m["round"]) for m in summary["models"]] == [(k.arm, k.round) for k in models(config, 0)]
    for model in summary["models"]:
        assert model["test"]["split"] == "test" and 0.0 <= model["test"]["metrics"]["balanced_accuracy"] <= 1.0
    assert has_rows(run_dir / KILL_IN_STAGE / "manifest.csv")


def test_every_synthetic_row_traces_back_to_its_source(tiny_loop_run):
    import pandas as pd

    run_dir = tiny_loop_run.run_dir
    real = pd.read_csv(run_dir / "data" / "manifest.csv", dtype=str).set_index("image")
    for arm in ("mined", "classical"):
        rows = pd.read_csv(run_dir / f"seed-0/round-1/{arm}" / ("vary" if arm == "mined" else "augment") /
                           "manifest.csv", dtype=str)
        assert len(rows) and (rows["synthetic"] == "1").all()
        source = real.loc[rows["source_image"]]
        assert list(source["label"]) == list(rows["label"]) and list(source["split"]) == list(rows["split"])
        assert list(source["group_id"]) == list(rows["group_id"]) and set(rows["split"]) == {"val"}
    mined = pd.read_csv(run_dir / "seed-0/round-1/mined/vary/manifest.csv", dtype=str)
    classical = pd.read_csv(run_dir / "seed-0/round-1/classical/augment/manifest.csv", dtype=str)
    random = pd.read_csv(run_dir / "seed-0/round-1/random/generate/manifest.csv", dtype=str)
    assert mined["source_image"].value_counts().to_dict() == classical["source_image"].value_counts().to_dict()
    assert random["label"].value_counts().to_dict() == mined["label"].value_counts().to_dict()  # same budget


def test_resuming_a_finished_run_does_nothing(tiny_loop_run):
    run_dir = tiny_loop_run.run_dir
    lesiongen("report", str(run_dir))  # the report too, so that it exists before and after
    before = _files(run_dir)
    again = lesiongen("loop", "--resume", str(run_dir))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already finished; nothing to do" in again.stdout
    assert _files(run_dir) == before


def test_loop_refuses_an_existing_run_folder_and_mixed_flags(tiny_loop_run):
    clash = lesiongen("loop", "--config", str(tiny_loop_run.config_file), "--out", str(tiny_loop_run.run_dir))
    assert clash.returncode == 2 and "--resume" in clash.stderr + clash.stdout
    mixed = lesiongen("loop", "--resume", str(tiny_loop_run.run_dir), "--seeds", "3")
    assert mixed.returncode == 2


def test_an_overwrite_that_stops_on_a_bad_base_gives_the_finished_run_back(tiny_loop_run, tmp_path):
    """The base is checked in its stage, after the data stage: the new run is removed and the finished run it
    was to replace comes back whole (a resume could not fix the new one: it keeps its config)."""
    import shutil

    import yaml

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_loop_run.run_dir, run_dir)
    before = {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    config = yaml.safe_load(tiny_loop_run.config_file.read_text())
    config["base"] = {"path": str(tmp_path)}  # a folder, but not a pipeline
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = lesiongen("loop", "--config", str(bad), "--out", str(run_dir), "--overwrite", "--no-report")
    assert result.returncode == 2 and "stage base:" in result.stderr, result.stderr
    assert {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before
    assert not (tmp_path / ".run.replaced").exists()
