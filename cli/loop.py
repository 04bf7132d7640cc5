"""`lesiongen loop`, `lesiongen report` and `lesiongen demo`: the whole adversarial procedure, its
before/after report, and the embedded demonstration on the toy data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_RUNS = Path("checkpoints") / "runs"
DEFAULT_DEMO = Path("checkpoints") / "demo"


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("loop")(loop)
    app.command("report")(report)
    app.command("demo")(demo)


def loop(
    config: Annotated[str | None, typer.Option("--config", "-c", help="Run config: a YAML path or a shipped "
                                               "name (demo, derm-dev-small, ham10000-sd15, isic2019-sd15).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder to create "
                                             "(default: checkpoints/runs/<config name>).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this folder (its saved config); "
                                                "finished stages are not redone.")] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="Run seeds 0..N-1 (every arm, same seeds).")] = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="Rounds of mine -> generate -> retrain.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. "
                                                   "--set classifier.epochs=5 (repeatable; values are YAML).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
    report: Annotated[bool, typer.Option(help="Write report.md / report.html when the run finishes.")] = True,
) -> None:
    """Round 0 trains the real-only classifier; each round mines its validation mistakes, inverts them,
    makes filtered variants and retrains, beside the classical-augmentation and random-synthetic
    baselines. Works under `accelerate launch -m lesiongen loop ...` on several processes."""
    from lesiongen.loop.run import run_loop

    started = None  # (folder, was an empty folder) when this call starts the run
    if resume is not None:
        if config is not None or seeds is not None or rounds is not None or set_ or overwrite:
            raise typer.BadParameter("--resume continues a run with its saved config; do not combine it with "
                                     "--config/--seeds/--rounds/--set/--overwrite", param_hint="--resume")
        run_dir = resume
    else:
        if config is None:
            raise typer.BadParameter("give --config (a YAML file or shipped name) or --resume RUN_DIR",
                                     param_hint="--config")
        run_dir, started = _create_run(config, out, seeds, rounds, set_ or [], overwrite)
    with _removed_on_failure(started):
        outcome = run_loop(run_dir, echo=typer.echo)
    if report and (outcome.ran or not (outcome.run_dir / "report.html").is_file()):
        _write_report(outcome.run_dir)


def _removed_on_failure(started: tuple[Path, bool] | None):
    """A run this call created that fails before any stage but the (cheap) data stage finished (a bad base path
    in its config, say) is removed again, so the corrected `loop --config ...` just works, and the run an
    --overwrite replaced comes back."""
    import contextlib

    from lesiongen.loop.layout import RunLayout
    from lesiongen.runs import RunDir, current_processes
    from lesiongen.utils.outdir import removed_on_failure

    if started is None:
        return contextlib.nullcontext()
    folder, existed = started
    return removed_on_failure(folder, lambda path: RunDir(path).holds_progress(besides=(RunLayout.DATA,)),
                              existed=existed, active=current_processes().is_main_process)


def _create_run(config: str, out: Path | None, seeds: int | None, rounds: int | None, sets: list[str],
                overwrite: bool) -> tuple[Path, tuple[Path, bool]]:
    from lesiongen.cli.options import echo_main
    from lesiongen.config import config_path
    from lesiongen.loop.config import absolute_paths, check_input_paths, load_loop_config, parse_set_options
    from lesiongen.loop.run import create_run

    overrides = parse_set_options(sets)
    if seeds is not None:
        overrides["seeds"] = seeds
    if rounds is not None:
        overrides["rounds"] = rounds
    path = config_path(config)
    resolved = absolute_paths(load_loop_config(path, overrides), Path.cwd())
    check_input_paths(resolved, str(path), overrides)
    run_dir = out or DEFAULT_RUNS / path.stem
    was_empty = run_dir.is_dir() and not any(run_dir.iterdir())
    create_run(resolved, run_dir, overwrite=overwrite)
    echo_main(f"run folder: {run_dir} (resume with: lesiongen loop --resume {run_dir})")
    return run_dir, (run_dir, was_empty)


def report(
    run_dir: Annotated[Path, typer.Argument(help="A loop run folder.")],
) -> None:
    """Write RUN_DIR/report.md and a self-contained RUN_DIR/report.html (images embedded)."""
    _write_report(run_dir)


def _write_report(run_dir: Path) -> None:
    from lesiongen.report import write_report
    from lesiongen.runs import current_processes

    if not current_processes().is_main_process:
        return
    paths = write_report(run_dir)
    typer.echo(f"report: {paths.markdown}\n        {paths.html}")


def demo(
    out: Annotated[Path, typer.Option("--out", "-o",
                                      help="Run folder of the demo; rerunning resumes it.")] = DEFAULT_DEMO,
    overwrite: Annotated[bool, typer.Option(help="Start the demo again from scratch.")] = False,
) -> None:
    """The whole procedure on CPU in minutes: toy data -> the project's tiny in-house base -> adapt ->
    2 rounds of mine/invert/vary/filter/retrain beside the baselines -> report. A demonstration of the
    pipeline, not a result about dermoscopy."""
    from lesiongen.loop.demo import run_demo

    run_demo(out, overwrite=overwrite, echo=typer.echo)
