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
    from lesiongen.loop.config import load_loop_config, shipped_config
    from lesiongen.loop.run import create_run, run_loop
    from lesiongen.report import write_report
    from lesiongen.runs import STATE_FILE

    started = time.monotonic()
    out = Path(out)
    echo(_banner())
    if (out / STATE_FILE).is_file() and not overwrite:
        echo(f"resuming the demo in {out} (finished stages are kept; --overwrite starts again)")
    else:
        create_run(load_loop_config(shipped_config(DEMO_CONFIG)), out, overwrite=overwrite)
        echo(f"demo run folder: {out}")
    outcome = run_loop(out, echo=echo)
    paths = write_report(outcome.run_dir)
    echo("")
    echo(results_text(outcome.run_dir))
    echo("")
    echo(DEMO_STATEMENT)
    echo(f"report: {paths.html}\n        {paths.markdown}")
    echo(f"demo wall time: {_minutes(time.monotonic() - started)}")
    return outcome.run_dir


def results_text(run_dir: Path) -> str:
    """The before/after table of the run, as Markdown, from its metrics.json."""
    import json

    from lesiongen.report.document import Document, to_markdown
    from lesiongen.report.tables import Results, headline_table

    summary = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    doc = Document("Before and after (test split of the toy data)").add(headline_table(Results(summary)))
    return to_markdown(doc, "report_assets").strip()


def _banner() -> str:
    return ("lesiongen demo: procedural toy dermoscopy images + a small diffusion base trained here on CPU.\n"
            "This is a DEMONSTRATION of the pipeline (data -> base -> adapt -> mine -> invert -> vary -> filter\n"
            "-> retrain -> report), not a result: real use needs real images and a real Stable Diffusion.")


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"
