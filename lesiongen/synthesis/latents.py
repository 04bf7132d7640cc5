"""Pixels <-> VAE latents at the pipeline's own resolution, and image-space similarity scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def pipeline_resolution(pipe) -> int:
    """The image size the UNet was built for (sample_size latents x the VAE's downsampling)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def to_model_pixels(images: torch.Tensor, size: int, *, device: torch.device | str,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1] at size x size (bicubic, antialiased, as the data loader)."""
    pixels = images.to(device=device, dtype=torch.float32) / 127.5 - 1.0
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return pixels.clamp(-1.0, 1.0).to(dtype)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 on the CPU."""
    return ((pixels.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu()


def _shift(vae) -> float:
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


@torch.no_grad()
def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Deterministic latents (the posterior mean, scaled as the UNet expects): inversion needs the same
    latent every time it sees the same image, so no posterior sample."""
    posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    return (posterior.mean - _shift(vae)) * vae.config.scaling_factor


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> pixels in [-1, 1]; differentiable (classifier guidance back-propagates through it)."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + _shift(vae), return_dict=False)[0]


@torch.no_grad()
def decode_to_uint8(vae, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Decode in chunks (a 512 px VAE decode is memory-hungry) straight to uint8 on the CPU."""
    return torch.cat([to_uint8(decode(vae, latents[i:i + batch_size])) for i in range(0, len(latents), batch_size)])


MAX_PSNR = 100.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two uint8 batches; identical images give MAX_PSNR, not inf (JSON-safe)."""
    a, b = a.float() / 255.0, b.float() / 255.0
    return peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)).clamp(max=MAX_PSNR)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of two uint8 batches (Gaussian window, shrunk for images smaller than 11 px)."""
    a, b = a.float() / 255.0, b.float() / 255.0
    kernel = min(11, (min(a.shape[-2:]) // 2) * 2 - 1)
    return structural_similarity_index_measure(a, b, data_range=1.0, reduction="none", kernel_size=kernel)
