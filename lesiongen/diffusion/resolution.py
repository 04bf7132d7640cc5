"""Which image sizes a base can take: the VAE and the UNet each halve the size a fixed number of times."""

from __future__ import annotations

from lesiongen.errors import InputError


def resolution_multiple(pipe) -> int:
    """The VAE's downsampling times the UNet's (one halving per down block but the last)."""
    unet_factor = 2 ** (len(pipe.unet.config.down_block_types) - 1)
    return int(pipe.vae_scale_factor) * unet_factor


def check_resolution(pipe, resolution: int, *, where: str, flag: str = "--resolution") -> int:
    multiple = resolution_multiple(pipe)
    if resolution <= 0 or resolution % multiple:
        lower, upper = resolution // multiple * multiple, (resolution // multiple + 1) * multiple
        suggestion = f"{lower} or {upper}" if lower > 0 else str(upper)
        raise InputError(f"{flag} {resolution}: the base {where} needs a positive multiple of {multiple} "
                         f"(VAE x{pipe.vae_scale_factor}, UNet x{multiple // pipe.vae_scale_factor}); try {suggestion}")
    return resolution
