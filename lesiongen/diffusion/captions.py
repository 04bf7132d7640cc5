"""Training captions: the prompt file's templates filled with the class token and the row's metadata.

An empty caption replaces the real one with probability `dropout`, so the model also learns the
unconditional prediction that classifier-free guidance subtracts at generation time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lesiongen.data.prompts import PromptSet


@dataclass
class CaptionSampler:
    """Caption `i` of the training set under a caller-supplied RNG (so a resumed run draws the same)."""

    prompts: PromptSet
    labels: list[str]
    rows: list[dict]  # manifest metadata per sample, read by the templates' {site} {age} {sex}
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"caption dropout must be in [0, 1), got {self.dropout}")
        if len(self.labels) != len(self.rows):
            raise ValueError("one metadata row per label is required")
        for label in set(self.labels):
            self.prompts.get(label)  # every label needs a class in the prompt file

    def __call__(self, index: int, rng: random.Random) -> str:
        if self.dropout and rng.random() < self.dropout:
            return ""
        return self.prompts.caption(self.labels[index], self.rows[index], rng)

    def batch(self, indices: list[int], rng: random.Random) -> list[str]:
        return [self(i, rng) for i in indices]
