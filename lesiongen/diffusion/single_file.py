"""Single-file SD checkpoints (`.safetensors`, `.ckpt`) through diffusers' `from_single_file`, offline.

`from_single_file` needs the diffusers configs of the model the file holds; by default it downloads
them from the hub. Offline, they come from (in order): the `config` folder the caller names, configs
embedded in the file's safetensors metadata by `lesiongen base export`, or, for a checkpoint with SD 1.5's
shapes, configs written from the `sd15` preset. Anything else offline is an error saying what to pass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lesiongen.diffusion.presets import BasePreset, get_preset
from lesiongen.errors import InputError
from lesiongen.utils.atomic import atomic_dir, write_json

# safetensors metadata key under which `base export` stores the pipeline's component configs.
EMBEDDED_CONFIG_KEY = "lesiongen.diffusers_configs"
_SD15_SHAPES = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
}


def load_single_file(path: Path, *, torch_dtype=None, config: str | os.PathLike | None = None):
    from diffusers import StableDiffusionPipeline

    from lesiongen.diffusion.loading import dtype_kwargs, hub_offline

    if config is not None:
        config_dir: Path | None = Path(config)
        check_config_dir(config_dir)
    else:
        config_dir = _embedded_config_dir(path) or _sd15_config_dir_if_matching(path, offline=hub_offline())
    kwargs = {"config": str(config_dir), "local_files_only": True} if config_dir else {}
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path), **dtype_kwargs(torch_dtype), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **kwargs)
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise InputError(f"{path}: could not load it as a Stable Diffusion checkpoint ({type(err).__name__}: "
                         f"{str(err)[:300]})") from err


def check_config_dir(folder: Path) -> None:
    """A `--config` folder needs model_index.json and one config folder per component (no weights)."""
    if not (folder / "model_index.json").is_file():
        raise InputError(f"--config {folder}: not a diffusers folder (no model_index.json)")
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (folder / c).is_dir()]
    if missing:
        raise InputError(f"--config {folder}: missing component config folder(s) {missing}")


def write_config_dir(out: Path, configs: dict[str, dict], tokenizer_source=None) -> Path:
    """Write a configs-only diffusers folder (model_index.json + <component>/config.json + tokenizer)."""
    from lesiongen.diffusion.tokenizer import build_clip_tokenizer

    with atomic_dir(out) as tmp:
        for name, cfg in configs.items():
            file = "scheduler_config.json" if name == "scheduler" else "config.json"
            if name == "model_index":
                write_json(tmp / "model_index.json", cfg)
            elif name != "tokenizer":
                write_json(tmp / name / file, cfg)
        (tokenizer_source or build_clip_tokenizer()).save_pretrained(str(tmp / "tokenizer"))
    return out


def preset_configs(preset: BasePreset) -> dict[str, dict]:
    """The diffusers configs a folder of this preset would hold, without instantiating any weights."""
    return {
        "model_index": {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        },
        "unet": {"_class_name": "UNet2DConditionModel", **_jsonable(preset.unet_config())},
        "vae": {"_class_name": "AutoencoderKL", **_jsonable(preset.vae_config())},
        "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                         **_jsonable(preset.text_encoder_config())},
        "scheduler": {"_class_name": "DDIMScheduler", **preset.scheduler},
    }


def _jsonable(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg))


def _embedded_config_dir(path: Path) -> Path | None:
    if path.suffix.lower() != ".safetensors":
        return None
    from lesiongen.diffusion.lora_files import read_header  # the check `lesiongen export` uses too
    from lesiongen.utils.cache import cache_root
    from lesiongen.utils.hashing import sha256_file

    metadata = read_header(path)
    if EMBEDDED_CONFIG_KEY not in metadata:
        return None
    configs = json.loads(metadata[EMBEDDED_CONFIG_KEY])
    out = cache_root() / "single-file-configs" / sha256_file(path)[:16]
    if not (out / "model_index.json").is_file():
        write_config_dir(out, configs)
    return out


def _sd15_config_dir_if_matching(path: Path, *, offline: bool) -> Path | None:
    """SD 1.5 configs for a checkpoint with SD 1.5's shapes; None online (diffusers fetches its own)."""
    from lesiongen.utils.cache import cache_root

    shapes = _key_shapes(path, list(_SD15_SHAPES))
    if all(shapes.get(k) == v for k, v in _SD15_SHAPES.items()):
        out = cache_root() / "single-file-configs" / "sd15"
        if not (out / "model_index.json").is_file():
            write_config_dir(out, preset_configs(get_preset("sd15")))
        return out
    if not offline:
        return None
    found = ", ".join(f"{k} {tuple(v) if v else 'absent'}" for k, v in shapes.items())
    raise InputError(f"{path}: not an SD 1.5-shaped checkpoint ({found}); loading it offline needs its diffusers "
                     "configs: pass --config DIR (a diffusers folder of the same architecture) or convert the "
                     "file to a diffusers folder once while online")


def _key_shapes(path: Path, keys: list[str]) -> dict[str, tuple | None]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                names = set(handle.keys())
                return {k: tuple(handle.get_slice(k).get_shape()) if k in names else None for k in keys}
        except Exception as err:
            raise InputError(f"{path}: not a readable safetensors file ({err})") from err
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # caller allowed pickle
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k: tuple(state[k].shape) if k in state else None for k in keys}


def pipeline_configs(pipe) -> dict[str, dict]:
    """The component configs of a loaded pipeline, in the form `write_config_dir` takes."""

    def public(config) -> dict:
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}

    configs = preset_configs_template()
    configs["unet"] = {"_class_name": type(pipe.unet).__name__, **public(pipe.unet.config)}
    configs["vae"] = {"_class_name": type(pipe.vae).__name__, **public(pipe.vae.config)}
    configs["text_encoder"] = pipe.text_encoder.config.to_dict()
    configs["scheduler"] = {"_class_name": type(pipe.scheduler).__name__, **public(pipe.scheduler.config)}
    configs["model_index"]["scheduler"] = ["diffusers", type(pipe.scheduler).__name__]
    return _jsonable(configs)


def preset_configs_template() -> dict[str, dict]:
    return preset_configs(get_preset("tiny"))


def export_single_file(pipe, out: str | os.PathLike, *, half: bool = True, overwrite: bool = False) -> Path:
    """Write the pipeline as one original-format `.safetensors` (A1111 / ComfyUI / `from_single_file`).

    The diffusers configs travel in the file's metadata, so `load_pipeline` rebuilds a non-SD-1.5 shape
    (an in-house base) offline without a `--config` folder.
    """
    import torch

    from lesiongen.diffusion.ldm_format import pipeline_to_ldm
    from lesiongen.utils.atomic import atomic_path, ensure_writable
    from lesiongen.utils.tensor_files import save_safetensors

    out = ensure_writable(out, overwrite, what="checkpoint file")
    if out.suffix != ".safetensors":
        raise InputError(f"{out}: a single-file checkpoint must end in .safetensors")
    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in pipeline_to_ldm(pipe).items()}
    metadata = {
        EMBEDDED_CONFIG_KEY: json.dumps(pipeline_configs(pipe)),
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.resolution": str(int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)),
        "modelspec.prediction_type": str(pipe.scheduler.config.get("prediction_type", "epsilon")),
    }
    with atomic_path(out) as tmp:
        save_safetensors(state, tmp, metadata=metadata)
    return out
