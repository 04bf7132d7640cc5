"""Precision / recall / density / coverage against the reference definitions (Naeem et al. 2020)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lesiongen.errors import InputError
from lesiongen.metrics.manifold import kth_neighbour_radii, prdc


def reference_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """The formulas of clovaai/generative-evaluation-prdc (`compute_prdc`), with full distance matrices."""
    def distances(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def radii(x):
        return np.sort(distances(x, x), axis=1)[:, k]  # column 0 is the point itself

    real_radii, fake_radii = radii(real), radii(fake)
    d = distances(real, fake)
    return {
        "precision": (d < real_radii[:, None]).any(axis=0).mean(),
        "recall": (d < fake_radii[None, :]).any(axis=1).mean(),
        "density": (1 / k) * (d < real_radii[:, None]).sum(axis=0).mean(),
        "coverage": (d.min(axis=1) < real_radii).mean(),
    }


@pytest.mark.parametrize("shift", [0.0, 0.7, 4.0])
def test_matches_reference_across_chunks(shift, monkeypatch):
    monkeypatch.setattr("lesiongen.metrics.manifold._CHUNK", 64)  # several chunks on a small problem
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 10))
    fake = rng.normal(size=(250, 10)) + shift
    ours = prdc(torch.from_numpy(real), torch.from_numpy(fake), k=5)
    expected = reference_prdc(real, fake, 5)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name
    assert (ours["n_real"], ours["n_synthetic"], ours["k"]) == (300, 250, 5)


def test_matching_and_disjoint_distributions():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(2000, 8, generator=generator)
    same = torch.randn(2000, 8, generator=generator)
    matched = prdc(real, same, k=5)
    assert matched["precision"] > 0.7 and matched["recall"] > 0.7
    assert matched["density"] == pytest.approx(1.0, abs=0.1)
    assert matched["coverage"] == pytest.approx(1 - 0.5 ** 5, abs=0.03)  # Naeem et al.: 1 - 2^-k
    far = prdc(real, same + 20.0, k=5)
    assert far == {**far, "precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_collapsed_generator_has_precision_but_no_recall():
    """Mode collapse: every synthetic point near one real point -> high precision, low recall/coverage."""
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(1000, 4, generator=generator)
    collapsed = real[:1] + 0.01 * torch.randn(500, 4, generator=generator)
    result = prdc(real, collapsed, k=5)
    assert result["precision"] == 1.0
    assert result["recall"] < 0.05 and result["coverage"] < 0.05


def test_radii_exclude_the_point_itself():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert kth_neighbour_radii(points, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]


def test_too_few_points_or_mismatched_dims():
    with pytest.raises(InputError, match="more than 5 points"):
        prdc(torch.randn(5, 3), torch.randn(20, 3), k=5)
    with pytest.raises(InputError, match="same D"):
        prdc(torch.randn(20, 3), torch.randn(20, 4))
