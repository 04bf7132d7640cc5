"""Labelled variants of an inverted hard case.

Both methods sample with the DDIM loop of `lesiongen.synthesis.inversion`, starting at strength s from
the inverted trajectory, and differ only in what the UNet is conditioned on:

- `img2img`: the class prompt (learned token included).
- `embedding`: a per-image embedding, fitted in text-embedding space to reconstruct the image (a few
  optimisation steps of the diffusion loss, as Imagic does), interpolated with the class prompt's
  embedding: `e = lambda * e_class + (1 - lambda) * e_image`. lambda = 1 is the class prompt alone,
  lambda = 0 the image's own embedding.

Start latent ("img2img from the inverted latents at strength s, partial re-noising with fresh, seeded
noise"): with m = int(steps * s), the inversion's latent at level m is `z*_m = a z0 + b eps*`, where
`a = sqrt(alpha_bar_m)`, `b = sqrt(1 - alpha_bar_m)` and eps* is the noise the inversion found. The
variant starts from

    z_m = a z0 + b (sqrt(1 - r) eps* + sqrt(r) eps_fresh),      eps_fresh ~ N(0, I), seeded per variant

so `renoise` r sets how much of the inversion's noise is replaced by fresh noise: r = 0 retraces the
reconstruction (no variation), r = 1 is classic img2img (SDEdit) of z0, and values between keep the
hard case's layout while the fresh part makes new detail. The inverted trajectory is computed once per
source image (by default only up to level m: nothing above it is used) and shared by all its variants.

Optional classifier guidance pushes each sample toward where the current classifier is unsure: it
lowers log p(label) of the decoded x0 estimate while p(label) is above a target probability (not past
it: the class prompt keeps the label, and the filters drop anything that lost it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch

from lesiongen.config import check_learning_rate
from lesiongen.errors import InputError
from lesiongen.synthesis.conditioning import Conditioning
from lesiongen.synthesis.inversion import DDIMSchedule, Inversion, NoiseCorrection, ddim_sample
from lesiongen.synthesis.latents import decode, decode_to_uint8

METHODS = ("img2img", "embedding")
Method = Literal["img2img", "embedding"]


@dataclass
class VariantConfig:
    method: Method = "img2img"
    per_image: int = 4
    strength: float = 0.6
    renoise: float = 0.5  # share of the inversion noise replaced by fresh seeded noise (module docstring)
    guidance: float = 5.0  # classifier-free guidance while sampling variants (and the round trip)
    embedding_lambda: float = 0.5  # embedding method: weight of the class prompt against the image embedding
    embedding_steps: int = 25
    embedding_lr: float = 5e-3
    classifier_guidance: float = 0.0  # 0 = off
    classifier_target_prob: float = 0.5  # push p(label) down to this (unsure), not below

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got '{self.method}'")
        if self.per_image < 1:
            raise ValueError(f"variants per image must be >= 1, got {self.per_image}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if not 0.0 <= self.renoise <= 1.0:
            raise ValueError(f"renoise must be in [0, 1], got {self.renoise}")
        if self.guidance < 1.0:
            raise ValueError(f"guidance must be >= 1, got {self.guidance}")
        if not 0.0 <= self.embedding_lambda <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {self.embedding_lambda}")
        if self.embedding_steps < 1:
            raise ValueError(f"embedding_steps must be >= 1, got {self.embedding_steps}")
        check_learning_rate("embedding_lr", self.embedding_lr)
        if self.classifier_guidance < 0 or not 0.0 < self.classifier_target_prob < 1.0:
            raise ValueError("classifier_guidance must be >= 0 and classifier_target_prob in (0, 1)")


def variant_seed(base_seed: int, source_image: str, index: int, purpose: str = "variant") -> int:
    """A seed from what the image *is* (source, variant index), never from the process that makes it, so
    sharding over any number of processes, or resuming, gives the same images."""
    digest = hashlib.sha256(f"{base_seed}:{purpose}:{source_image}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seeded_normal(seeds: list[int], shape: tuple[int, ...], *, device, dtype) -> torch.Tensor:
    """One seeded CPU generator per row: a row's noise does not depend on the batch it is drawn in."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def start_latents(schedule: DDIMSchedule, inversion: Inversion, *, strength: float, renoise: float,
                  fresh_noise: torch.Tensor, per_image: int) -> tuple[torch.Tensor, int]:
    """The variants' start latents at level m (each source repeated `per_image` times) and the first
    sampling step."""
    level = schedule.level_for_strength(strength)
    if level > inversion.depth:
        raise ValueError(f"strength {strength} starts at level {level}, above the inversion's depth {inversion.depth}")
    alpha_bar = schedule.alpha_bar_at_level(level).to(torch.float32)
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    clean = inversion.clean.float().repeat_interleave(per_image, dim=0)
    inverted = inversion.levels[level].float().repeat_interleave(per_image, dim=0)
    inversion_noise = (inverted - a * clean) / b
    noise = (1 - renoise) ** 0.5 * inversion_noise + renoise ** 0.5 * fresh_noise.float()
    latents = a * clean + b * noise
    return latents.to(inversion.clean.dtype), schedule.steps - level


def fit_image_embeddings(unet, schedule: DDIMSchedule, clean: torch.Tensor, init: torch.Tensor, *,
                         steps: int, lr: float, seeds: list[int]) -> torch.Tensor:
    """Per-image text embeddings (B, L, D) fitted to reconstruct each clean latent (diffusion loss).

    Each image draws its timesteps and noise from its own seeded generator and has its own loss term
    (summed), so the result for an image does not depend on the rest of the batch.
    """
    sampler = schedule.sampler
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    embeddings = init.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([embeddings], lr=lr)
    num_train = sampler.config.num_train_timesteps
    for _ in range(steps):
        timesteps = torch.stack([torch.randint(0, num_train, (), generator=g) for g in generators]).to(clean.device)
        noise = torch.stack([torch.randn(clean.shape[1:], generator=g) for g in generators]).to(clean)
        noisy = sampler.add_noise(clean, noise, timesteps)
        target = (sampler.get_velocity(clean, noise, timesteps) if sampler.config.prediction_type == "v_prediction"
                  else noise)
        with torch.enable_grad():
            prediction = unet(noisy, timesteps, encoder_hidden_states=embeddings.to(clean.dtype), return_dict=False)[0]
            loss = (prediction.float() - target.float()).pow(2).flatten(1).mean(1).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
    return embeddings.detach().to(init.dtype)


def interpolate_embeddings(class_embeddings: torch.Tensor, image_embeddings: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * class_embeddings + (1.0 - lam) * image_embeddings


class ClassifierGuidance:
    """A noise correction that lowers the classifier's p(label) on the decoded x0 estimate.

    Gradients go through the VAE decoder and the classifier but not the UNet (the noise prediction is
    held fixed, as in universal guidance), which keeps a guided step affordable at 512 px. The shift is
    defined on the noise estimate; a v-prediction output is converted there and back
    (eps = a v + s z, v = (eps - s z) / a with a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar)), so both
    kinds of base are guided alike.
    """

    MIN_SIGNAL = 1e-3  # sqrt(alpha_bar) below this (zero terminal SNR): the x0 estimate holds no image yet

    def __init__(self, vae, classifier, info, schedule: DDIMSchedule, labels: torch.Tensor, *, scale: float,
                 target_prob: float) -> None:
        prediction_type = schedule.sampler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise InputError(f"--classifier-guidance works with epsilon- or v-prediction bases; this base predicts "
                             f"'{prediction_type}'")
        self.v_prediction = prediction_type == "v_prediction"
        self.vae, self.classifier, self.info = vae, classifier, info
        self.schedule, self.labels = schedule, labels
        self.scale, self.log_target = scale, float(torch.tensor(target_prob).log())

    def log_p_label(self, pixels: torch.Tensor) -> torch.Tensor:
        from lesiongen.classifier.preprocess import normalize, resize, shades_of_gray

        x = (pixels.float().clamp(-1, 1) + 1) / 2
        if self.info.color_constancy:
            x = shades_of_gray(x, self.info.color_constancy)
        x = normalize(resize(x, self.info.img_size), self.info.mean, self.info.std)
        log_probs = self.classifier(x).float().log_softmax(dim=1)
        return log_probs.gather(1, self.labels[:, None])[:, 0]

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, step: int, output: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.schedule.alphas_cumprod[timestep].float()
        signal, noise_level = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if signal < self.MIN_SIGNAL:
            return output
        prediction = output.detach().float()
        noise = signal * prediction + noise_level * latents.float() if self.v_prediction else prediction
        with torch.enable_grad():
            z = latents.detach().float().requires_grad_(True)
            x0 = (z - noise_level * noise) / signal
            log_p = self.log_p_label(decode(self.vae, x0.to(latents.dtype)))
            # Only images still above the target are pushed; the rest keep their plain prediction.
            objective = (log_p - self.log_target).clamp(min=0).sum()
            (grad,) = torch.autograd.grad(objective, z)
        shift = self.scale * noise_level * grad  # on the noise estimate
        return output + (shift / signal if self.v_prediction else shift).to(output.dtype)


def sample_variants(unet, vae, schedule: DDIMSchedule, inversion: Inversion, config: VariantConfig, *,
                    seeds: list[int], conditioning: Conditioning | None = None,
                    correction: NoiseCorrection | None = None) -> torch.Tensor:
    """`config.per_image` variants of every inverted image, as uint8 (B * per_image, 3, H, W), grouped by
    source. `seeds` has one seed per output image; `conditioning` (one row per source) overrides the
    inversion's sampling conditioning (the embedding method passes its interpolated embeddings)."""
    per_image = config.per_image
    if len(seeds) != len(inversion.clean) * per_image:
        raise ValueError(f"{len(seeds)} seeds for {len(inversion.clean)} images x {per_image} variants")
    fresh = seeded_normal(seeds, tuple(inversion.clean.shape[1:]), device=inversion.clean.device,
                          dtype=inversion.clean.dtype)
    latents, start = start_latents(schedule, inversion, strength=config.strength, renoise=config.renoise,
                                   fresh_noise=fresh, per_image=per_image)
    sampling = (conditioning or inversion.sampling).repeat_each(per_image)
    latents = ddim_sample(unet, schedule, latents, sampling, start_step=start, correction=correction)
    return decode_to_uint8(vae, latents)
