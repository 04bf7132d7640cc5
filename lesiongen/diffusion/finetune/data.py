"""Training data for fine-tuning: the manifest's real train rows, their latents, class-balanced batches.

Latents come from one of two sources with the same interface: `CachedLatents` encodes every image
(and every flip variant) with the VAE once, `EncodedLatents` runs the VAE on each batch the way
diffusers' example scripts do. Every random choice of a step (rows, flips, captions, noise) is drawn
from generators seeded by (seed, step, micro-batch, process), so a resumed run repeats exactly the
batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lesiongen.data.manifest import load_manifest
from lesiongen.data.prompts import PromptSet
from lesiongen.errors import InputError


@dataclass
class TrainingSet:
    """Real training images of a manifest with their labels and caption metadata."""

    paths: list[Path]
    labels: list[str]
    rows: list[dict]
    where: str

    @classmethod
    def from_manifest(cls, path: str | os.PathLike, prompts: PromptSet) -> TrainingSet:
        manifest = load_manifest(path)
        train = manifest.split("train")
        train = train.subset(~train.is_synthetic)  # adapt to real images only
        if not len(train):
            raise InputError(f"{path}: the train split has no real (non-synthetic) images to fine-tune on")
        unknown = sorted(set(train.df["label"]) - set(prompts.class_names))
        if unknown:
            raise InputError(f"{path}: class(es) {unknown} are not in the prompt file {prompts.source} "
                             f"(classes: {prompts.class_names}); pass the matching --prompts")
        used = manifest.df.index[(manifest.df["split"] == "train") & ~manifest.is_synthetic]
        for i in used:  # before anything stats or decodes them: name the manifest row, not just the path
            image = manifest.df.at[i, "image"]
            if not (manifest.root / image).is_file():
                raise InputError(f"{path} row {i + 2}, column 'image': image file '{image}' not found under "
                                 f"{manifest.root}")
        rows = train.df.to_dict("records")
        return cls(train.image_paths(), list(train.df["label"]), rows, str(path))

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for label in self.labels:
            counts[label] = counts.get(label, 0) + 1
        return counts

    def sample_weights(self, balance: float) -> torch.Tensor:
        """Per-image weight count(class) ** -balance: 1 draws every class equally often, 0 as in the data."""
        counts = self.class_counts()
        return torch.tensor([counts[label] ** -balance for label in self.labels], dtype=torch.float64)

    def fingerprint(self, *extra) -> str:
        """Identifies the image files (path, size, mtime) plus `extra` settings, for cache file names."""
        digest = hashlib.sha256()
        for path in self.paths:
            stat = path.stat()
            digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        digest.update(repr(extra).encode())
        return digest.hexdigest()[:16]


def flip_variants(augment: list[str]) -> list[tuple[bool, bool]]:
    """(hflip, vflip) combinations the augmentation list allows; the identity is always variant 0."""
    hs = [False, True] if "hflip" in augment else [False]
    vs = [False, True] if "vflip" in augment else [False]
    return [(h, v) for v in vs for h in hs]


def apply_flips(images: torch.Tensor, variants: list[tuple[bool, bool]], codes: torch.Tensor) -> torch.Tensor:
    """Flip each image (N, C, H, W) by its variant code."""
    out = images.clone()
    for code, (h, v) in enumerate(variants):
        mask = codes == code
        if not mask.any() or not (h or v):
            continue
        dims = [d for d, on in ((-1, h), (-2, v)) if on]
        out[mask] = out[mask].flip(dims)
    return out


def to_vae_input(images_uint8: torch.Tensor, device, dtype) -> torch.Tensor:
    return images_uint8.to(device, non_blocking=True).to(dtype).div_(127.5).sub_(1.0)


@dataclass
class StepRandomness:
    """The generators of one micro-batch, derived from (seed, step, micro-batch, process)."""

    cpu: torch.Generator
    device: torch.Generator
    python: random.Random

    @classmethod
    def at(cls, seed: int, step: int, micro: int, process: int, device) -> StepRandomness:
        key = f"{seed}:{step}:{micro}:{process}"
        value = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)
        return cls(torch.Generator().manual_seed(value), torch.Generator(device=device).manual_seed(value),
                   random.Random(key))


def draw_batch(weights: torch.Tensor, batch_size: int, num_variants: int,
               rng: StepRandomness) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (with replacement, by weight) and a flip variant for each."""
    indices = torch.multinomial(weights, batch_size, replacement=True, generator=rng.cpu)
    variants = torch.randint(num_variants, (batch_size,), generator=rng.cpu)
    return indices, variants


class CachedLatents:
    """The VAE posterior (mean, std) of every image and flip variant, kept on the training device."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, scaling_factor: float) -> None:
        self.mean, self.std, self.scaling_factor = mean, std, scaling_factor  # (variants, N, C, h, w)

    @classmethod
    @torch.no_grad()
    def encode(cls, vae, images: ImageSource, variants: list[tuple[bool, bool]], *, batch_size: int = 32,
               dtype: torch.dtype) -> CachedLatents:
        means, stds = [], []
        for start in range(0, len(images), batch_size):
            pixels = images.load(range(start, min(start + batch_size, len(images))))
            dists = [vae.encode(to_vae_input(apply_flips(pixels, variants, torch.full((len(pixels),), code)),
                                             vae.device, vae.dtype)).latent_dist for code in range(len(variants))]
            means.append(torch.stack([d.mean.to(dtype) for d in dists]))
            stds.append(torch.stack([d.std.to(dtype) for d in dists]))
        return cls(torch.cat(means, dim=1), torch.cat(stds, dim=1), float(vae.config.scaling_factor))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std, "scaling_factor": torch.tensor(self.scaling_factor)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device) -> CachedLatents:
        return cls(state["mean"].to(device), state["std"].to(device), float(state["scaling_factor"]))

    def __call__(self, indices: torch.Tensor, variants: torch.Tensor, rng: StepRandomness) -> torch.Tensor:
        indices, variants = indices.to(self.mean.device), variants.to(self.mean.device)
        mean, std = self.mean[variants, indices], self.std[variants, indices]
        noise = torch.randn(mean.shape, generator=rng.device, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise) * self.scaling_factor


class EncodedLatents:
    """Encodes each batch with the VAE (no cache): slower per step, no up-front encoding or memory."""

    def __init__(self, vae, images: ImageSource, variants: list[tuple[bool, bool]]) -> None:
        self.vae, self.images, self.variants = vae, images, variants

    @torch.no_grad()
    def __call__(self, indices: torch.Tensor, variants: torch.Tensor, rng: StepRandomness) -> torch.Tensor:
        pixels = apply_flips(self.images.load(indices.tolist()), self.variants, variants)
        dist = self.vae.encode(to_vae_input(pixels, self.vae.device, self.vae.dtype)).latent_dist
        return dist.sample(generator=rng.device) * self.vae.config.scaling_factor


class ImageSource:
    """uint8 images (N, 3, R, R) at the training resolution.

    With `keep` the whole set is decoded once and held in memory (for per-step encoding); without,
    each request decodes just its files (for one pass of latent caching, which then needs no copy).
    """

    def __init__(self, paths: list[Path], resolution: int, *, keep: bool) -> None:
        self.paths, self.resolution, self.keep = paths, resolution, keep
        self._images: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, indices) -> torch.Tensor:
        from lesiongen.data.images import load_uint8

        indices = list(indices)
        if not self.keep:
            return load_uint8([self.paths[i] for i in indices], self.resolution)
        if self._images is None:
            self._images = load_uint8(self.paths, self.resolution)
        return self._images[indices]
