"""A plain-text progress display for a run: which stage is running, how far the run is, how long it took.

One line when a stage starts and one when it ends, so it reads the same in a terminal, a log file and a
CI job; the stages' own progress bars (training epochs, generation batches) appear in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lesiongen.runs import Stage


class StageProgress:
    def __init__(self, total: int, echo: Callable[[str], None] = print) -> None:
        self.total = total
        self.echo = echo
        self.index = 0
        self.skipped = 0
        self.started = time.monotonic()

    def __call__(self, event: str, stage: Stage, info: dict[str, Any]) -> None:
        if event == "skip":
            self.index += 1
            self.skipped += 1
            return
        if event == "start":
            self.index += 1
            if self.skipped:
                self.echo(f"  (skipped {self.skipped} finished stage(s) of an earlier attempt)")
                self.skipped = 0
            position = f"{self.index:>{len(str(self.total))}}/{self.total}"
            self.echo(f"[{position} {self._clock()}] {stage.title}  ({stage.name})")
        elif event == "done":
            details = summary_text(info.get("summary", {}))
            self.echo(f"    done in {info.get('seconds', 0):.1f} s" + (f": {details}" if details else ""))

    def finish(self) -> None:
        if self.skipped:
            self.echo(f"  (skipped {self.skipped} finished stage(s))")
        self.echo(f"all {self.total} stages finished [{self._clock()}]")

    def _clock(self) -> str:
        seconds = int(time.monotonic() - self.started)
        return f"{seconds // 60:d}:{seconds % 60:02d}"


def summary_text(summary: dict[str, Any], limit: int = 4) -> str:
    """The first few scalar entries of a stage summary, e.g. 'mined=12, balanced_accuracy=0.613'."""
    parts = []
    for key, value in summary.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.3f}")
        elif isinstance(value, (int, str)) and len(str(value)) < 40:
            parts.append(f"{key}={value}")
        if len(parts) == limit:
            break
    return ", ".join(parts)
