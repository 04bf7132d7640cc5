"""Deterministic image preparation on the device, shared by training, prediction and evaluation.

uint8 (N, 3, H, W) -> float in [0, 1] -> optional Shades-of-Gray colour constancy -> resize to the
model's size -> normalise. Training inserts its random augmentation between constancy and normalise;
everything else is this same code, so a model sees at test time what it saw in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def to_unit_float(images: Tensor) -> Tensor:
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images (N, 3, H, W), got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    return images.float().div_(255.0)


def shades_of_gray(images: Tensor, p: float = 6.0) -> Tensor:
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004), as used for dermoscopy by Barata et al.

    The illuminant is each channel's Minkowski p-mean; channels are rescaled so that it becomes grey
    (a grey illuminant leaves the image unchanged). Removes the colour cast of different dermatoscopes.
    """
    illuminant = images.clamp_min(1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)  # (N, 3)
    illuminant = illuminant / illuminant.norm(dim=1, keepdim=True).clamp_min(1e-6)
    gain = 1.0 / (illuminant * math.sqrt(3.0))
    return (images * gain[:, :, None, None]).clamp_(0.0, 1.0)


def resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device)[None, :, None, None]
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device)[None, :, None, None]
    return (images - mean_t) / std_t


def tta_views(images: Tensor, mode: str) -> list[Tensor]:
    """The test-time views of a batch: itself, + horizontal flip, or all 8 flips / 90-degree rotations."""
    if mode == "none":
        return [images]
    if mode == "flip":
        return [images, images.flip(-1)]
    if mode == "dihedral":
        rotations = [torch.rot90(images, k, dims=(-2, -1)) for k in range(4)]
        return rotations + [r.flip(-1) for r in rotations]
    raise ValueError(f"unknown test-time augmentation {mode!r}")
