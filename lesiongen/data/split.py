"""Lesion-aware, class-stratified train / val / test split.

The split unit is the group (lesion): all images of a lesion land in one split, otherwise a classifier
is tested on another photo of a lesion it trained on. Within each class the groups are shuffled with
the seed; every split with a positive fraction first gets one group (so every class appears in every
split when it has enough groups), then the remaining groups, largest first, go to whichever split is
furthest below its share of that class's images. The result depends only on the (image, label, group)
content and the seed, not on row order.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lesiongen.data.manifest import SPLITS


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of images per split (train, val, test) and the seed of the group shuffle."""

    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0

    def __post_init__(self) -> None:
        fractions = tuple(float(f) for f in self.fractions)
        if len(fractions) != len(SPLITS):
            raise ValueError(f"fractions must give {len(SPLITS)} values for {list(SPLITS)}, got {self.fractions}")
        if any(f < 0 or not math.isfinite(f) for f in fractions):
            raise ValueError(f"fractions must be >= 0, got {self.fractions}")
        if fractions[0] <= 0:
            raise ValueError(f"the train fraction must be > 0, got {self.fractions}")
        if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
            raise ValueError(f"fractions must sum to 1, got {self.fractions} (sum {sum(fractions):.6g})")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        object.__setattr__(self, "fractions", fractions)


def group_labels(labels: Sequence[str], groups: Sequence[str], classes: Sequence[str]) -> dict[str, str]:
    """Each group's label: its most frequent image label, ties broken by class order (a lesion
    photographed twice is normally labelled the same; this only decides where a rare mixed group goes)."""
    order = {c: i for i, c in enumerate(classes)}
    counts: dict[str, Counter] = defaultdict(Counter)
    for label, group in zip(labels, groups):
        counts[group][label] += 1
    return {g: min(c, key=lambda label: (-c[label], order.get(label, len(order)))) for g, c in counts.items()}


def assign_splits(labels: Sequence[str], groups: Sequence[str], classes: Sequence[str],
                  config: SplitConfig = SplitConfig()) -> list[str]:
    """The split name of every image; images of one group always share it."""
    if len(labels) != len(groups):
        raise ValueError(f"{len(labels)} labels but {len(groups)} groups")
    sizes = Counter(groups)
    by_class: dict[str, list[str]] = defaultdict(list)
    for group, label in group_labels(labels, groups, classes).items():
        by_class[label].append(group)
    split_of_group: dict[str, str] = {}
    # Classes outside `classes` still get split (after the known ones) so no image is left without one.
    ordered = list(classes) + sorted(set(by_class) - set(classes))
    for class_index, label in enumerate(ordered):
        members = sorted(by_class.get(label, []))
        rng = np.random.default_rng([config.seed, class_index])  # per class: adding a class moves no other
        shuffled = [members[i] for i in rng.permutation(len(members))]
        split_of_group.update(_split_one_class(shuffled, sizes, config.fractions))
    return [split_of_group[g] for g in groups]


def _split_one_class(groups: list[str], sizes: Counter, fractions: tuple[float, ...]) -> dict[str, str]:
    total = sum(sizes[g] for g in groups)
    targets = [f * total for f in fractions]
    filled = [0] * len(SPLITS)
    assignment: dict[str, str] = {}

    def put(group: str, split_index: int) -> None:
        assignment[group] = SPLITS[split_index]
        filled[split_index] += sizes[group]

    active = [i for i, f in enumerate(fractions) if f > 0]
    rest = groups
    if len(groups) >= len(active):
        for split_index, group in zip(active, groups):
            put(group, split_index)
        rest = groups[len(active):]
    # Largest first (stable, so equal sizes keep the seeded order): the big lesions are placed while
    # there is room, the single images fine-tune the proportions.
    for group in sorted(rest, key=lambda g: -sizes[g]):
        deficits = [targets[i] - filled[i] if i in active else -math.inf for i in range(len(SPLITS))]
        put(group, int(np.argmax(deficits)))
    return assignment
