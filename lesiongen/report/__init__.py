"""The before/after report of a loop run: `report.md` (+ PNGs in `report_assets/`) and one
self-contained `report.html` with the same content and its images embedded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ASSETS_DIR = "report_assets"


@dataclass
class ReportPaths:
    markdown: Path
    html: Path


def write_report(run_dir: str | os.PathLike) -> ReportPaths:
    from lesiongen.report.build import build_document
    from lesiongen.report.document import to_html, to_markdown, write_figures
    from lesiongen.utils.atomic import write_text

    run_dir = Path(run_dir)
    doc = build_document(run_dir)
    write_figures(doc, run_dir / ASSETS_DIR)
    markdown = write_text(run_dir / "report.md", to_markdown(doc, ASSETS_DIR))
    html = write_text(run_dir / "report.html", to_html(doc))
    return ReportPaths(markdown, html)
