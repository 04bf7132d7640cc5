"""Start or resume a loop run: plan the stages from the saved config and run the unfinished ones."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lesiongen.errors import LesiongenError, TrainingDivergedError
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


def check_training_processes(config: LoopConfig, layout: RunLayout, num_processes: int) -> None:
    """Refuse to resume a run whose finished classifiers trained on another number of processes.

    A classifier's effective batch size is its batch times the processes, and the arms are compared as
    trained alike: a real-only model trained on 4 GPUs against a mined one trained on 2 after a resume would
    measure the batch size as much as the synthetic images.
    """
    from lesiongen.classifier.models import ClassifierInfo
    from lesiongen.loop.plan import models

    trained: dict[int, list[str]] = {}
    untrained = False
    for seed in config.seeds:
        for key in models(config, seed):
            if (layout.model(key) / "classifier.json").is_file():
                count = ClassifierInfo.read(layout.model(key)).training.get("num_processes", 1)
                trained.setdefault(int(count), []).append(key.stage("train"))
            else:
                untrained = True
    others = {count: names for count, names in trained.items() if count != num_processes}
    if not others or not untrained:  # every classifier trained: the rest (evaluations, report) is count-free
        return
    count, names = next(iter(others.items()))
    batch = config.classifier.batch_size * config.classifier.grad_accum
    how = "without `accelerate launch`, or with --num_processes 1" if count == 1 else \
        f"`accelerate launch --num_processes {count} -m lesiongen loop --resume {layout.root}`"
    raise LesiongenError(
        f"{layout.root}: {len(names)} classifier(s) of this run trained on {count} process(es) (effective batch "
        f"{batch * count}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}), but this launch has "
        f"{num_processes} (effective batch {batch * num_processes}); the arms are compared as trained alike. "
        f"Resume on {count} ({how})")


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
    with together(processes):  # a run in use (or resumed on another process count) stops every process
        if processes.is_main_process:
            check_training_processes(config, layout, getattr(processes, "num_processes", 1))
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
