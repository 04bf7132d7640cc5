"""DDIM inversion and the matching DDIM sampling loop, both written around diffusers' schedulers.

The diffusers inversion pipelines are deprecated, so the two loops live here and share one step
function: `DDIMInverseScheduler` walks a clean latent up to noise, `DDIMScheduler` walks back down, and
both evaluate the UNet at the same timesteps. Plain inversion evaluates the UNet one level below where
sampling will, so its round trip is only approximate (fine for a trained SD, far off for a random-weight
model whose noise prediction does not cancel DDIM's growth); optional fixed-point refinement removes that
approximation, and a round trip with guidance 1 then returns the input latent to float precision.

Trajectory indexing, used everywhere in `lesiongen.synthesis`: `levels[0]` is the clean latent and
`levels[j]` the latent at the noise level of the j-th ascending timestep, `levels[n]` the fully inverted
one. Sampling step `i` (0 = noisiest) maps `levels[n - i]` to `levels[n - i - 1]`, so sampling from strength
s starts at step `n - m` with `levels[m]`, `m = int(n * s)`, exactly as diffusers' img2img counts.

Depth: variants only ever start from `levels[m]`, so the pipeline inverts only that far (as diffusers'
DiffEdit does with its `inpaint_strength`) and measures the round trip from there: m of n inversion steps
and m sampling steps instead of n each. `depth: full` inverts to the last timestep and measures the
stricter round trip from pure noise.

Null-text inversion (Mokady et al., 2023) is optional: after inverting with guidance 1, the unconditional
embedding is optimised step by step so that guided sampling retraces the inversion trajectory; the
per-step embeddings are then reused by every variant of the image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from lesiongen.config import check_learning_rate
from lesiongen.synthesis.conditioning import Conditioning, predict_noise
from lesiongen.synthesis.feature_cache import cached_steps
from lesiongen.synthesis.latents import decode_to_uint8, psnr, ssim

# Called after the model output of a sampling step, before the scheduler step; returns a corrected output
# (classifier guidance hooks in here).
NoiseCorrection = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor]
DEPTHS = ("strength", "full")
Depth = Literal["strength", "full"]


@dataclass
class InversionConfig:
    steps: int = 50
    depth: Depth = "strength"  # strength: only as far as the variants start (m = int(steps * strength)); full
    guidance: float = 1.0  # CFG while inverting; 1 (conditional only) inverts most faithfully
    fixed_point_iterations: int = 0  # per inversion step; makes inversion the exact inverse of sampling
    fixed_point_tolerance: float = 1e-5  # stop refining a step once its latent moves less than this (relative)
    null_text_steps: int = 0  # optimisation iterations per sampling step for null-text inversion; 0 = off
    null_text_lr: float = 1e-2
    null_text_tolerance: float = 1e-5  # stop a step's optimisation once the latent MSE is below this

    def __post_init__(self) -> None:
        if not 2 <= self.steps <= 1000:
            raise ValueError(f"inversion steps must be in [2, 1000], got {self.steps}")
        if self.depth not in DEPTHS:
            raise ValueError(f"inversion depth must be one of {list(DEPTHS)}, got '{self.depth}'")
        if self.guidance < 1.0:
            raise ValueError(f"inversion guidance must be >= 1, got {self.guidance}")
        if self.fixed_point_iterations < 0 or self.fixed_point_tolerance < 0:
            raise ValueError("fixed_point_iterations and fixed_point_tolerance must be >= 0")
        if self.null_text_steps < 0:
            raise ValueError(f"null_text_steps must be >= 0, got {self.null_text_steps}")
        check_learning_rate("null_text_lr", self.null_text_lr)


class DDIMSchedule:
    """A DDIMScheduler and a DDIMInverseScheduler set to the same timesteps, built from any SD scheduler
    config (PNDM, DDIM, Euler ... share the beta schedule keys)."""

    SUPPORTED_SPACING = ("leading", "trailing")

    def __init__(self, scheduler_config: dict, steps: int, device: torch.device | str = "cpu") -> None:
        config = dict(scheduler_config)
        # The inverse scheduler knows only leading/trailing; sampling must use the same grid, so both do.
        if config.get("timestep_spacing", "leading") not in self.SUPPORTED_SPACING:
            config["timestep_spacing"] = "leading"
        # Latents are not in [-1, 1]: clipping or thresholding the x0 estimate would break invertibility.
        config.update(clip_sample=False, thresholding=False)
        self.sampler = DDIMScheduler.from_config(config)
        self.inverter = DDIMInverseScheduler.from_config(config)
        self.sampler.set_timesteps(steps, device=device)
        self.inverter.set_timesteps(steps, device=device)
        if not torch.equal(self.sampler.timesteps.flip(0).cpu(), self.inverter.timesteps.cpu()):
            raise RuntimeError("DDIM and inverse-DDIM timesteps differ; the scheduler config is inconsistent")
        self.steps = steps
        self.alphas_cumprod = self.sampler.alphas_cumprod.to(device)

    @property
    def timesteps(self) -> torch.Tensor:
        """Sampling order (noisiest first)."""
        return self.sampler.timesteps

    def level_for_strength(self, strength: float) -> int:
        """m = int(steps * strength): the trajectory level sampling from strength s starts at."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        level = int(self.steps * strength)
        if level < 1:
            raise ValueError(f"strength {strength} x {self.steps} steps leaves no sampling step; "
                             "raise the strength or the number of steps")
        return level

    def alpha_bar_at_level(self, level: int) -> torch.Tensor:
        """Cumulative alpha of trajectory level `level` (level 0 is clean: alpha 1)."""
        if level == 0:
            return torch.ones((), device=self.alphas_cumprod.device)
        return self.alphas_cumprod[self.inverter.timesteps[level - 1]]

    def describe(self) -> str:
        cfg = self.sampler.config
        return (f"DDIM {self.steps} steps ({cfg.timestep_spacing}, offset {cfg.steps_offset}, "
                f"{cfg.beta_schedule}, {cfg.prediction_type})")


def _unet_step(unet, scheduler, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning,
               step: int, correction: NoiseCorrection | None = None) -> torch.Tensor:
    """One step of either loop: guided model output, optional correction, scheduler update."""
    model_input = scheduler.scale_model_input(latents, timestep)
    output = predict_noise(unet, model_input, timestep, conditioning, step)
    if correction is not None:
        output = correction(latents, timestep, step, output)
    return scheduler.step(output, timestep, latents, return_dict=False)[0]


@torch.no_grad()
def ddim_invert(unet, schedule: DDIMSchedule, latents: torch.Tensor, conditioning: Conditioning, *,
                fixed_point_iterations: int = 0, fixed_point_tolerance: float = 1e-5,
                depth: int | None = None) -> list[torch.Tensor]:
    """Clean latents -> the trajectory [levels 0..depth] (depth + 1 tensors; depth None: n, all of it).

    Plain DDIM inversion evaluates the UNet at the lower level when stepping up, an approximation of the
    sampler (which evaluates it at the upper level). Fixed-point refinement (as in AIDI / ReNoise)
    re-evaluates the UNet at the current estimate of the upper level until it stops moving (relative RMS
    change below the tolerance), which makes each inversion step the exact inverse of its sampling step.
    """
    depth = schedule.steps if depth is None else depth
    if not 1 <= depth <= schedule.steps:
        raise ValueError(f"inversion depth must be in [1, {schedule.steps}], got {depth}")
    levels = [latents]
    with cached_steps(unet):
        for j, timestep in enumerate(schedule.inverter.timesteps[:depth]):
            lower, step = levels[-1], schedule.steps - 1 - j
            upper = _unet_step(unet, schedule.inverter, lower, timestep, conditioning, step)
            active = torch.ones(len(upper), dtype=torch.bool, device=upper.device)
            for _ in range(fixed_point_iterations):
                output = predict_noise(unet, upper, timestep, conditioning, step)
                refined = schedule.inverter.step(output, timestep, lower, return_dict=False)[0]
                change = _relative_rms(refined - upper, upper)
                # Converged images stop moving, so how often an image is refined depends on it alone, not on
                # the rest of its batch (a resumed or resharded run makes the same trajectory).
                upper = torch.where(active[:, None, None, None], refined, upper)
                active &= change >= fixed_point_tolerance
                if not active.any():
                    break
            levels.append(upper)
    return levels


def _relative_rms(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image ||delta|| / ||reference||."""
    return delta.float().flatten(1).norm(dim=1) / reference.float().flatten(1).norm(dim=1).clamp_min(1e-12)


def ddim_sample(unet, schedule: DDIMSchedule, latents: torch.Tensor, conditioning: Conditioning, *,
                start_step: int = 0, correction: NoiseCorrection | None = None) -> torch.Tensor:
    """Sampling steps start_step..n-1 from `latents` (at level n - start_step) down to a clean latent.
    Gradients are off unless a correction needs them (it enables them itself)."""
    with torch.no_grad(), cached_steps(unet):
        for step in range(start_step, schedule.steps):
            latents = _unet_step(unet, schedule.sampler, latents, schedule.timesteps[step], conditioning, step,
                                 correction)
    return latents


def optimize_null_text(unet, schedule: DDIMSchedule, levels: list[torch.Tensor], conditioning: Conditioning,
                       *, iterations: int, lr: float, tolerance: float) -> torch.Tensor:
    """Per-step unconditional embeddings (S, B, L, D) that make guided sampling retrace `levels`.

    Indexed by sampling step (S = n). A trajectory of depth m < n is retraced by steps n - m .. n - 1 only;
    the rows of the steps above it keep the starting embedding (sampling never reaches them from there).

    Each image's embedding gets its own loss term (summed, not averaged; Adam is element-wise), so the
    result for an image does not depend on what else is in the batch. Each step keeps, per image, the
    best embedding seen (the starting one included), so a step never ends further off than it began.
    """
    if conditioning.uncond is None or not conditioning.guided:
        raise ValueError("null-text inversion needs classifier-free guidance (scale > 1) "
                         "and an unconditional embedding")
    cond = conditioning.cond.detach()
    best = conditioning.uncond_at(0).detach().float().clone()
    latents = levels[-1]
    first = schedule.steps - (len(levels) - 1)
    per_step = [best.to(cond.dtype, copy=True)] * first
    for step in range(first, schedule.steps):
        timestep = schedule.timesteps[step]
        target = levels[schedule.steps - step - 1].float()
        with torch.no_grad():
            out_cond = unet(latents, timestep, encoder_hidden_states=cond, return_dict=False)[0]
        uncond = best.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([uncond], lr=lr)
        best_error = torch.full((len(cond),), float("inf"), device=cond.device)
        for _ in range(iterations + 1):  # the last pass only scores the last update
            with torch.enable_grad():
                out_uncond = unet(latents, timestep, encoder_hidden_states=uncond.to(cond.dtype), return_dict=False)[0]
                output = out_uncond + conditioning.scale * (out_cond - out_uncond)
                previous = schedule.sampler.step(output, timestep, latents, return_dict=False)[0]
                error = (previous.float() - target).pow(2).flatten(1).mean(1)
            with torch.no_grad():
                # an image below the tolerance keeps its first such embedding: the result then does not
                # depend on how long the rest of the batch keeps the loop going
                improved = (error < best_error) & (best_error >= tolerance)
                best_error = torch.where(improved, error, best_error)
                best[improved] = uncond[improved]
            if best_error.max().item() < tolerance:
                break
            optimizer.zero_grad(set_to_none=True)
            error.sum().backward()
            optimizer.step()
        per_step.append(best.to(cond.dtype, copy=True))  # `best` keeps changing in the next steps
        with torch.no_grad():
            latents = _unet_step(unet, schedule.sampler, latents, timestep,
                                 Conditioning(cond, per_step[-1], conditioning.scale), 0)
    return torch.stack(per_step)


@dataclass
class Inversion:
    """An inverted batch: its trajectory and the conditionings that sample back along it."""

    levels: list[torch.Tensor]
    sampling: Conditioning  # what variants sample with: cond + uncond (null-text per step) + their guidance
    reconstruction: Conditioning  # the most faithful way back: null-text if fitted, else the inversion's own

    @property
    def clean(self) -> torch.Tensor:
        return self.levels[0]

    @property
    def inverted(self) -> torch.Tensor:
        """The noisiest latent of the trajectory: level `depth`."""
        return self.levels[-1]

    @property
    def depth(self) -> int:
        return len(self.levels) - 1

    def select(self, rows: list[int]) -> Inversion:
        """The same inversion restricted to some images of the batch."""
        index = torch.as_tensor(rows, device=self.clean.device)
        return Inversion([level[index] for level in self.levels], self.sampling.index(index),
                         self.reconstruction.index(index))


def invert(unet, schedule: DDIMSchedule, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
           config: InversionConfig, *, sampling_guidance: float, depth: int | None = None) -> Inversion:
    """Invert clean latents conditioned on their prompts up to level `depth` (None: all n levels);
    returns what sampling needs to come back.

    Variants sample with `sampling_guidance`. Without null-text, guided sampling drifts from the
    trajectory, so the round trip (the reconstruction) retraces it with the inversion's own guidance;
    with null-text on, the fitted per-step unconditional embeddings make guided sampling retrace it, and
    both the reconstruction and the variants use them.
    """
    inversion_conditioning = Conditioning(cond, uncond if config.guidance != 1.0 else None, config.guidance)
    levels = ddim_invert(unet, schedule, latents, inversion_conditioning,
                         fixed_point_iterations=config.fixed_point_iterations,
                         fixed_point_tolerance=config.fixed_point_tolerance, depth=depth)
    sampling = Conditioning(cond, uncond if sampling_guidance != 1.0 else None, sampling_guidance)
    if config.null_text_steps > 0 and sampling.guided:
        per_step = optimize_null_text(unet, schedule, levels, sampling, iterations=config.null_text_steps,
                                      lr=config.null_text_lr, tolerance=config.null_text_tolerance)
        sampling = Conditioning(cond, per_step, sampling_guidance)
        return Inversion(levels, sampling, sampling)
    return Inversion(levels, sampling, inversion_conditioning)


@dataclass
class RoundTrip:
    """How well invert -> sample reproduces the input, per image."""

    reconstruction: torch.Tensor  # uint8 (B, 3, H, W) at the pipeline resolution
    psnr: torch.Tensor  # dB, reconstruction vs the input pixels
    ssim: torch.Tensor  # reconstruction vs the input pixels
    vae_psnr: torch.Tensor  # dB, VAE alone (encode -> decode) vs the input: the ceiling for `psnr`
    inversion_psnr: torch.Tensor  # dB, reconstruction vs the VAE alone: what the inversion itself loses
    latent_error: torch.Tensor  # ||z_rec - z|| / ||z||

    def rows(self) -> list[dict[str, float]]:
        columns = {"recon_psnr": self.psnr, "recon_ssim": self.ssim, "vae_psnr": self.vae_psnr,
                   "inversion_psnr": self.inversion_psnr, "latent_error": self.latent_error}
        return [{name: float(values[i]) for name, values in columns.items()} for i in range(len(self.psnr))]


@torch.no_grad()
def measure_round_trip(unet, vae, schedule: DDIMSchedule, inversion: Inversion, input_uint8: torch.Tensor) -> RoundTrip:
    """Sample back from the noisiest inverted latent (level `inversion.depth`) and compare with the input,
    in latent and pixel space."""
    clean = inversion.clean
    reconstructed = ddim_sample(unet, schedule, inversion.inverted, inversion.reconstruction,
                                start_step=schedule.steps - inversion.depth)
    latent_error = _relative_rms(reconstructed - clean, clean)
    pixels = decode_to_uint8(vae, torch.cat([reconstructed, clean]))
    reconstruction, vae_only = pixels.chunk(2)
    return RoundTrip(reconstruction, psnr(reconstruction, input_uint8), ssim(reconstruction, input_uint8),
                     psnr(vae_only, input_uint8), psnr(reconstruction, vae_only), latent_error.cpu())
