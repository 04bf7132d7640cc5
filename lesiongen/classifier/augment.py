"""Random training augmentation of a whole batch on the device, one kernel per step where possible.

Random resized crop, flips and 90-degree rotations are one affine map per image, so the batch is
resampled once with `grid_sample` straight to the model's size. Colour jitter (brightness, contrast,
saturation, hue) is a per-image factor or 3x3 matrix. Randomness comes from torch's global generator
of the batch's device, which accelerate seeds per process and saves in every checkpoint.

No step copies anything from the host: a blocking host-to-device copy synchronises the stream, which
stops the CPU from queueing the next kernels while the GPU works (the constants live on the device,
made once per device, and the hue matrices need no `linalg.inv`, whose singularity check also syncs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lesiongen.classifier.config import AugmentConfig

# RGB <-> YIQ: hue is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=torch.float64)
_GRAY = _RGB_TO_YIQ[0]


def _dihedral_table() -> Tensor:
    """(8, 2, 2): rotation by k x 90 degrees after an optional mirror, at index 2 * k + mirrored."""
    matrices = []
    for k in range(4):
        cos, sin = [1.0, 0.0, -1.0, 0.0][k], [0.0, 1.0, 0.0, -1.0][k]
        for mirror in (1.0, -1.0):
            matrices.append(torch.tensor([[cos, -sin], [sin, cos]]) @ torch.diag(torch.tensor([mirror, 1.0])))
    return torch.stack(matrices)


class _Constants:
    """The augmentation's fixed tensors, on one device."""

    def __init__(self, device: torch.device) -> None:
        self.gray = _GRAY.float().to(device)
        self.to_yiq = _RGB_TO_YIQ.float().to(device)
        self.from_yiq = torch.linalg.inv(_RGB_TO_YIQ).float().to(device)
        self.dihedral = _dihedral_table().to(device)


class DeviceAugment:
    """float images in [0, 1] (N, 3, H, W) -> augmented (N, 3, size, size), still in [0, 1]."""

    def __init__(self, config: AugmentConfig, size: int) -> None:
        self.config, self.size = config, size
        self._constants: dict[torch.device, _Constants] = {}

    def constants(self, device: torch.device) -> _Constants:
        if device not in self._constants:
            self._constants[device] = _Constants(device)
        return self._constants[device]

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
            linear = linear @ _random_dihedral(n, self.constants(device).dihedral)
        return torch.cat([linear, torch.stack([centre_x, centre_y], dim=1)[:, :, None]], dim=2)

    def colour_jitter(self, images: Tensor) -> Tensor:
        cfg = self.config
        n, device = images.shape[0], images.device
        on = (torch.rand(n, device=device) < cfg.jitter_prob).float()

        def factor(strength: float) -> Tensor:  # 1 for images that are not jittered
            return 1.0 + on * _uniform(n, -strength, strength, device)

        constants = self.constants(device)
        gray_weights = constants.gray
        images = images * factor(cfg.brightness)[:, None, None, None]
        luma = torch.einsum("nchw,c->nhw", images, gray_weights)[:, None]
        contrast = factor(cfg.contrast)[:, None, None, None]
        images = (images - luma.mean(dim=(2, 3), keepdim=True)) * contrast + luma.mean(dim=(2, 3), keepdim=True)
        luma = torch.einsum("nchw,c->nhw", images, gray_weights)[:, None]
        images = luma + (images - luma) * factor(cfg.saturation)[:, None, None, None]
        if cfg.hue > 0:
            turns = on * _uniform(n, -cfg.hue, cfg.hue, device)
            images = torch.einsum("nij,njhw->nihw", _hue_matrices(turns, constants), images)
        return images.clamp_(0.0, 1.0)


def _uniform(n: int, low: float, high: float, device: torch.device) -> Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def _random_dihedral(n: int, table: Tensor) -> Tensor:
    """(n, 2, 2): a random one of the 8 rotations by k x 90 degrees, each optionally mirrored."""
    device = table.device
    k = torch.randint(4, (n,), device=device)
    mirrored = torch.randint(2, (n,), device=device)
    return table[2 * k + mirrored]


def _hue_matrices(turns: Tensor, constants: _Constants) -> Tensor:
    """(n, 3, 3) RGB -> RGB matrices rotating the YIQ chroma by `turns` of a full circle."""
    angle = turns * 2.0 * math.pi
    rotation = torch.zeros(len(turns), 3, 3, device=turns.device)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1], rotation[:, 1, 2] = angle.cos(), -angle.sin()
    rotation[:, 2, 1], rotation[:, 2, 2] = angle.sin(), angle.cos()
    return constants.from_yiq @ rotation @ constants.to_yiq
