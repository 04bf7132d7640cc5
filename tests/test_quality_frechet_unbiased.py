"""FD∞: the bias-corrected Fréchet distance in the leading principal directions (frechet_unbiased)."""

from __future__ import annotations

import pytest
import torch

from lesiongen.errors import InputError
from lesiongen.metrics.fid import distribution_distances, frechet_distance
from lesiongen.metrics.frechet_unbiased import frechet_distance_infinity, gaussian_frechet, min_images


def gaussian(n: int, std: torch.Tensor, seed: int, shift: torch.Tensor | None = None) -> torch.Tensor:
    sample = torch.randn(n, len(std), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * std
    return sample if shift is None else sample + shift


def test_two_samples_of_one_gaussian_are_near_zero_where_plain_fd_is_not():
    """64-d, 600 per set: the plain FD of identical distributions is ~3.6 (its finite-sample bias)."""
    std = torch.ones(64, dtype=torch.float64)
    real, fake = gaussian(600, std, seed=0), gaussian(600, std, seed=1)
    plain = frechet_distance(real, fake)
    result = frechet_distance_infinity(real, fake, components=16)
    assert plain > 3.0
    assert result.fd_k > 0.25  # still biased in 16 directions before the extrapolation...
    assert abs(result.fd_inf) < 0.25  # ...and not after it (seed scatter: sd 0.07 over 20 seeds)
    assert result.slope == pytest.approx(result.fd_k - result.fd_inf, rel=0.3)


def test_shifted_and_scaled_gaussians_give_the_closed_form_in_the_leading_directions():
    """Variance 1 in 32 dimensions (0.01 in 64 more), the other set scaled 1.5x there and shifted by 1:
    |m1 - m2|^2 + sum (s1 - s2)^2 = 1 + 32 * 0.25 = 9; the 64 quiet dimensions add nothing."""
    std = torch.full((96,), 0.1, dtype=torch.float64)
    std[:32] = 1.0
    scale = torch.ones(96, dtype=torch.float64)
    scale[:32] = 1.5
    shift = torch.zeros(96, dtype=torch.float64)
    shift[0] = 1.0
    real, fake = gaussian(800, std, seed=2), gaussian(800, std * scale, seed=3, shift=shift)
    result = frechet_distance_infinity(real, fake, components=32)
    assert result.fd_inf == pytest.approx(9.0, rel=0.07)
    assert result.fd_k > result.fd_inf  # the extrapolation removed an upward bias
    assert result.components == 32 and result.fractions[-1] == 1.0


def test_gaussian_frechet_closed_form_and_symmetry():
    cov1 = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))
    cov2 = torch.diag(torch.tensor([4.0, 4.0, 1.0], dtype=torch.float64))
    mean1, mean2 = torch.zeros(3, dtype=torch.float64), torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    expected = 9.0 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2  # commuting covariances: sum of (sqrt a - sqrt b)^2
    assert gaussian_frechet(mean1, cov1, mean2, cov2) == pytest.approx(expected, abs=1e-10)
    assert gaussian_frechet(mean2, cov2, mean1, cov1) == pytest.approx(expected, abs=1e-10)


def test_seeded_and_fewer_dimensions_than_components():
    std = torch.ones(8, dtype=torch.float64)
    real, fake = (gaussian(300, std, seed=4),
                  gaussian(300, std, seed=5, shift=torch.full((8,), 0.5, dtype=torch.float64)))
    first = frechet_distance_infinity(real, fake, seed=7)
    assert first == frechet_distance_infinity(real, fake, seed=7)
    assert first.components == 8  # 8-d features: all of them, i.e. FD∞ of the full distributions
    assert first.fd_inf == pytest.approx(8 * 0.25, rel=0.15)


def test_too_few_images_are_refused_or_reported_with_a_reason():
    std = torch.ones(64, dtype=torch.float64)
    real, fake = gaussian(200, std, seed=0), gaussian(200, std, seed=1)
    assert min_images(16) == 160 and min_images(64) == 640
    with pytest.raises(InputError, match=r"needs >= 640 feature vectors per set .* got 200 and 200"):
        frechet_distance_infinity(real, fake)
    with pytest.raises(InputError, match="two distinct subset fractions"):
        frechet_distance_infinity(real, fake, components=4, fractions=(1.0,))
    report = distribution_distances(real, fake, kid_subsets=2, kid_subset_size=50)
    assert report["fid"] is not None and report["fd_inf"] is None
    assert "FD∞ in 64 principal directions needs >= 640 images per set" in report["fd_inf_note"]
    reported = distribution_distances(real, fake, kid_subsets=2, kid_subset_size=50, fd_inf_components=16)
    assert reported["fd_inf"] is not None and reported["fd_inf_components"] == 16
    assert reported["fd_inf"] < 0.1 * reported["fid"]
    skipped = distribution_distances(real, fake, kid_subsets=2, kid_subset_size=50, fd_inf_components=0)
    assert skipped["fd_inf"] is None and "fd_inf_note" not in skipped
