"""Fréchet and kernel distances (FID / KID) between two sets of features, through torchmetrics.

Features are computed once per image set (Inception, or a dermoscopy classifier's penultimate layer)
and handed to torchmetrics' `FrechetInceptionDistance` / `KernelInceptionDistance` through an identity
"feature extractor", so the overall score, every per-class score and every feature space use the
same, reference-tested statistics code without running a network twice.

FID needs a full-rank covariance: more images than feature dimensions in *both* sets. Below that the
Fréchet distance is dominated by the rank deficiency, so it is not reported; KID (an unbiased MMD
estimate, valid at any size >= 2) is, and the note says so. Even above it the plain FD is biased upward
by roughly D^2 / n, so beside it `distribution_distances` reports FD∞, a bias-corrected Fréchet distance
in the leading principal directions (`lesiongen.metrics.frechet_unbiased`, which explains the method).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from lesiongen.errors import InputError
from lesiongen.metrics.frechet_unbiased import DEFAULT_COMPONENTS, frechet_distance_infinity, min_images

DEFAULT_KID_SUBSETS = 100
DEFAULT_KID_SUBSET_SIZE = 1000


class PrecomputedFeatures(nn.Module):
    """Identity feature extractor: torchmetrics' metrics then accumulate features given to `update`."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


@torch.no_grad()
def extract_inception_features(images: Tensor, feature: int = 2048, *, batch_size: int = 64,
                               device: str | torch.device = "cpu") -> Tensor:
    """Standard FID Inception features (N, feature) of uint8 images (N, 3, H, W); float64 on CPU."""
    from lesiongen.metrics.inception import inception_network

    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"Inception features need uint8 images (N, 3, H, W), got {tuple(images.shape)} {images.dtype}")
    network = inception_network(feature, str(device))
    chunks = [network(images[i:i + batch_size].to(device)).to("cpu", torch.float64)
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, feature, dtype=torch.float64)


def _check_features(real: Tensor, fake: Tensor) -> None:
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise InputError("feature sets must be (N, D) with the same D, "
                         f"got {tuple(real.shape)} and {tuple(fake.shape)}")


def fid_shortfall(n_real: int, n_fake: int, dim: int) -> str | None:
    """Why FID cannot be trusted at these sizes, or None when it can."""
    if min(n_real, n_fake) > dim:
        return None
    return (f"FID needs more images than feature dimensions ({dim}) in both sets for a full-rank covariance; "
            f"got {n_real} real and {n_fake} synthetic")


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (torchmetrics' FID statistics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_features(real, fake)
    if min(len(real), len(fake)) < 2:
        raise InputError(f"the Fréchet distance needs >= 2 feature vectors per set, got {len(real)} and {len(fake)}")
    # sync_on_compute=False: the caller holds every feature already; under `accelerate launch` a sync would
    # wait for processes that are not computing this metric (the loop runs it on the main process only).
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), sync_on_compute=False)
    metric.update(real.to(torch.float64), real=True)
    metric.update(fake.to(torch.float64), real=False)
    return max(float(metric.compute()), 0.0)  # tiny negative values are round-off of sqrtm


def kernel_distance(real: Tensor, fake: Tensor, *, subsets: int = DEFAULT_KID_SUBSETS,
                    subset_size: int = DEFAULT_KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float, int]:
    """KID (mean, std over random subsets, subset size used); subsets shrink to the smaller set."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_features(real, fake)
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise InputError(f"KID needs >= 2 feature vectors per set, got {len(real)} and {len(fake)}")
    with warnings.catch_warnings():  # "will save all extracted features in buffer": that is the point here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets,
                                         subset_size=size, sync_on_compute=False)
    metric.update(real.to(torch.float64), real=True)
    metric.update(fake.to(torch.float64), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws subsets from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def distribution_distances(real: Tensor, fake: Tensor, *, kid_subsets: int = DEFAULT_KID_SUBSETS,
                           kid_subset_size: int = DEFAULT_KID_SUBSET_SIZE,
                           fd_inf_components: int = DEFAULT_COMPONENTS, seed: int = 0) -> dict:
    """FID (when the sizes allow it), FD∞ (likewise; 0 components skips it) and KID between two feature
    sets, with the counts they rest on."""
    _check_features(real, fake)
    report: dict = {"n_real": len(real), "n_synthetic": len(fake), "feature_dim": real.shape[1],
                    "fid": None, "fd_inf": None, "kid_mean": None, "kid_std": None, "kid_subset_size": None,
                    "note": None}
    if min(len(real), len(fake)) < 2:
        report["note"] = f"needs >= 2 images per set, got {len(real)} real and {len(fake)} synthetic"
        return report
    shortfall = fid_shortfall(len(real), len(fake), real.shape[1])
    if shortfall is None:
        report["fid"] = frechet_distance(real, fake)
    report["note"] = shortfall and f"{shortfall}. Compare by KID (reported beside it), or use more images"
    if fd_inf_components:
        components = min(fd_inf_components, real.shape[1])
        if min(len(real), len(fake)) >= min_images(components):
            report.update(frechet_distance_infinity(real, fake, components=components, seed=seed).as_dict())
        else:
            report["fd_inf_note"] = (f"FD∞ in {components} principal directions needs >= {min_images(components)} "
                                     f"images per set; got {len(real)} real and {len(fake)} synthetic")
    report["kid_mean"], report["kid_std"], report["kid_subset_size"] = kernel_distance(
        real, fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    return report
