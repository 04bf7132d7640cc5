"""Memorisation check: the nearest real training image of every synthetic image, and a flag.

Two independent distances, each with its own threshold:

* **Perceptual hash** (pHash, Zauner 2010; the `imagehash.phash` recipe run in torch so it is batched):
  grayscale (ITU-R 601 luma), resize to 4*hash_size px (bicubic, antialiased), 2-D DCT-II, keep the
  hash_size x hash_size lowest frequencies, one bit per coefficient above their median. With
  `hash_size=8` the bits agree with `imagehash.phash` (0.3 of 64 bits differ on average, from the
  resize filter). The default is `hash_size=16` (256 bits) because 64 bits cannot tell dermoscopy
  images apart: on derm-dev (128 px) 1 % of images have a *different lesion* within 6 of 64 bits,
  while JPEG q=75 copies move up to 4 bits. With 256 bits, 2,000 derm-dev images matched against all
  12,753 in 8 orientations have their nearest different lesion >= 26 bits away (0.1 % quantile 34;
  the one pair below, at 16 bits, is the same photo listed twice in ISIC 2017), while JPEG q=75 copies
  stay <= 18 bits (q=50: 99 % <= 18, max 26) and 0.5-0.9x resizes <= 4. Hence
  `DEFAULT_PHASH_THRESHOLD = 24`.
  Every query is hashed in its 8 orientations (flips x 90-degree rotations), since a generator trained
  with those augmentations can reproduce a training image in any of them.
* **Feature cosine distance** (optional, any feature function: e.g. the project classifier's
  penultimate features). Feature scales differ between extractors, so by default the threshold is
  calibrated on the real set itself: half (`FEATURE_MARGIN`) the `feature_quantile` (0.1 %) quantile of
  each real image's distance to its nearest real image of *another lesion* (group). A synthetic image
  that close to a training image is nearer to it than real new lesions ever are; the margin keeps the
  false-flag rate of genuinely new images low when the real set is small (the quantile of a few
  hundred distances is about their minimum). Classifier features are not copy-detection features:
  with a quickly trained derm-dev EfficientNet-Lite0 (128 px) a JPEG q=75 copy moves 0.32 in cosine
  distance on average (a different lesion is >= 0.23 away, the auto threshold was 0.12), so the hash
  is what catches re-encoded copies and the features add exact and near-exact ones.

An image is flagged when either distance is at or below its threshold. `score` is the smaller of the
two distances divided by its threshold, so `score <= 1` means flagged and a lower score a closer copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from lesiongen.data.near_duplicates import DEFAULT_PHASH_THRESHOLD  # bits of 256; the docstring says why 24
from lesiongen.errors import InputError

DEFAULT_HASH_SIZE = 16
DEFAULT_FEATURE_QUANTILE = 0.001
FEATURE_MARGIN = 0.5
_CALIBRATION_SAMPLE = 2000  # real images used to calibrate the feature threshold (against all)
_QUERY_CHUNK = 256

FeatureFn = Callable[[Tensor], Tensor]


def _check_images(images: Tensor, what: str) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, Tensor) else None
        raise InputError(f"{what}: expected a uint8 tensor of shape (N, 3, H, W), got {shape} {dtype}")
    if len(images) == 0:
        raise InputError(f"{what}: no images")


def _dct_matrix(n: int) -> Tensor:
    """Unnormalised DCT-II basis (scipy's default scale does not change which bits exceed the median)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    return torch.cos(math.pi * k * (2 * i + 1) / (2 * n))


def phash_bits(images: Tensor, hash_size: int = DEFAULT_HASH_SIZE, batch_size: int = 1024) -> Tensor:
    """Perceptual hashes of uint8 images (N, 3, H, W) -> bool (N, hash_size**2), row-major bits."""
    _check_images(images, "phash_bits")
    side = 4 * hash_size
    basis = _dct_matrix(side)
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(torch.float64)
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
        gray = F.interpolate(gray, size=(side, side), mode="bicubic", antialias=True, align_corners=False)[:, 0]
        low = (basis @ gray @ basis.T)[:, :hash_size, :hash_size].reshape(len(x), -1)
        out.append(low > low.quantile(0.5, dim=1, keepdim=True))  # quantile interpolates like np.median
    return torch.cat(out)


def phash_hex(bits: Tensor) -> list[str]:
    """Hex strings in imagehash's format (first bit most significant)."""
    n_hex = bits.shape[1] // 4
    nibbles = (bits.to(torch.int64).reshape(len(bits), n_hex, 4) * torch.tensor([8, 4, 2, 1])).sum(-1)
    return ["".join("0123456789abcdef"[v] for v in row) for row in nibbles.tolist()]


def hamming_distances(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise Hamming distances between bool bit rows a (N, B) and b (M, B) -> int (N, M)."""
    af, bf = a.to(torch.float32), b.to(torch.float32)
    return (af @ (1 - bf).T + (1 - af) @ bf.T).round().to(torch.int64)  # exact: counts <= B


def dihedral_views(images: Tensor) -> list[Tensor]:
    """The 8 orientations of square images: 4 rotations of the image and of its mirror."""
    views = []
    for base in (images, images.flip(-1)):
        views.extend(torch.rot90(base, k, dims=(-2, -1)) for k in range(4))
    return views


def _normalise(features: Tensor) -> Tensor:
    return F.normalize(features.to(torch.float32), dim=1)


def nearest_cosine(query: Tensor, reference: Tensor, *, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Nearest reference row by cosine distance for each query row -> (index, distance).

    `exclude` (Nq, Nr) bool masks pairs that may not be each other's neighbour (self, same lesion).
    """
    q, r = _normalise(query), _normalise(reference)
    indices, distances = [], []
    for start in range(0, len(q), _QUERY_CHUNK * 4):
        dist = 1 - q[start:start + _QUERY_CHUNK * 4] @ r.T
        if exclude is not None:
            dist = dist.masked_fill(exclude[start:start + _QUERY_CHUNK * 4], float("inf"))
        d, i = dist.min(dim=1)
        indices.append(i)
        distances.append(d.clamp_min(0))
    return torch.cat(indices), torch.cat(distances)


@dataclass
class MemorizationResult:
    """Per synthetic image: its nearest real images, the distances and the flag (all length N)."""

    phash_index: Tensor
    phash_distance: Tensor
    feature_index: Tensor | None
    feature_distance: Tensor | None
    phash_threshold: int
    feature_threshold: float | None
    hash_bits: int

    @property
    def score(self) -> Tensor:
        """min(distance / threshold) over the available distances; <= 1 means flagged."""
        score = self.phash_distance.to(torch.float32) / self.phash_threshold
        if self.feature_distance is not None and self.feature_threshold:
            score = torch.minimum(score, self.feature_distance / self.feature_threshold)
        return score

    @property
    def flagged(self) -> Tensor:
        flagged = self.phash_distance <= self.phash_threshold
        if self.feature_distance is not None and self.feature_threshold is not None:
            flagged = flagged | (self.feature_distance <= self.feature_threshold)
        return flagged

    @property
    def nearest_index(self) -> Tensor:
        """The real image of the relatively closer match (the one that sets `score`)."""
        if self.feature_index is None or not self.feature_threshold:
            return self.phash_index
        by_feature = self.feature_distance / self.feature_threshold < self.phash_distance / self.phash_threshold
        return torch.where(by_feature, self.feature_index, self.phash_index)

    def __len__(self) -> int:
        return len(self.phash_index)

    def to_frame(self, real_ids: Sequence[str] | None = None,
                 synthetic_ids: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per synthetic image; ids name the images (e.g. manifest `image` paths)."""
        def name(ids: Sequence[str] | None, index: Tensor) -> list:
            return [ids[i] for i in index.tolist()] if ids is not None else index.tolist()

        frame = pd.DataFrame({
            "synthetic": list(synthetic_ids) if synthetic_ids is not None else range(len(self)),
            "nearest_real": name(real_ids, self.nearest_index),
            "phash_real": name(real_ids, self.phash_index),
            "phash_distance": self.phash_distance.tolist(),
        })
        if self.feature_distance is not None:
            frame["feature_real"] = name(real_ids, self.feature_index)
            frame["feature_distance"] = self.feature_distance.tolist()
        frame["score"] = self.score.tolist()
        frame["flagged"] = self.flagged.tolist()
        return frame

    def summary(self) -> dict:
        flagged = self.flagged
        summary = {
            "n_synthetic": len(self),
            "n_flagged": int(flagged.sum()),
            "share_flagged": float(flagged.float().mean()) if len(self) else 0.0,
            "phash_bits": self.hash_bits,
            "phash_threshold": self.phash_threshold,
            "phash_distance_min": int(self.phash_distance.min()),
            "phash_distance_median": float(self.phash_distance.float().median()),
            "feature_threshold": self.feature_threshold,
        }
        if self.feature_distance is not None:
            summary["feature_distance_min"] = float(self.feature_distance.min())
            summary["feature_distance_median"] = float(self.feature_distance.median())
        return summary


class MemorizationIndex:
    """Nearest-real-image search over a training set, by perceptual hash and optional features.

    Args:
        real_images: uint8 (N, 3, H, W) training images the generator saw.
        real_features: precomputed features (N, D) of `real_images`, or None.
        feature_fn: maps uint8 images to features (N, D); used for `real_features` when they are not
            given and for queries that come without features.
        groups: lesion id per real image; the feature threshold calibration ignores same-lesion
            neighbours (several photos of one lesion are not copies of each other).
        phash_threshold: flag at or below this many differing hash bits.
        feature_threshold: a cosine distance, or "auto" to calibrate it on the real set (module docstring).
        feature_quantile: the quantile used by "auto".
        orientations: also match the 8 flips/rotations of each query by hash.
    """

    def __init__(self, real_images: Tensor, *, real_features: Tensor | None = None,
                 feature_fn: FeatureFn | None = None, groups: Sequence | None = None,
                 hash_size: int = DEFAULT_HASH_SIZE, phash_threshold: int = DEFAULT_PHASH_THRESHOLD,
                 feature_threshold: float | str = "auto", feature_quantile: float = DEFAULT_FEATURE_QUANTILE,
                 orientations: bool = True) -> None:
        _check_images(real_images, "MemorizationIndex real images")
        if not 0 < phash_threshold < hash_size * hash_size:
            raise InputError(f"phash_threshold must be between 1 and {hash_size * hash_size - 1} bits, "
                             f"got {phash_threshold}")
        if not 0 < feature_quantile < 1:
            raise InputError(f"feature_quantile must be in (0, 1), got {feature_quantile}")
        if groups is not None and len(groups) != len(real_images):
            raise InputError(f"groups has {len(groups)} entries for {len(real_images)} real images")
        self.hash_size = hash_size
        self.phash_threshold = int(phash_threshold)
        self.orientations = orientations
        self.feature_fn = feature_fn
        self.real_bits = phash_bits(real_images, hash_size)
        if real_features is None and feature_fn is not None:
            real_features = feature_fn(real_images)
        if real_features is not None and len(real_features) != len(real_images):
            raise InputError(f"real_features has {len(real_features)} rows for {len(real_images)} real images")
        self.real_features = None if real_features is None else real_features.detach().to("cpu", torch.float32)
        self.feature_threshold: float | None = None
        if self.real_features is not None:
            if isinstance(feature_threshold, str):
                if feature_threshold != "auto":
                    raise InputError(f"feature_threshold must be a number or 'auto', got '{feature_threshold}'")
                feature_threshold = self.calibrate_feature_threshold(groups, feature_quantile)
            if not feature_threshold > 0:
                raise InputError(f"feature_threshold must be > 0, got {feature_threshold}")
            self.feature_threshold = float(feature_threshold)

    def __len__(self) -> int:
        return len(self.real_bits)

    def calibrate_feature_threshold(self, groups: Sequence | None, quantile: float) -> float:
        """FEATURE_MARGIN x the `quantile` of real images' cosine distance to their nearest other lesion."""
        n = len(self.real_features)
        if n < 2:
            raise InputError("calibrating the feature threshold needs at least 2 real images; "
                             "pass feature_threshold explicitly")
        generator = torch.Generator().manual_seed(0)
        sample = torch.randperm(n, generator=generator)[:_CALIBRATION_SAMPLE]
        group_ids = torch.as_tensor(pd.factorize(pd.Series(list(groups), dtype=str))[0]) if groups is not None \
            else torch.arange(n)
        exclude = group_ids[sample][:, None] == group_ids[None, :]
        exclude[torch.arange(len(sample)), sample] = True
        _, distances = nearest_cosine(self.real_features[sample], self.real_features, exclude=exclude)
        distances = distances[torch.isfinite(distances)]
        if len(distances) == 0:
            raise InputError("every real image belongs to one lesion group; cannot calibrate the feature "
                             "threshold, pass feature_threshold explicitly")
        return max(FEATURE_MARGIN * float(distances.quantile(quantile)), 1e-6)

    def query(self, synthetic_images: Tensor, features: Tensor | None = None) -> MemorizationResult:
        """Nearest real image per synthetic image by hash (all orientations) and by features."""
        _check_images(synthetic_images, "MemorizationIndex.query images")
        views = dihedral_views(synthetic_images) if self.orientations and \
            synthetic_images.shape[-1] == synthetic_images.shape[-2] else [synthetic_images]
        best_distance = best_index = None
        for view in views:
            bits = phash_bits(view, self.hash_size)
            for start in range(0, len(bits), _QUERY_CHUNK):
                d, i = hamming_distances(bits[start:start + _QUERY_CHUNK], self.real_bits).min(dim=1)
                chunk = slice(start, start + len(d))
                if best_distance is None:
                    best_distance = torch.full((len(bits),), self.hash_size ** 2 + 1, dtype=torch.int64)
                    best_index = torch.zeros(len(bits), dtype=torch.int64)
                closer = d < best_distance[chunk]
                best_distance[chunk] = torch.where(closer, d, best_distance[chunk])
                best_index[chunk] = torch.where(closer, i, best_index[chunk])
        feature_index = feature_distance = None
        if self.real_features is not None:
            if features is None:
                if self.feature_fn is None:
                    raise InputError("this index was built with real features: pass the synthetic images' "
                                     "features to query(), or build it with feature_fn")
                features = self.feature_fn(synthetic_images)
            if features.shape != (len(synthetic_images), self.real_features.shape[1]):
                raise InputError(f"query features have shape {tuple(features.shape)}; expected "
                                 f"({len(synthetic_images)}, {self.real_features.shape[1]})")
            feature_index, feature_distance = nearest_cosine(features.detach().cpu(), self.real_features)
        elif features is not None:
            raise InputError("query() got features but the index has no real features; build it with "
                             "real_features or feature_fn")
        return MemorizationResult(best_index, best_distance, feature_index, feature_distance,
                                  self.phash_threshold, self.feature_threshold, self.hash_size ** 2)
