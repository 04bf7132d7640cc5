"""Percentile bootstrap confidence intervals with lesion-level (cluster) resampling.

Images of one lesion (`group_id`) are correlated, so resampling images would make intervals too narrow.
Each resample draws lesions with replacement and keeps all images of every drawn lesion; it is expressed
as per-image weights (how many times the image's lesion was drawn), which every functional metric in
`lesiongen.metrics.clinical` accepts as `sample_weight`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

Statistic = Callable[[Tensor], dict[str, float]]


def group_indices(groups: Sequence) -> Tensor:
    """Map each image's group id to 0..G-1 (ids compared as strings)."""
    _, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return torch.from_numpy(inverse.astype(np.int64))


def resample_weights(groups: Sequence, n_resamples: int, seed: int = 0) -> Iterator[Tensor]:
    """Yield `n_resamples` per-image weight vectors, one lesion-level bootstrap draw each."""
    index = group_indices(groups)
    n_groups = int(index.max()) + 1 if len(index) else 0
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n_resamples):
        drawn = torch.randint(n_groups, (n_groups,), generator=generator)
        counts = torch.bincount(drawn, minlength=n_groups).double()
        yield counts[index]


def bootstrap_distribution(statistic: Statistic, groups: Sequence, n_resamples: int = 1000,
                           seed: int = 0) -> dict[str, np.ndarray]:
    """name -> the statistic's values over the resamples (NaN where a resample leaves it undefined)."""
    values: dict[str, list[float]] = {}
    for weights in resample_weights(groups, n_resamples, seed):
        for name, value in statistic(weights).items():
            values.setdefault(name, []).append(value)
    return {name: np.asarray(v, dtype=np.float64) for name, v in values.items()}


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float] | None:
    """The central `confidence` interval of the finite samples; None when none is finite."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_ci(statistic: Statistic, groups: Sequence, n_resamples: int = 1000, seed: int = 0,
                 confidence: float = 0.95) -> dict[str, tuple[float, float] | None]:
    """name -> (low, high) percentile interval of `statistic(weights)` under lesion-level resampling."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    distribution = bootstrap_distribution(statistic, groups, n_resamples, seed)
    return {name: percentile_interval(samples, confidence) for name, samples in distribution.items()}
