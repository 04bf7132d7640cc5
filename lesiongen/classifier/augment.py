"""Random training augmentation of a whole batch on the device, one kernel per step where possible.

Random resized crop, flips and 90-degree rotations are one affine map per image, so the batch is
resampled once with `grid_sample` straight to the model's size. Colour jitter (brightness, contrast,
saturation, hue) is a per-image factor or 3x3 matrix. Randomness comes from torch's global generator
of the batch's device, which accelerate seeds per process and saves in every checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lesiongen.classifier.config import AugmentConfig

# RGB <-> YIQ: hue is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_GRAY = torch.tensor([0.299, 0.587, 0.114])


class DeviceAugment:
    """float images in [0, 1] (N, 3, H, W) -> augmented (N, 3, size, size), still in [0, 1]."""

    def __init__(self, config: AugmentConfig, size: int) -> None:
        self.config, self.size = config, size

    def __call__(self, images: Tensor) -> Tensor:
        n = images.shape[0]
        grid = F.affine_grid(self.random_affine(n, images.device), [n, 3, self.size, self.size], align_corners=False)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return self.colour_jitter(out)

    def random_affine(self, n: int, device: torch.device) -> Tensor:
        """(n, 2, 3) maps from output to input coordinates: crop window after a dihedral transform."""
        cfg = self.config
        area = _uniform(n, *cfg.scale, device)
        log_ratio = _uniform(n, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), device)
        ratio = log_ratio.exp()
        half_w = (area * ratio).sqrt().clamp(max=1.0)  # half extents in [-1, 1] coordinates
        half_h = (area / ratio).sqrt().clamp(max=1.0)
        centre_x = _uniform(n, -1.0, 1.0, device) * (1.0 - half_w)
        centre_y = _uniform(n, -1.0, 1.0, device) * (1.0 - half_h)
        linear = torch.zeros(n, 2, 2, device=device)
        linear[:, 0, 0], linear[:, 1, 1] = half_w, half_h
        if cfg.dihedral:
            linear = linear @ _random_dihedral(n, device)
        return torch.cat([linear, torch.stack([centre_x, centre_y], dim=1)[:, :, None]], dim=2)

    def colour_jitter(self, images: Tensor) -> Tensor:
        cfg = self.config
        n, device = images.shape[0], images.device
        on = (torch.rand(n, device=device) < cfg.jitter_prob).float()

        def factor(strength: float) -> Tensor:  # 1 for images that are not jittered
            return 1.0 + on * _uniform(n, -strength, strength, device)

        gray_weights = _GRAY.to(device)
        images = images * factor(cfg.brightness)[:, None, None, None]
        luma = torch.einsum("nchw,c->nhw", images, gray_weights)[:, None]
        contrast = factor(cfg.contrast)[:, None, None, None]
        images = (images - luma.mean(dim=(2, 3), keepdim=True)) * contrast + luma.mean(dim=(2, 3), keepdim=True)
        luma = torch.einsum("nchw,c->nhw", images, gray_weights)[:, None]
        images = luma + (images - luma) * factor(cfg.saturation)[:, None, None, None]
        if cfg.hue > 0:
            images = torch.einsum("nij,njhw->nihw", _hue_matrices(on * _uniform(n, -cfg.hue, cfg.hue, device)), images)
        return images.clamp_(0.0, 1.0)


def _uniform(n: int, low: float, high: float, device: torch.device) -> Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def _random_dihedral(n: int, device: torch.device) -> Tensor:
    """(n, 2, 2): a random one of the 8 rotations by k x 90 degrees, each optionally mirrored."""
    k = torch.randint(4, (n,), device=device)
    mirror = torch.randint(2, (n,), device=device).float() * -2.0 + 1.0  # +1 or -1
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=device)[k]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)[k]
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    flip = torch.diag_embed(torch.stack([mirror, torch.ones_like(mirror)], 1))
    return rotation @ flip


def _hue_matrices(turns: Tensor) -> Tensor:
    """(n, 3, 3) RGB -> RGB matrices rotating the YIQ chroma by `turns` of a full circle."""
    to_yiq = _RGB_TO_YIQ.to(turns.device)
    angle = turns * 2.0 * math.pi
    rotation = torch.zeros(len(turns), 3, 3, device=turns.device)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1], rotation[:, 1, 2] = angle.cos(), -angle.sin()
    rotation[:, 2, 1], rotation[:, 2, 2] = angle.sin(), angle.cos()
    return torch.linalg.inv(to_yiq) @ rotation @ to_yiq
