"""Class-conditioned samples during pretraining (DDIM + classifier-free guidance) and labelled grids."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lesiongen.diffusion.pretrain.data import to_uint8


@torch.no_grad()
def sample_latents(unet, scheduler_config, cond: torch.Tensor, uncond: torch.Tensor, seeds: list[int], *,
                   steps: int, guidance_scale: float, latent_shape: tuple[int, int, int],
                   batch_size: int = 64, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """DDIM from one seeded CPU generator per image; `cond` holds one text embedding per image."""
    from diffusers import DDIMScheduler

    device = cond.device
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        latents = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in chunk])
        latents = latents.to(device) * scheduler.init_noise_sigma
        text = torch.cat([uncond.expand(len(chunk), -1, -1), cond[start:start + len(chunk)]])
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                pred = unet(model_in, t, encoder_hidden_states=text).sample.float()
            pred_uncond, pred_cond = pred.chunk(2)
            guided = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            latents = scheduler.step(guided, t, latents).prev_sample
        out.append(latents)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Latents (already in the UNet's scaled space) -> uint8 images (N, 3, H, W) on the CPU."""
    images = [vae.decode(latents[i:i + batch_size] / vae.config.scaling_factor).sample
              for i in range(0, len(latents), batch_size)]
    return to_uint8(torch.cat(images)).cpu()


def save_grid(images_uint8: torch.Tensor, rows: int, path: str | os.PathLike, row_labels: list[str] | None = None,
              scale: int = 1) -> Path:
    """A grid with one row per class (images in row-major order), class names in a left margin."""
    from PIL import Image, ImageDraw

    from lesiongen.utils.atomic import atomic_path

    n, _, h, w = images_uint8.shape
    cols = -(-n // rows)
    margin = 48 if row_labels else 0
    canvas = Image.new("RGB", (margin + cols * w, rows * h), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        tile = Image.fromarray(images_uint8[i].permute(1, 2, 0).numpy())
        canvas.paste(tile, (margin + (i % cols) * w, (i // cols) * h))
    for r, label in enumerate(row_labels or []):
        draw.text((3, r * h + h // 2 - 5), label, fill="black")
    if scale != 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
    with atomic_path(path) as tmp:
        canvas.save(tmp)
    return Path(path)
