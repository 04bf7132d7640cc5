"""Which image sizes a base can take: the VAE and the UNet each halve the size a fixed number of times, and
diffusers' Stable Diffusion pipelines take multiples of 8 only, whatever the two (a tiny base's VAE may halve
once)."""

from __future__ import annotations

import math

from lesiongen.errors import InputError

PIPELINE_MULTIPLE = 8  # StableDiffusionPipeline.check_inputs: "`height` and `width` have to be divisible by 8"


def multiple_of(vae_scale_factor: int, unet_down_blocks: int) -> int:
    """The VAE's downsampling times the UNet's (one halving per down block but the last), and a multiple of 8."""
    return math.lcm(int(vae_scale_factor) * 2 ** (unet_down_blocks - 1), PIPELINE_MULTIPLE)


def resolution_multiple(pipe) -> int:
    return multiple_of(pipe.vae_scale_factor, len(pipe.unet.config.down_block_types))


def resolution_problem(resolution: int, vae_scale_factor: int, unet_down_blocks: int, base: str) -> str | None:
    """Why `base` (its VAE and UNet factors) cannot take `resolution`, with the nearest sizes it can; or None."""
    multiple = multiple_of(vae_scale_factor, unet_down_blocks)
    if resolution <= 0:
        return f"must be positive ({base} takes multiples of {multiple} px)"
    if resolution % multiple:
        lower, upper = resolution // multiple * multiple, (resolution // multiple + 1) * multiple
        suggestion = f"{lower} or {upper}" if lower > 0 else str(upper)
        return (f"{base} needs a positive multiple of {multiple} (VAE x{vae_scale_factor}, "
                f"UNet x{2 ** (unet_down_blocks - 1)}, and diffusers' pipelines take multiples of "
                f"{PIPELINE_MULTIPLE}); try {suggestion}")
    return None


def check_resolution(pipe, resolution: int, *, where: str, flag: str = "--resolution") -> int:
    problem = resolution_problem(resolution, pipe.vae_scale_factor, len(pipe.unet.config.down_block_types),
                                 f"the base {where}")
    if problem is not None:
        raise InputError(f"{flag} {resolution}: {problem}")
    return resolution
