"""One loader for every Stable Diffusion base: a diffusers folder, a single-file checkpoint, a hub id.

Weights are read from safetensors only unless the caller opts into pickle (`--allow-pickle`), because
unpickling a `.ckpt` / `.bin` runs arbitrary code from whoever made the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lesiongen.errors import InputError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# The components a text-to-image SD 1.x / 2.x pipeline cannot run without.
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")


def dtype_kwargs(dtype) -> dict:
    """`dtype=` where diffusers has it (it deprecated `torch_dtype` in 0.4x), `torch_dtype=` before."""
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_resolve_dtype")
    return {"dtype" if renamed else "torch_dtype": dtype}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def load_pipeline(path: str | os.PathLike, *, allow_pickle: bool = False, torch_dtype=None,
                  config: str | os.PathLike | None = None):
    """Load a `StableDiffusionPipeline` from any base the toolkit accepts.

    - a diffusers folder (`model_index.json` + component subfolders), loaded with `from_pretrained`;
    - a single-file checkpoint (`.safetensors`; `.ckpt` with `allow_pickle`), loaded with
      `from_single_file`; `config` may name a diffusers folder holding the matching component configs
      (needed offline for anything but SD 1.x shapes, see `lesiongen.diffusion.single_file`);
    - a hub id (`org/name`) when the hub is reachable (HF_HUB_OFFLINE unset).

    `torch_dtype=None` loads every component in float32: diffusers upcasts fp16 files by itself but
    transformers >= 5 keeps a text encoder in its stored dtype, which would mix dtypes in one pipeline.
    """
    import torch

    torch_dtype = torch_dtype or torch.float32
    text = str(path)
    local = Path(text).expanduser()
    if local.is_dir():
        return _load_folder(local, allow_pickle=allow_pickle, torch_dtype=torch_dtype)
    if local.is_file():
        from lesiongen.diffusion.single_file import load_single_file

        check_weights_file(local, allow_pickle=allow_pickle)
        return load_single_file(local, torch_dtype=torch_dtype, config=config)
    if looks_like_hub_id(text) and not local.exists():
        return _load_hub(text, allow_pickle=allow_pickle, torch_dtype=torch_dtype)
    raise InputError(f"base model {text}: no such file or folder (expected a diffusers folder with "
                     "model_index.json, a single-file .safetensors checkpoint, or a hub id org/name)")


def check_weights_file(path: Path, *, allow_pickle: bool) -> None:
    """Refuse pickles unless allowed, and anything that is not a checkpoint file at all."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise InputError(f"{path}: '{suffix}' is a pickle file, which can run arbitrary code when loaded; "
                         "convert it to .safetensors or pass --allow-pickle if you trust its source")
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise InputError(f"{path}: not a checkpoint file (expected one of {list(SINGLE_FILE_SUFFIXES)}) "
                         "or a diffusers folder")


def check_pipeline_folder(folder: Path, *, allow_pickle: bool = False) -> dict:
    """Validate a diffusers pipeline folder and return its model_index.json; errors name what is missing
    or which file is unreadable (a safetensors header, a component's JSON config)."""
    from lesiongen.diffusion.lora_files import read_header

    index_file = folder / "model_index.json"
    if not index_file.is_file():
        hint = ""
        if (folder / "config.json").is_file() or (folder / "adapter.json").is_file():
            hint = " (it looks like a single model or adapter folder, not a whole pipeline)"
        raise InputError(f"{folder}: not a diffusers pipeline folder: no model_index.json{hint}; expected "
                         f"model_index.json and the subfolders {list(REQUIRED_COMPONENTS)}")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{index_file}: not valid JSON ({err})") from err
    missing_entries = [c for c in REQUIRED_COMPONENTS if not _component_declared(index, c)]
    if missing_entries:
        found = sorted(k for k in index if not k.startswith("_"))
        raise InputError(f"{index_file}: no {missing_entries} component(s); a Stable Diffusion pipeline "
                         f"needs {list(REQUIRED_COMPONENTS)} (found {found})")
    missing_dirs = [c for c in REQUIRED_COMPONENTS if not (folder / c).is_dir()]
    if missing_dirs:
        raise InputError(f"{folder}: model_index.json lists {missing_dirs} but the subfolder(s) are missing")
    for component in WEIGHT_COMPONENTS:
        sub = folder / component
        safetensors = list(sub.glob("*.safetensors"))
        pickles = [p for p in sub.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if not safetensors and not pickles:
            raise InputError(f"{sub}: no weights file (expected *.safetensors)")
        if not safetensors and not allow_pickle:
            raise InputError(f"{sub}: only pickle weights ({pickles[0].name}), which can run arbitrary code "
                             "when loaded; convert them to safetensors or pass --allow-pickle")
        for weights in safetensors:  # header only: a corrupt or truncated file fails here, naming itself
            read_header(weights)
    for component in REQUIRED_COMPONENTS:  # a broken config would otherwise be diffusers' OSError
        for config_file in sorted((folder / component).glob("*.json")):
            try:
                json.loads(config_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise InputError(f"{config_file}: not valid JSON ({err})") from err
    return index


def _component_declared(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def _load_folder(folder: Path, *, allow_pickle: bool, torch_dtype):
    from diffusers import StableDiffusionPipeline

    check_pipeline_folder(folder, allow_pickle=allow_pickle)
    # Safety checker / feature extractor are optional and absent from research bases.
    try:
        return StableDiffusionPipeline.from_pretrained(
            str(folder), **dtype_kwargs(torch_dtype), use_safetensors=None if allow_pickle else True,
            local_files_only=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    except (OSError, ValueError) as err:  # what the checks above cannot see, e.g. a config of the wrong shape
        raise InputError(f"{folder}: could not load it as a diffusers pipeline ({type(err).__name__}: "
                         f"{str(err)[:300]})") from err


def _load_hub(repo_id: str, *, allow_pickle: bool, torch_dtype):
    if hub_offline():
        raise InputError(f"base model {repo_id}: not a local file or folder, and it cannot be fetched as a hub "
                         "id because HF_HUB_OFFLINE is set; pass a local diffusers folder or .safetensors file")
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_pretrained(
            repo_id, **dtype_kwargs(torch_dtype), use_safetensors=None if allow_pickle else True,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    except (OSError, EnvironmentError) as err:
        raise InputError(f"base model {repo_id}: could not load it from the hub ({err})") from err


# The base's content hash lives beside the loader so callers import both from one place.
from lesiongen.diffusion.fingerprint import pipeline_hash  # noqa: E402,F401
