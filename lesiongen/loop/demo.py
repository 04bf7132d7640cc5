"""`lesiongen demo`: the whole procedure on the project's toy data with a small in-house base, on CPU.

It is the shipped `configs/demo.yaml` run as a loop (so it resumes like one) followed by the report; the
table it prints is read back from the run's own metrics files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from lesiongen.loop.summary import DEMO_STATEMENT

DEMO_CONFIG = "demo"


def run_demo(out: str | os.PathLike, *, overwrite: bool = False, echo: Callable[[str], None] = print) -> Path:
    from lesiongen.loop.layout import RunLayout
    from lesiongen.loop.run import create_run, run_loop
    from lesiongen.report import write_report
    from lesiongen.runs import RunDir, current_processes
    from lesiongen.utils.outdir import OutputFolder, removed_on_failure

    started = time.monotonic()
    out = Path(out)
    echo(_banner())
    config = demo_config()
    folder = OutputFolder(out, "loop")  # refuses a file, or a folder of anything but a loop run
    created = None
    if folder.existing and not overwrite:
        check_is_demo(out, config)
        echo(f"resuming the demo in {out} (finished stages are kept; --overwrite starts again)")
    else:
        created = not (out.is_dir() and not any(out.iterdir()))
        create_run(config, out, overwrite=overwrite)
        echo(f"demo run folder: {out}")
    with removed_on_failure(out, lambda path: RunDir(path).holds_progress(besides=(RunLayout.DATA,)),
                            existed=not created,
                            active=created is not None and current_processes().is_main_process):
        outcome = run_loop(out, echo=echo)
    paths = write_report(outcome.run_dir)
    echo("")
    echo(results_text(outcome.run_dir))
    echo("")
    echo(DEMO_STATEMENT)
    echo(f"report: {paths.html}\n        {paths.markdown}")
    echo(f"demo wall time: {_minutes(time.monotonic() - started)}")
    return outcome.run_dir


def demo_config():
    """The demo's resolved loop config (the shipped `configs/demo.yaml`)."""
    from lesiongen.config import shipped_config
    from lesiongen.loop.config import load_loop_config

    return load_loop_config(shipped_config(DEMO_CONFIG))


def check_is_demo(run_dir: Path, config) -> None:
    """Only the demo's own runs are resumed as the demo: the run's saved config must be the demo's."""
    import yaml

    from lesiongen.errors import OutputExistsError
    from lesiongen.loop.config import config_yaml, load_resolved
    from lesiongen.runs import CONFIG_FILE

    saved = run_dir / CONFIG_FILE
    try:
        theirs = yaml.safe_load(config_yaml(load_resolved(saved)))
    except Exception:  # an unreadable or invalid config is not the demo's either
        theirs = None
    ours = yaml.safe_load(config_yaml(config))
    if theirs != ours:
        differ = sorted(k for k in set(ours) | set(theirs or {}) if (theirs or {}).get(k) != ours.get(k))
        raise OutputExistsError(f"{run_dir} holds a loop run that is not the demo (its {CONFIG_FILE} differs from "
                                f"the demo's in: {', '.join(differ)}); choose another --out, or pass --overwrite to "
                                "replace that run with the demo")


def results_text(run_dir: Path) -> str:
    """The before/after table of the run, as Markdown, from its metrics.json."""
    import json

    from lesiongen.report.document import Document, to_markdown
    from lesiongen.report.tables import Results, headline_table

    summary = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    doc = Document("Before and after (test split of the toy data)").add(headline_table(Results(summary)))
    return to_markdown(doc, "report_assets").strip()


def _banner() -> str:
    return ("lesiongen demo: procedural toy dermoscopy images + the tiny diffusion base shipped in the package\n"
            "(pretrained from scratch on other toy images, on CPU; lesiongen/assets/README.md).\n"
            "This is a DEMONSTRATION of the pipeline (data -> base -> adapt -> mine -> invert -> vary -> filter\n"
            "-> retrain -> report), not a result: real use needs real images and a real Stable Diffusion.")


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"
