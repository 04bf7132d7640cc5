"""Adapter folders: what `finetune` leaves behind and every later stage loads.

    adapter.json                        method, base + base hash, class -> token map, resolution, files
    pytorch_lora_weights.safetensors    diffusers LoRA with its LoraConfig (alpha survives)
    <name>_kohya.safetensors            the same LoRA for A1111 / ComfyUI, true alpha, ss_* / modelspec.*
    learned_embeds.safetensors          every class token (diffusers keys = tokens)
    embeddings/<trigger>.safetensors    one A1111 / ComfyUI embedding per class token
    pipeline/                           method `full`: the whole fine-tuned pipeline (tokens included)
    README.md                           model card

`adapter.json` is written last, so a folder that has one is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from lesiongen import __version__
from lesiongen.diffusion.embedding_files import (
    DIFFUSERS_EMBEDDINGS_FILE,
    load_embeddings,
    save_a1111_embedding,
    save_diffusers_embeddings,
    trigger_word,
)
from lesiongen.diffusion.fingerprint import pipeline_hash
from lesiongen.diffusion.lora_files import DIFFUSERS_LORA_FILE, LoraWeights, save_diffusers_lora, save_kohya_lora
from lesiongen.errors import InputError
from lesiongen.utils.atomic import write_json
from lesiongen.utils.hashing import sha256_file

ADAPTER_FILE = "adapter.json"
EMBEDDINGS_DIR = "embeddings"
PIPELINE_DIR = "pipeline"
METHODS = ("lora", "ti", "lora+ti", "full")

logger = logging.getLogger(__name__)


@dataclass
class AdapterInfo:
    """The contents of `adapter.json`."""

    method: str
    base: str
    base_hash: str
    classes: dict[str, str]  # class key -> learned token
    num_vectors: int
    resolution: int
    prompt_file: str
    name: str = "lesiongen"
    steps: int = 0
    lora: dict = field(default_factory=dict)  # rank, alpha, target_modules, text_encoder
    training: dict = field(default_factory=dict)  # settings and results quoted by the model card
    files: dict[str, list[str]] = field(default_factory=dict)  # role -> paths relative to the folder
    lesiongen_version: str = __version__

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method '{self.method}' is not one of {list(METHODS)}")

    @property
    def has_lora(self) -> bool:
        return self.method in ("lora", "lora+ti")

    def save(self, folder: str | os.PathLike) -> Path:
        return write_json(Path(folder) / ADAPTER_FILE, asdict(self))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> AdapterInfo:
        path = Path(folder) / ADAPTER_FILE
        if not path.is_file():
            is_pipeline = (Path(folder) / "model_index.json").is_file()
            hint = " (it looks like a pipeline folder: pass it as the base)" if is_pipeline else ""
            raise InputError(f"{folder}: not an adapter folder, no {ADAPTER_FILE}{hint}; "
                             "`lesiongen finetune` writes one when training finishes")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise InputError(f"{path}: not a valid adapter description ({err})") from err

    def metadata(self) -> dict[str, str]:
        """safetensors header entries that let a bare weights file describe itself."""
        return {
            "lesiongen.version": self.lesiongen_version,
            "lesiongen.method": self.method,
            "lesiongen.base": self.base,
            "lesiongen.base_hash": self.base_hash,
            "lesiongen.classes": json.dumps(self.classes),
            "lesiongen.num_vectors": str(self.num_vectors),
            "lesiongen.resolution": str(self.resolution),
            "lesiongen.prompt_file": self.prompt_file,
            "lesiongen.steps": str(self.steps),
        }


def kohya_metadata(info: AdapterInfo, lora: LoraWeights) -> dict[str, str]:
    """sd-scripts' `ss_*` and Stability's `modelspec.*` keys, which A1111 / ComfyUI show for a LoRA."""
    rank, alpha = lora.summary("unet" if "unet" in lora.layers else next(iter(lora.layers)))
    res = f"{info.resolution}x{info.resolution}"
    return {
        **info.metadata(),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": Path(info.base).name,
        "ss_resolution": f"({info.resolution}, {info.resolution})",
        "ss_max_train_steps": str(info.steps),
        "ss_learning_rate": str(info.training.get("lr", "")),
        "ss_num_train_images": str(info.training.get("num_train_images", "")),
        "ss_output_name": info.name,
        "ss_training_comment": f"lesiongen {info.method}; trigger words: {', '.join(info.classes.values())}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": info.name,
        "modelspec.resolution": res,
        "modelspec.trigger_phrase": ", ".join(info.classes.values()),
        "modelspec.description": f"Dermoscopy LoRA ({info.method}) for classes {', '.join(info.classes)}",
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }


def embedding_metadata(info: AdapterInfo, cls: str, token: str) -> dict[str, str]:
    return {**info.metadata(), "lesiongen.class": cls, "lesiongen.token": token,
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/textual-inversion",
            "modelspec.title": trigger_word(token), "modelspec.trigger_phrase": trigger_word(token)}


def kohya_file_name(info: AdapterInfo) -> str:
    return f"{info.name}_kohya.safetensors"


def write_lora_files(folder: Path, info: AdapterInfo, lora: LoraWeights) -> list[str]:
    save_diffusers_lora(folder / DIFFUSERS_LORA_FILE, lora, info.metadata())
    save_kohya_lora(folder / kohya_file_name(info), lora, kohya_metadata(info, lora))
    return [DIFFUSERS_LORA_FILE, kohya_file_name(info)]


def write_embedding_files(folder: Path, info: AdapterInfo, embeddings: dict[str, torch.Tensor]) -> list[str]:
    save_diffusers_embeddings(folder / DIFFUSERS_EMBEDDINGS_FILE, embeddings, info.metadata())
    written = [DIFFUSERS_EMBEDDINGS_FILE]
    for cls, token in info.classes.items():
        relative = f"{EMBEDDINGS_DIR}/{trigger_word(token)}.safetensors"
        save_a1111_embedding(folder / relative, embeddings[token], embedding_metadata(info, cls, token),
                             step=info.steps)
        written.append(relative)
    return written


def save_adapter(folder: str | os.PathLike, info: AdapterInfo, *, lora: LoraWeights | None = None,
                 embeddings: dict[str, torch.Tensor] | None = None, pipeline=None,
                 card_extras: dict | None = None) -> Path:
    """Write every format of a trained adapter, the model card, and `adapter.json` last."""
    from lesiongen.diffusion.model_card import render_model_card
    from lesiongen.utils.atomic import atomic_dir, write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info.files = {}
    if lora is not None:
        info.files["lora"] = write_lora_files(folder, info, lora)
    if embeddings:
        info.files["embeddings"] = write_embedding_files(folder, info, embeddings)
    if pipeline is not None:
        with atomic_dir(folder / PIPELINE_DIR) as tmp:
            pipeline.save_pretrained(tmp, safe_serialization=True)
        info.files["pipeline"] = [PIPELINE_DIR]
    write_text(folder / "README.md", render_model_card(info, **(card_extras or {})))
    info.save(folder)
    return folder


def adapter_hash(folder: str | os.PathLike) -> str:
    """sha256 over the adapter's own files (not its checkpoints or validation images); a saved `full`
    pipeline counts by its memoised pipeline hash, so a 4 GB folder is read once, not per call."""
    folder = Path(folder)
    info = AdapterInfo.load(folder)
    digest = hashlib.sha256()
    for relative in sorted([ADAPTER_FILE, *(r for paths in info.files.values() for r in paths)]):
        path = folder / relative
        digest.update(f"{relative}:{pipeline_hash(path) if path.is_dir() else sha256_file(path)}\n".encode())
    return digest.hexdigest()


def check_adapter_base(base: str, adapter: str | os.PathLike) -> tuple[str, str]:
    """(base hash, adapter hash); an adapter trained on another base is refused, not silently applied (its
    images would be recorded under a base it never learned on)."""
    info = AdapterInfo.load(adapter)
    base_hash = pipeline_hash(base)
    if info.base_hash != base_hash:
        raise InputError(f"--adapter {adapter} was trained on another base: its adapter.json names {info.base} "
                         f"(sha256 {info.base_hash[:12]}...), but --base {base} has sha256 {base_hash[:12]}...; "
                         "pass the base it was fine-tuned from (or leave --base out: the adapter names it)")
    return base_hash, adapter_hash(adapter)


def apply_adapter(pipe, folder: str | os.PathLike, *, allow_pickle: bool = False):
    """Load an adapter folder's LoRA and learned tokens into `pipe` (in place) and return it."""
    folder = Path(folder)
    info = AdapterInfo.load(folder)
    if info.method == "full":
        raise InputError(f"{folder}: a `full` fine-tune is a whole pipeline; load it with load_adapted_pipeline")
    if info.has_lora:
        pipe.load_lora_weights(str(folder), weight_name=DIFFUSERS_LORA_FILE)
    embeddings = load_embeddings(folder / DIFFUSERS_EMBEDDINGS_FILE, allow_pickle=allow_pickle)
    pipe.load_textual_inversion(list(embeddings.values()), token=list(embeddings))
    return pipe


def load_adapted_pipeline(base, adapter_dir: str | os.PathLike | None = None, *, allow_pickle: bool = False,
                          torch_dtype=None):
    """The base pipeline with the adapter's LoRA and tokens applied (`full`: the saved pipeline itself).

    `base` is a path (diffusers folder, single file, hub id) or an already loaded pipeline.
    """
    from lesiongen.diffusion.loading import load_pipeline

    if adapter_dir is not None and AdapterInfo.load(adapter_dir).method == "full":
        return load_pipeline(Path(adapter_dir) / PIPELINE_DIR, allow_pickle=allow_pickle, torch_dtype=torch_dtype)
    if isinstance(base, (str, os.PathLike)):
        pipe = load_pipeline(base, allow_pickle=allow_pickle, torch_dtype=torch_dtype)
        if adapter_dir is not None:
            _warn_if_other_base(base, AdapterInfo.load(adapter_dir))
    else:
        pipe = base
    if adapter_dir is not None:
        apply_adapter(pipe, adapter_dir, allow_pickle=allow_pickle)
    return pipe


def _warn_if_other_base(base, info: AdapterInfo) -> None:
    digest = pipeline_hash(base)
    if digest != info.base_hash:
        logger.warning("the adapter was trained on %s (sha256 %s...) but is applied to %s (sha256 %s...); "
                       "results may differ from its validation images", info.base, info.base_hash[:12], base,
                       digest[:12])
