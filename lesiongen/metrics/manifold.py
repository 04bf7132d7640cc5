"""Precision, recall, density and coverage: k-NN manifold estimates of fidelity and diversity.

Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative Models" (ICML 2020), with the
same definitions as their reference code (`prdc.compute_prdc`):

* each real point gets a ball whose radius is the distance to its k-th nearest real neighbour (the
  same for synthetic points among themselves);
* precision: share of synthetic points inside at least one real ball (fidelity);
* recall: share of real points inside at least one synthetic ball (diversity);
* density: real balls containing a synthetic point, per synthetic point, divided by k (about 1 when the
  distributions match; it is not bounded by 1, and rewards synthetic points in dense real regions);
* coverage: share of real balls that contain at least one synthetic point (about 1 - 2^-k for matching
  distributions; robust to outliers).

Distances are Euclidean, in float64, computed in chunks so 10^4 x 10^4 sets fit in little memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lesiongen.errors import InputError

DEFAULT_K = 5
_CHUNK = 1024


def kth_neighbour_radii(features: Tensor, k: int = DEFAULT_K) -> Tensor:
    """Distance from each row to its k-th nearest other row (the row itself excluded)."""
    if len(features) <= k:
        raise InputError(f"k-NN radii with k={k} need more than {k} points, got {len(features)}")
    x = features.to(torch.float64)
    radii = []
    for start in range(0, len(x), _CHUNK):
        # k + 1 smallest includes the point itself at distance 0 (as in the reference implementation)
        radii.append(torch.cdist(x[start:start + _CHUNK], x).topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(radii)


def prdc(real: Tensor, fake: Tensor, k: int = DEFAULT_K) -> dict:
    """Precision / recall / density / coverage of `fake` against `real` features (N, D)."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise InputError("feature sets must be (N, D) with the same D, "
                         f"got {tuple(real.shape)} and {tuple(fake.shape)}")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    real_radii = kth_neighbour_radii(real, k)
    fake_radii = kth_neighbour_radii(fake, k)
    real64, fake64 = real.to(torch.float64), fake.to(torch.float64)
    inside_real_ball = torch.zeros(len(fake), dtype=torch.bool)
    real_balls_hit = torch.zeros(len(fake), dtype=torch.float64)
    recalled = torch.zeros(len(real), dtype=torch.bool)
    covered = torch.zeros(len(real), dtype=torch.bool)
    for start in range(0, len(real), _CHUNK):
        rows = slice(start, start + _CHUNK)
        distances = torch.cdist(real64[rows], fake64)  # (chunk of real, fake)
        inside = distances < real_radii[rows, None]
        inside_real_ball |= inside.any(dim=0)
        real_balls_hit += inside.sum(dim=0)
        recalled[rows] = (distances < fake_radii[None, :]).any(dim=1)
        covered[rows] = distances.min(dim=1).values < real_radii[rows]
    return {
        "precision": float(inside_real_ball.double().mean()),
        "recall": float(recalled.double().mean()),
        "density": float(real_balls_hit.mean() / k),
        "coverage": float(covered.double().mean()),
        "k": k,
        "n_real": len(real),
        "n_synthetic": len(fake),
    }
