"""Training images for pretraining: decoded once to uint8 at the base's resolution, augmented on the device."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lesiongen.errors import InputError

NUM_DIHEDRAL = 8  # 4 rotations x optional flip


@dataclass
class ClassImages:
    """uint8 images (N, 3, R, R), their class indices, and the class names in manifest order."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    manifest_sha256: str

    def __len__(self) -> int:
        return len(self.labels)


def load_class_images(manifest_path: str | os.PathLike, split: str, resolution: int,
                      cache_dir: str | os.PathLike | None = None) -> ClassImages:
    """The real rows of one split, resized to `resolution`; every class must have images."""
    from lesiongen.data.images import load_uint8
    from lesiongen.data.manifest import load_manifest
    from lesiongen.utils.hashing import sha256_file

    manifest = load_manifest(manifest_path)
    rows = manifest.split(split)
    rows = rows.subset(~rows.is_synthetic)
    empty = [c for c, n in rows.class_counts().items() if n == 0]
    if empty:
        raise InputError(f"{manifest_path}: split '{split}' has no real images of class(es) {empty}; "
                         "a class-conditioned base needs every class")
    images = load_uint8(rows.image_paths(), resolution, cache_dir=cache_dir)
    labels = torch.tensor(rows.label_indices(), dtype=torch.long)
    return ClassImages(images, labels, list(manifest.classes), sha256_file(Path(manifest_path)))


def dihedral(x: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """One of the 8 symmetries of the square (k in 0..7) on NCHW tensors; a tensor k acts per sample."""
    if isinstance(k, int):
        x = torch.rot90(x, k % 4, dims=(-2, -1))
        return x.flip(-1) if k >= 4 else x
    out = torch.empty_like(x)
    for value in k.unique().tolist():
        mask = k == value
        out[mask] = dihedral(x[mask], int(value))
    return out


def dihedral_by_position(x: torch.Tensor) -> torch.Tensor:
    """Sample i gets symmetry i % 8: random per sample when the batch was drawn at random, and free of
    the host round trip a per-sample random choice would need."""
    out = torch.empty_like(x)
    for k in range(NUM_DIHEDRAL):
        out[k::NUM_DIHEDRAL] = dihedral(x[k::NUM_DIHEDRAL], k)
    return out


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
