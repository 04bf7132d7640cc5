"""Learned-token embeddings on disk: diffusers' `learned_embeds.safetensors` and AUTOMATIC1111's files.

- diffusers: one key per token, the key IS the token (`{"<derm-mel>": (n_vectors, dim)}`). A file with
  several tokens loads with `pipe.load_textual_inversion(list(sd.values()), token=list(sd))`.
- A1111 / ComfyUI: one file per token whose name is the trigger word. Safetensors files hold a single
  `emb_params` tensor (the form both tools read); the older pickled `.pt` form is a dict with
  `string_to_param: {"*": tensor}`, `string_to_token`, `name`, `step`. diffusers loads either with
  `pipe.load_textual_inversion(path, token="<derm-mel>")`; without `token=` it would be called
  `emb_params` (a measured pitfall).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lesiongen.diffusion.lora_files import read_tensors, write_safetensors
from lesiongen.errors import InputError
from lesiongen.utils.atomic import atomic_path

DIFFUSERS_EMBEDDINGS_FILE = "learned_embeds.safetensors"
A1111_KEY = "emb_params"
PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt")


def trigger_word(token: str) -> str:
    """A file-name-safe trigger word for a token: `<derm-mel>` -> `derm-mel` (A1111 uses the file name)."""
    word = token.strip("<>")
    if not word or any(c in word for c in '/\\:*?"|<> '):
        raise InputError(f"token '{token}' cannot be turned into a file name")
    return word


def save_diffusers_embeddings(path: str | os.PathLike, embeddings: dict[str, torch.Tensor],
                              metadata: dict[str, str] | None = None) -> Path:
    return write_safetensors(path, {t: e.float() for t, e in embeddings.items()}, dict(metadata or {}))


def save_a1111_embedding(path: str | os.PathLike, vectors: torch.Tensor, metadata: dict[str, str] | None = None,
                         *, step: int = 0) -> Path:
    """One token's vectors (n, dim) as an A1111 embedding; the suffix picks safetensors or the `.pt` form."""
    path = Path(path)
    vectors = vectors.detach().float().cpu().reshape(-1, vectors.shape[-1])
    if path.suffix == ".safetensors":
        return write_safetensors(path, {A1111_KEY: vectors}, dict(metadata or {}))
    if path.suffix != ".pt":
        raise InputError(f"{path}: an A1111 embedding is a .safetensors or .pt file")
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, "step": step,
            "sd_checkpoint": None, "sd_checkpoint_name": (metadata or {}).get("lesiongen.base", "")}
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def load_embeddings(path: str | os.PathLike, *, token: str | None = None,
                    allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read any supported embedding file into token -> (n, dim); A1111 files take `token` or `<file stem>`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: embedding file not found")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise InputError(f"{path}: pickle files run code when loaded; pass --allow-pickle if you trust it")
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or "string_to_param" not in data:
            raise InputError(f"{path}: expected an A1111 embedding with a 'string_to_param' entry")
        return {token or f"<{path.stem}>": _as_matrix(data["string_to_param"]["*"])}
    tensors = read_tensors(path)
    if set(tensors) == {A1111_KEY}:
        return {token or f"<{path.stem}>": _as_matrix(tensors[A1111_KEY])}
    if token is not None and len(tensors) == 1:
        return {token: _as_matrix(next(iter(tensors.values())))}
    if not tensors or any(t.ndim not in (1, 2) for t in tensors.values()):
        raise InputError(f"{path}: expected token -> (vectors, dim) tensors or a single '{A1111_KEY}' tensor")
    return {name: _as_matrix(t) for name, t in tensors.items()}


def _as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().reshape(-1, tensor.shape[-1])
