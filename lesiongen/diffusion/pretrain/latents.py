"""The UNet stage's training data: every image's VAE posterior (mean, std) under each of the 8 flips /
rotations, encoded once per VAE and cached on disk, plus the latent scale factor computed from them."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lesiongen.diffusion.pretrain.data import NUM_DIHEDRAL, ClassImages, dihedral, to_model_range
from lesiongen.utils.atomic import atomic_path


@dataclass
class LatentSet:
    mean: torch.Tensor  # (N * views, 4, h, w), unscaled VAE space
    std: torch.Tensor
    label: torch.Tensor

    def scaling_factor(self) -> float:
        """SD's convention, from data: 1 / std of sampled latents (spread of the means + posterior variance).

        Summed in float64 and rounded to float32: a float32 reduction's last bits depend on the memory the
        tensors sit in (freshly encoded or read back from the cache), and the UNet trains on this scale."""
        variance = self.mean.double().var() + self.std.double().square().mean()
        return float(torch.tensor(float(1.0 / torch.sqrt(variance)), dtype=torch.float32))

    def sample(self, index: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.mean[index] + self.std[index] * eps

    def row_weights(self, class_balance: float) -> torch.Tensor | None:
        """Draw weight n_class ** -class_balance of every row; None at 0 (uniform over rows)."""
        if class_balance == 0:
            return None
        return torch.bincount(self.label).float()[self.label] ** -class_balance

    def draw(self, batch_size: int, weights: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """Row indices of one batch, by `row_weights` (drawn with replacement)."""
        if weights is None:
            return torch.randint(len(self.mean), (batch_size,), generator=generator, device=self.mean.device)
        return torch.multinomial(weights, batch_size, replacement=True, generator=generator)


@torch.no_grad()
def encode_views(vae, data: ClassImages, *, augment: bool, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 batch_size: int = 128) -> LatentSet:
    images, labels = data.images.to(device), data.labels.to(device)
    means, stds, owners = [], [], []
    for view in range(NUM_DIHEDRAL if augment else 1):
        for start in range(0, len(images), batch_size):
            with autocast():
                posterior = vae.encode(to_model_range(dihedral(images[start:start + batch_size], view))).latent_dist
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
        owners.append(labels)
    return LatentSet(torch.cat(means), torch.cat(stds), torch.cat(owners))


def cached_latents(vae, data: ClassImages, cache_dir: Path, *, augment: bool, device: torch.device,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> LatentSet:
    """Encoded once: the cache file is keyed by the VAE's weights and the image set."""
    from safetensors.torch import load_file, save_file

    key = tensor_digest([*vae.state_dict().values(), data.images, data.labels], extra=f"augment={augment}")
    path = cache_dir / f"latents-{key}.safetensors"
    if path.is_file():
        cached = load_file(str(path), device=str(device))
        return LatentSet(cached["mean"], cached["std"], cached["label"])
    latents = encode_views(vae, data, augment=augment, device=device, autocast=autocast)
    with atomic_path(path) as tmp:
        save_file({"mean": latents.mean.cpu().contiguous(), "std": latents.std.cpu().contiguous(),
                   "label": latents.label.cpu().contiguous()}, str(tmp))
    return latents  # the same values a resumed run reads back from the file


def tensor_digest(tensors: list[torch.Tensor], extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
