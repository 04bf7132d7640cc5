"""The loop under `accelerate launch` with two CPU processes (gloo): the run that the
shared tiny run's data and base start (fine-tuning included) is finished by two processes, every classifier is
trained by both, and the stage records are written once."""

from __future__ import annotations

import json
import shutil

from launch_support import failure, launch
from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.runs import RunDir


def test_finetune_and_per_seed_stages_run_on_two_processes(tiny_loop_run, tmp_path):
    source = tiny_loop_run.run_dir
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("seed-*", "report*", "metrics.json"))
    run = RunDir.open(run_dir)
    run.forget([name for name in run.finished() if name.startswith("seed-") or name == "finetune"])
    assert list(run.finished()) == ["data", "base"]

    done = launch("loop", "--resume", run_dir, timeout=900)
    assert done.returncode == 0, failure(done)

    finished = run.finished()
    assert set(finished) == set(json.loads((source / "state.json").read_text())["finished"])
    assert done.stdout.count("all ") == 1 and done.stdout.count("[1") >= 1  # one progress display (main only)
    # fine-tuning too (its end used to tear down the process group the later stages need)
    assert json.loads((run_dir / "finetune/adapter/adapter.json").read_text())["training"]["num_processes"] == 2
    for info_file in run_dir.glob("seed-0/round-*/*/train/classifier.json"):
        assert json.loads(info_file.read_text())["training"]["num_processes"] == 2, info_file
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert all(m["test"] and m["test"]["n_images"] > 0 for m in summary["models"])
    # the sharded stages' outputs are complete: every mined source has its record and variants
    vary = run_dir / "seed-0/round-1/mined/vary"
    assert len(list((vary / "records").glob("*.json"))) == finished["seed-0/round-1/mined/vary"]["summary"]["sources"]
    assert (run_dir / "report.html").is_file()

    # Its classifiers trained on two processes: resumed on one, a classifier still to train would get half the
    # effective batch and be compared with them as if trained alike. A finished run has nothing left to train.
    assert CliRunner().invoke(app, ["loop", "--resume", str(run_dir)]).exit_code == 0
    run.forget(["seed-0/round-1/random/train"])
    state = (run_dir / "state.json").read_text()
    refused = CliRunner().invoke(app, ["loop", "--resume", str(run_dir)])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2, said
    assert "classifier(s) of this run trained on 2 process(es) (effective batch" in said
    assert "but this launch has 1" in said and "--num_processes 2 -m lesiongen loop --resume" in said
    assert (run_dir / "state.json").read_text() == state
