"""LoRA weights on disk: diffusers' format (with the adapter config, so alpha survives) and kohya's.

In memory a LoRA is peft's layout per component ("unet", "text_encoder"): `lora_A` / `lora_B` tensors
plus the `LoraConfig` that says how strongly they apply (scale = alpha / r, or alpha / sqrt(r) with
rsLoRA, per module through `rank_pattern` / `alpha_pattern`).

- diffusers: keys `unet.<module>.lora_A.weight`, the config in the `lora_adapter_metadata` header entry
  that `pipe.load_lora_weights` reads. Without it diffusers assumes alpha = r, the known pitfall.
- kohya (A1111, ComfyUI, sd-scripts): keys `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`
  and a scalar `.alpha` per module holding the TRUE alpha (scale = alpha / rank). diffusers'
  `convert_state_dict_to_kohya` writes alpha = rank whatever the config said; this module does not.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lesiongen.errors import InputError
from lesiongen.utils.atomic import atomic_path
from lesiongen.utils.tensor_files import save_safetensors

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}  # SD 1.x: one text encoder, "lora_te"


@dataclass
class LoraWeights:
    """peft-layout LoRA tensors and `LoraConfig` dicts, keyed by pipeline component."""

    layers: dict[str, dict[str, torch.Tensor]]
    configs: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layers:
            raise InputError("a LoRA needs at least one component with weights")
        for component, config in self.configs.items():
            if config.get("use_dora"):
                raise InputError(f"{component}: DoRA adapters are not supported by the kohya format")

    @classmethod
    def from_models(cls, adapter_name: str = "default", **models) -> LoraWeights:
        """Read the adapter `adapter_name` out of peft-injected models, e.g. `from_models(unet=pipe.unet)`."""
        from peft.utils import get_peft_model_state_dict

        layers, configs = {}, {}
        for component, model in models.items():
            if model is None or adapter_name not in getattr(model, "peft_config", {}):
                continue
            # only the LoRA layers: learned tokens resize the text encoder's embedding, and peft would then
            # add the whole embedding matrix, which LoRA loaders reject (tokens travel as embeddings instead)
            state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
            layers[component] = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            configs[component] = config_to_dict(model.peft_config[adapter_name])
        return cls(layers, configs)

    def modules(self, component: str) -> list[str]:
        return sorted({k.split(".lora_A.")[0] for k in self.layers[component] if ".lora_A." in k})

    def scale(self, component: str, module: str) -> float:
        """The factor peft multiplies `lora_B @ lora_A` by for this module."""
        from peft.utils.other import get_pattern_key

        config = self.configs.get(component, {})
        rank = self.rank(component, module)
        alpha_pattern = config.get("alpha_pattern") or {}
        alpha = config.get("lora_alpha", rank)  # no config: the diffusers convention, scale 1
        if alpha_pattern:
            key = get_pattern_key(list(alpha_pattern), module)
            alpha = alpha_pattern.get(key, alpha)
        return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)

    def rank(self, component: str, module: str) -> int:
        return self.layers[component][f"{module}.lora_A.weight"].shape[0]

    def summary(self, component: str = "unet") -> tuple[int, float]:
        """(most common rank, its alpha) for descriptive metadata."""
        rank = Counter(self.rank(component, m) for m in self.modules(component)).most_common(1)[0][0]
        module = next(m for m in self.modules(component) if self.rank(component, m) == rank)
        return rank, self.scale(component, module) * rank


def config_to_dict(config) -> dict:
    """A `LoraConfig` as JSON-ready data (sets become sorted lists, enums their values)."""
    out = {}
    for key, value in config.to_dict().items():
        if isinstance(value, set):
            value = sorted(value)
        out[key] = value
    return json.loads(json.dumps(out, default=str))


# What reading a file that is not (a complete) safetensors file raises: SafetensorError is no ValueError.
SAFETENSORS_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's `__metadata__` (empty when it has none)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return dict(handle.metadata() or {})
    except SAFETENSORS_ERRORS as err:
        raise InputError(f"{path}: not a readable safetensors file ({err})") from err


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except SAFETENSORS_ERRORS as err:
        raise InputError(f"{path}: not a readable safetensors file ({err})") from err


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Atomic safetensors write; every metadata value must already be a string."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_safetensors(tensors, tmp, metadata={"format": "pt", **metadata})
    return Path(path)


def save_diffusers_lora(path: str | os.PathLike, lora: LoraWeights, metadata: dict[str, str] | None = None) -> Path:
    """`pytorch_lora_weights.safetensors` that `pipe.load_lora_weights` reloads at the trained strength."""
    tensors = {f"{c}.{k}": v for c, layers in lora.layers.items() for k, v in layers.items()}
    adapter = {f"{c}.{k}": v for c, config in lora.configs.items() for k, v in config.items()}
    header = dict(metadata or {})
    if adapter:
        header[LORA_METADATA_KEY] = json.dumps(adapter, indent=2, sort_keys=True)
    return write_safetensors(path, tensors, header)


def load_diffusers_lora(path: str | os.PathLike) -> LoraWeights:
    """Read a diffusers/peft LoRA file; a file without adapter metadata gets diffusers' alpha = r."""
    tensors, header = read_tensors(path), read_header(path)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        if component not in KOHYA_PREFIXES or ".lora_" not in rest:
            raise InputError(f"{path}: key '{key}' is not a diffusers LoRA key (expected 'unet.' or "
                             "'text_encoder.' followed by a peft 'lora_A'/'lora_B' name)")
        layers.setdefault(component, {})[rest] = value
    configs: dict[str, dict] = {}
    if LORA_METADATA_KEY in header:
        for key, value in json.loads(header[LORA_METADATA_KEY]).items():
            component, _, name = key.partition(".")
            configs.setdefault(component, {})[name] = value
    return LoraWeights(layers, configs)


def kohya_module_path(component: str, module: str) -> str:
    """The module path kohya / A1111 files name: CLIP's layers under `text_model.`, where transformers < 5
    kept them (transformers 5 flattened CLIPTextModel, so peft names them from `encoder.`)."""
    if component == "text_encoder" and not module.startswith("text_model."):
        return f"text_model.{module}"
    return module


def kohya_state_dict(lora: LoraWeights, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """kohya keys with the true alpha of every module (kohya applies alpha / rank)."""
    out: dict[str, torch.Tensor] = {}
    for component, layers in lora.layers.items():
        prefix = KOHYA_PREFIXES[component]
        for module in lora.modules(component):
            down, up = layers[f"{module}.lora_A.weight"], layers[f"{module}.lora_B.weight"]
            name = f"{prefix}_{kohya_module_path(component, module).replace('.', '_')}"
            out[f"{name}.lora_down.weight"] = down if dtype is None else down.to(dtype)
            out[f"{name}.lora_up.weight"] = up if dtype is None else up.to(dtype)
            out[f"{name}.alpha"] = torch.tensor(lora.scale(component, module) * down.shape[0], dtype=torch.float32)
    return out


def save_kohya_lora(path: str | os.PathLike, lora: LoraWeights, metadata: dict[str, str] | None = None) -> Path:
    return write_safetensors(path, kohya_state_dict(lora), dict(metadata or {}))


def is_kohya_lora(keys) -> bool:
    return any(k.startswith(tuple(f"{p}_" for p in KOHYA_PREFIXES.values())) and ".lora_down." in k for k in keys)


def is_diffusers_lora(keys) -> bool:
    return any(k.startswith(("unet.", "text_encoder.")) and ".lora_A." in k for k in keys)


def lora_from_pipeline_loader(path: str | os.PathLike, pipe) -> LoraWeights:
    """Any LoRA file diffusers can load (kohya included), read back as it lands in `pipe`.

    kohya names replace every '.' of a module path with '_', which only the model's own module names
    can undo; letting diffusers load the file into the base and reading the adapter back gives exactly
    what `pipe.load_lora_weights` would apply, alpha included.
    """
    name = "lesiongen_import"
    try:
        pipe.load_lora_weights(str(path), adapter_name=name)
    except (ValueError, KeyError, RuntimeError) as err:
        raise InputError(f"{path}: diffusers cannot load this LoRA into the base ({err})") from err
    try:
        return LoraWeights.from_models(name, unet=pipe.unet, text_encoder=pipe.text_encoder)
    finally:
        pipe.delete_adapters(name)
