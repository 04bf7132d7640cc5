"""Fit a stage's step count to a wall-clock budget, once, from its own measured speed.

A GPU lent for a quarter of an hour, or a CPU run that must end before a meeting, knows its minutes,
not the step count a recipe reaches in them. `StageFitter` times a short stretch of a stage after a few
warm-up steps (compilation, allocator and cache warm-up are not representative), then plans the stage to
end when its share of the budget is spent. The plan is stored in the checkpoint state, so a resumed run
keeps the step count its learning-rate schedule was built for instead of re-fitting it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

WARMUP_STEPS = 10  # untimed: the first steps compile, allocate and fill caches
TIMED_STEPS = 20  # the stretch whose mean step time plans the rest


@dataclass
class StageFitter:
    """Plans a stage to end `seconds_left` after this fitter is made (or at `max_steps`, if sooner)."""

    max_steps: int
    seconds_left: float
    device: torch.device
    warmup_steps: int = WARMUP_STEPS
    timed_steps: int = TIMED_STEPS
    _start: tuple[int, float] | None = None  # (step, time) where the timed stretch began

    def observe(self, step: int) -> int | None:
        """Call after each finished step (`step` steps done); returns the planned step count once known."""
        if self.seconds_left <= 0:
            return max(step, 1)  # the budget was spent before this stage began: end it now
        if self._start is None:
            if step >= self.warmup_steps:
                self._start = (step, self._now())
            return None
        first_step, started = self._start
        if step - first_step < self.timed_steps:
            return None
        now = self._now()
        per_step = (now - started) / (step - first_step)
        # the budget counts from where the fitter was made; the warm-up steps were part of it
        remaining = self.seconds_left - (now - self._made)
        planned = step + max(0, math.floor(remaining / per_step))
        return max(step, min(self.max_steps, planned))

    def __post_init__(self) -> None:
        self._made = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # twice per stage: queued GPU work must count
        return time.monotonic()
