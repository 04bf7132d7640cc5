"""Diffusion training targets, loss weights and the learning-rate schedule (pure functions of the step,
so a resumed run recomputes them instead of restoring scheduler state)."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def loss_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prediction_type: str,
                 min_snr_gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma weights per sample, expressed for the network's target (epsilon or v)."""
    if min_snr_gamma is None:
        return torch.ones(len(timesteps), device=timesteps.device)
    ratio = snr(alphas_cumprod, timesteps)
    clipped = ratio.clamp(max=min_snr_gamma)
    # The x0-space weight min(SNR, gamma) becomes /SNR for an epsilon target and /(SNR + 1) for v.
    return clipped / ratio if prediction_type == "epsilon" else clipped / (ratio + 1)


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)
