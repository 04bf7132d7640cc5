"""Diffusers -> original (LDM / A1111 / ComfyUI) key names for an SD 1.x pipeline of any width or depth.

The reverse of diffusers' `convert_ldm_*_checkpoint`. diffusers' own script for this direction
(`scripts/convert_diffusers_to_original_stable_diffusion.py`) hard-codes SD 1.5's four levels and two
layers per block; here the block indices come from the UNet / VAE config, so the in-house presets
export too. The round trip through `from_single_file` is what the tests check.
"""

from __future__ import annotations

import re

import torch

_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def unet_prefix_map(config) -> dict[str, str]:
    """diffusers module prefix -> LDM prefix, from the block layout in the UNet config."""
    layers = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    prefixes: dict[str, str] = {}
    for i in range(levels):
        for j in range(layers):
            block = 1 + i * (layers + 1) + j
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{block}.0."
            if down_attn[i]:
                prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{block}.1."
        if i < levels - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op."
        for j in range(layers + 1):
            block = i * (layers + 1) + j
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{block}.0."
            if up_attn[i]:
                prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{block}.1."
        if i < levels - 1:
            block = i * (layers + 1) + layers
            prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{block}.{2 if up_attn[i] else 1}."
    prefixes["mid_block.resnets.0."] = "middle_block.0."
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    prefixes["mid_block.resnets.1."] = "middle_block.2."
    return prefixes


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    prefixes = unet_prefix_map(config)
    out = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            new = f"{_UNET_TOP[module]}.{param}"
        else:
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is None:
                raise KeyError(f"UNet key {key} has no LDM equivalent")
            rest = key[len(prefix):]
            if ".resnets." in prefix:
                rest = _replace_first(rest, _UNET_RESNET)
            new = prefixes[prefix] + rest
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in state_dict.items():
        new = key
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.", new)
        new = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", new)
        if ".mid_block.attentions.0." in new:
            new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            new = _replace_first(new, [(f".attn_1.{a}", f".attn_1.{b}") for a, b in _VAE_ATTN])
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out["first_stage_model." + new] = value
    return out


def text_encoder_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x keeps HF CLIP's names under `cond_stage_model.transformer.text_model.`.

    transformers >= 5.6 flattened `CLIPTextModel` (no `text_model.` level); the file keeps the classic
    names every SD tool expects.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    return out


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """One original-format state dict holding UNet, VAE and text encoder (what A1111 / ComfyUI load)."""
    return {
        **unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
        **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
        **text_encoder_to_ldm(pipe.text_encoder.state_dict()),
    }


def _replace_first(text: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        if old in text:
            return text.replace(old, new, 1)
    return text
