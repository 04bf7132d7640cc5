"""Start or resume a loop run: plan the stages from the saved config and run the unfinished ones."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lesiongen.errors import TrainingDivergedError
from lesiongen.loop.config import LoopConfig, config_yaml, load_resolved
from lesiongen.loop.layout import RunLayout
from lesiongen.loop.plan import build_plan
from lesiongen.loop.progress import StageProgress
from lesiongen.loop.summary import SUMMARY_FILE, write_summary
from lesiongen.runs import RunDir, StageRunner, current_processes
from lesiongen.utils.distributed import together
from lesiongen.utils.outdir import mark_complete

# The stage's own message names its command's flags; in a loop they are config keys, and `--resume` keeps the
# config (every arm trains with the same settings), so a divergence is fixed in a new run.
LOOP_DIVERGENCE_FIX = ("In a loop run, start a new run with a lower rate: --set classifier.lr=..., finetune.lr=... "
                       "(finetune.tokens.lr for the class tokens) or base.pretrain.vae.learning_rate=... / "
                       "base.pretrain.unet.learning_rate=...")


@dataclass
class LoopOutcome:
    run_dir: Path
    stages: int
    ran: list[str]  # stages run by this call (empty when resuming a finished run)
    summary: Path


def create_run(config: LoopConfig, out: str | os.PathLike, *, overwrite: bool = False) -> RunDir:
    """A new run folder holding the resolved config (written by the main process; a refused --out stops
    every process)."""
    processes = current_processes()
    with together(processes):
        run = RunDir.create(out, config_yaml(config), overwrite=overwrite) if processes.is_main_process \
            else RunDir(out)
    return run


def run_loop(run_dir: str | os.PathLike, *, echo: Callable[[str], None] = print) -> LoopOutcome:
    """Run every unfinished stage of the run in `run_dir`; a finished run is left untouched."""
    processes = current_processes()
    processes.wait_for_everyone()  # the main process may have just created the folder
    run = RunDir.open(run_dir)
    config = load_resolved(run.config_path)
    if config.cpu_threads is not None:
        import torch

        torch.set_num_threads(config.cpu_threads)
    layout = RunLayout(run.root)
    plan = build_plan(config, layout)
    with together(processes):  # a run in use stops every process
        if processes.is_main_process:
            run.lock()
    try:
        progress = StageProgress(len(plan), echo)
        runner = StageRunner(run, processes, on_event=progress)
        try:
            ran = [result.name for result in map(runner, plan) if not result.skipped]
        except TrainingDivergedError as err:
            raise TrainingDivergedError(f"{err}. {LOOP_DIVERGENCE_FIX}") from err
        summary = layout.root / SUMMARY_FILE
        with together(processes):
            if processes.is_main_process:
                if ran or not summary.is_file():
                    write_summary(config, layout)
                if ran:
                    progress.finish()
                else:
                    echo(f"{run.root}: all {len(plan)} stages already finished; nothing to do")
                mark_complete(run.root)  # every stage finished (a result an --overwrite replaced goes now)
    finally:
        if processes.is_main_process:
            run.unlock()
    return LoopOutcome(run.root, len(plan), ran, summary)
