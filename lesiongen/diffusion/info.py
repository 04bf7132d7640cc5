"""What a base model is: components, parameter counts, native resolution, prediction type, hash."""

from __future__ import annotations

import json
import os
from pathlib import Path


def native_resolution(pipe) -> int:
    """The image size a pipeline was trained at (what diffusers uses as default height and width)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_pipeline(pipe) -> dict:
    """A JSON-able summary of a loaded StableDiffusionPipeline."""
    components = {}
    for name, component in pipe.components.items():
        if component is None:
            continue
        entry: dict = {"class": type(component).__name__}
        if hasattr(component, "parameters"):
            entry["parameters"] = count_parameters(component)
            entry["dtype"] = str(next(component.parameters()).dtype).removeprefix("torch.")
        components[name] = entry
    components["tokenizer"]["vocab_size"] = len(pipe.tokenizer)
    components["tokenizer"]["model_max_length"] = int(pipe.tokenizer.model_max_length)
    return {
        "components": components,
        "total_parameters": sum(c.get("parameters", 0) for c in components.values()),
        "resolution": native_resolution(pipe),
        "latent_size": int(pipe.unet.config.sample_size),
        "latent_channels": int(pipe.unet.config.in_channels),
        "vae_scale_factor": int(pipe.vae_scale_factor),
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "cross_attention_dim": int(pipe.unet.config.cross_attention_dim),
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        "num_train_timesteps": int(pipe.scheduler.config.num_train_timesteps),
        "scheduler": type(pipe.scheduler).__name__,
    }


def describe_base(path: str | os.PathLike, *, allow_pickle: bool = False,
                  config: str | os.PathLike | None = None) -> dict:
    """Load a base through the common loader and describe it, with its content hash and provenance."""
    from lesiongen.diffusion.loading import load_pipeline, pipeline_hash

    pipe = load_pipeline(path, allow_pickle=allow_pickle, config=config)
    info = {"path": str(path), **describe_pipeline(pipe), "hash": pipeline_hash(path)}
    provenance = Path(path) / "lesiongen_base.json"
    if provenance.is_file():
        info["provenance"] = json.loads(provenance.read_text(encoding="utf-8"))
    return info


def format_info(info: dict) -> str:
    """Human-readable table of `describe_base`'s result."""
    lines = [f"base        {info['path']}", f"hash        {info['hash']}"]
    for name, comp in info["components"].items():
        params = f"{comp['parameters']:>13,} params  {comp['dtype']}" if "parameters" in comp else ""
        extra = f"  vocab {comp['vocab_size']:,}, max length {comp['model_max_length']}" if "vocab_size" in comp else ""
        lines.append(f"  {name:<13} {comp['class']:<22} {params}{extra}")
    lines += [
        f"parameters  {info['total_parameters']:,}",
        f"resolution  {info['resolution']} px (latents {info['latent_channels']}x{info['latent_size']}x"
        f"{info['latent_size']}, VAE scale factor {info['vae_scale_factor']}, latent scaling "
        f"{info['vae_scaling_factor']:.5g})",
        f"prediction  {info['prediction_type']} ({info['scheduler']}, {info['num_train_timesteps']} train steps)",
    ]
    if "provenance" in info:
        prov = info["provenance"]
        lines.append(f"trained     {prov.get('summary', json.dumps(prov)[:200])}")
    return "\n".join(lines)
