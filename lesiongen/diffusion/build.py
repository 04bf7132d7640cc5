"""Build a random-weight Stable-Diffusion-format pipeline from a preset (diffusers' get_dummy_components)."""

from __future__ import annotations

import torch

from lesiongen.diffusion.presets import BasePreset, get_preset
from lesiongen.diffusion.tokenizer import build_clip_tokenizer


def build_components(preset: BasePreset | str, seed: int = 0) -> dict:
    """UNet, VAE, text encoder, tokenizer and DDIM scheduler, each initialised from its own seed.

    Seeding each component separately keeps one component's weights unchanged when another's
    config changes; `fork_rng` keeps the caller's global RNG state untouched.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = get_preset(preset) if isinstance(preset, str) else preset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**preset.unet_config())
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**preset.vae_config())
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**preset.text_encoder_config()))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder.eval(),
        "tokenizer": build_clip_tokenizer(),
        "scheduler": DDIMScheduler(**preset.scheduler),
    }


def pipeline_from_components(components: dict):
    """A StableDiffusionPipeline without safety checker or feature extractor (research use on lesions)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_pipeline(preset: str = "tiny", seed: int = 0):
    """A random-weight StableDiffusionPipeline of the named preset ('tiny', 'small', 'sd15')."""
    pipe = pipeline_from_components(build_components(preset, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
