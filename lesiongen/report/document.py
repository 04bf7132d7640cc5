"""A report as a list of blocks, rendered twice: Markdown (images as files beside it) and one
self-contained HTML page (images embedded as base64 data URIs, no external requests)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Callout:
    """A boxed note; `kind` 'warning' is drawn in red at the top of the page (leakage, demo data)."""

    text: str
    kind: str = "note"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    name: str  # file stem under the assets folder, unique within a report
    png: bytes
    caption: str = ""


@dataclass
class Document:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> Document:
        self.blocks.extend(blocks)
        return self

    def figures(self) -> list[Figure]:
        return [b for b in self.blocks if isinstance(b, Figure)]


def to_markdown(doc: Document, assets_dir_name: str) -> str:
    lines = [f"# {doc.title}", ""]
    for block in doc.blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Callout):
            prefix = "**WARNING:** " if block.kind == "warning" else "**Note:** "
            lines += ["> " + prefix + block.text, ""]
        elif isinstance(block, Table):
            if block.caption:
                lines += [f"*{block.caption}*", ""]
            lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            lines.append("|" + "|".join(" --- " for _ in block.header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        elif isinstance(block, Figure):
            lines += [f"![{block.name}]({assets_dir_name}/{block.name}.png)", ""]
            if block.caption:
                lines += [f"*{block.caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d2433;line-height:1.45}
h1{border-bottom:2px solid #ccd;padding-bottom:.3em}h2{margin-top:2em;border-bottom:1px solid #dde}
table{border-collapse:collapse;margin:1em 0;font-size:.88em}
th,td{border:1px solid #ccd;padding:.3em .55em;text-align:left}
th{background:#eef0f6}td{font-variant-numeric:tabular-nums}caption{caption-side:top;text-align:left;
font-style:italic;padding:.3em 0}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #dde}figcaption{font-size:.88em;color:#555}
.callout{padding:.7em 1em;border-radius:4px;margin:1em 0;border:1px solid #9ab;background:#f2f6fb}
.callout.warning{border:2px solid #b00;background:#fff0f0;color:#600;font-weight:600}
"""


def to_html(doc: Document) -> str:
    body: list[str] = [f"<h1>{html.escape(doc.title)}</h1>"]
    for block in doc.blocks:
        if isinstance(block, Heading):
            level = min(max(block.level, 2), 6)
            body.append(f"<h{level}>{html.escape(block.text)}</h{level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Callout):
            label = "WARNING: " if block.kind == "warning" else ""
            body.append(f'<div class="callout {html.escape(block.kind)}">{label}{html.escape(block.text)}</div>')
        elif isinstance(block, Table):
            caption = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                           for row in block.rows)
            body.append(f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png).decode("ascii")
            alt = html.escape(block.caption or block.name)
            caption = f"<figcaption>{html.escape(block.caption)}</figcaption>" if block.caption else ""
            body.append(f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{caption}</figure>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(doc.title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_figures(doc: Document, assets_dir: Path) -> None:
    from lesiongen.utils.atomic import write_bytes

    names = set()
    for figure in doc.figures():
        write_bytes(assets_dir / f"{figure.name}.png", figure.png)
        names.add(f"{figure.name}.png")
    # a figure of an earlier report that this one no longer draws (an arm dropped, a round removed) would
    # sit beside the new ones as if current
    for stale in assets_dir.glob("*.png") if assets_dir.is_dir() else ():
        if stale.name not in names:
            stale.unlink()
