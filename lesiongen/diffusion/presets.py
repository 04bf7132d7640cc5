"""Architecture presets for Stable-Diffusion-format bases built from configs (random weights).

Every preset is a real SD 1.x layout (UNet2DConditionModel + AutoencoderKL + CLIP text encoder with the
49,408-token tokenizer + DDIM scheduler), only narrower, so code tested on `tiny` takes the same path as
a downloaded SD 1.5 folder.

- `tiny`: unit tests and the demo's shipped base; a few hundred K UNet parameters, 32 px, milliseconds per
  step on CPU.
- `small`: in-house pretraining (derm-dev); a few M parameters, 64 px (VAE factor 4).
- `sd15`: SD 1.5's exact shapes (512 px); for GPU benchmarks only.

The native resolution is written into the saved configs: `vae.config.sample_size` is the image size and
`unet.config.sample_size` the latent size, so `unet.sample_size * vae_scale_factor` (what diffusers'
pipelines use as default height / width) equals it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from lesiongen.errors import InputError

# SD 1.5's noise schedule (its scheduler_config.json), used by every preset so prompts, strengths and
# step counts mean the same thing on an in-house base and on a downloaded one.
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
SD15_VAE_SCALING_FACTOR = 0.18215


@dataclass(frozen=True)
class BasePreset:
    """Configs of one base architecture; `unet`, `vae` and `text_encoder` are constructor kwargs."""

    name: str
    resolution: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD15_SCHEDULER))
    description: str = ""

    def __post_init__(self) -> None:
        factor = self.vae_scale_factor
        if self.resolution % factor:
            raise ValueError(f"preset {self.name}: resolution {self.resolution} is not a multiple of the "
                             f"VAE scale factor {factor}")
        if self.unet["cross_attention_dim"] != self.text_encoder["hidden_size"]:
            raise ValueError(f"preset {self.name}: unet.cross_attention_dim must equal text_encoder.hidden_size")
        if len(self.unet["down_block_types"]) != len(self.unet["block_out_channels"]):
            raise ValueError(f"preset {self.name}: one UNet down block per entry of block_out_channels")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    def unet_config(self) -> dict[str, Any]:
        return {"sample_size": self.latent_size, "in_channels": 4, "out_channels": 4, **copy.deepcopy(self.unet)}

    def vae_config(self) -> dict[str, Any]:
        blocks = len(self.vae["block_out_channels"])
        return {
            "sample_size": self.resolution,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "down_block_types": ("DownEncoderBlock2D",) * blocks,
            "up_block_types": ("UpDecoderBlock2D",) * blocks,
            "scaling_factor": SD15_VAE_SCALING_FACTOR,
            **copy.deepcopy(self.vae),
        }

    def text_encoder_config(self) -> dict[str, Any]:
        # bos/eos/pad ids of the real CLIP tokenizer; max_position_embeddings = model_max_length.
        return {
            "vocab_size": 49_408,
            "max_position_embeddings": 77,
            "bos_token_id": 49_406,
            "eos_token_id": 49_407,
            "pad_token_id": 1,
            "hidden_act": "quick_gelu",
            **copy.deepcopy(self.text_encoder),
        }


def _sd_unet(channels: tuple[int, ...], *, cross_attn_levels: int, layers_per_block: int,
             cross_attention_dim: int, heads: int, norm_groups: int = 32) -> dict[str, Any]:
    """SD's UNet layout: cross-attention on the first `cross_attn_levels` levels, plain last level(s)."""
    plain = len(channels) - cross_attn_levels
    down = ("CrossAttnDownBlock2D",) * cross_attn_levels + ("DownBlock2D",) * plain
    up = ("UpBlock2D",) * plain + ("CrossAttnUpBlock2D",) * cross_attn_levels
    return {
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "down_block_types": down,
        "up_block_types": up,
        "cross_attention_dim": cross_attention_dim,
        # diffusers' historical name: for SD 1.x this is the number of heads.
        "attention_head_dim": heads,
        "norm_num_groups": norm_groups,
    }


PRESETS: dict[str, BasePreset] = {
    "tiny": BasePreset(
        name="tiny",
        resolution=32,
        unet=_sd_unet((32, 32), cross_attn_levels=1, layers_per_block=1, cross_attention_dim=32, heads=4,
                      norm_groups=8),
        vae={"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8},
        text_encoder={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "projection_dim": 32},
        description="unit tests and the demo base: 32 px, ~0.4 M UNet parameters",
    ),
    "small": BasePreset(
        name="small",
        resolution=64,
        unet=_sd_unet((32, 64, 128), cross_attn_levels=2, layers_per_block=1, cross_attention_dim=32, heads=4),
        vae={"block_out_channels": (16, 32, 64), "layers_per_block": 1, "norm_num_groups": 16},
        text_encoder={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "projection_dim": 32},
        description="in-house pretraining: 64 px, ~3 M UNet parameters, 16x16 latents",
    ),
    "sd15": BasePreset(
        name="sd15",
        resolution=512,
        unet=_sd_unet((320, 640, 1280, 1280), cross_attn_levels=3, layers_per_block=2, cross_attention_dim=768,
                      heads=8),
        vae={"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},
        text_encoder={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "projection_dim": 768},
        description="Stable Diffusion 1.5's exact shapes (512 px); GPU benchmarks only",
    ),
}


def get_preset(name: str) -> BasePreset:
    if name not in PRESETS:
        raise InputError(f"unknown base preset '{name}'; expected one of {sorted(PRESETS)}")
    return PRESETS[name]
