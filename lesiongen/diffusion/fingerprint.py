"""Content hash of a base model (the `generator_hash` provenance of every synthetic image).

Only what defines the model is hashed: model_index.json and the files of the components it lists
(weights, configs, tokenizer), so training logs or sample grids stored beside a pipeline do not change
its identity. Per-file digests are memoised on (path, size, mtime) because an SD 1.5 folder is 4 GB.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lesiongen.errors import InputError
from lesiongen.utils.atomic import write_json
from lesiongen.utils.hashing import sha256_file

_HASHED_SUFFIXES = {".safetensors", ".json", ".txt", ".bin", ".ckpt", ".pt", ".pth", ".model"}


def pipeline_hash(path: str | os.PathLike) -> str:
    """sha256 (hex) of a base: a diffusers folder's components, a single checkpoint file, or a cached hub id."""
    local = Path(path).expanduser()
    if local.is_file():
        return _memo_sha256(local)
    if local.is_dir():
        return _folder_hash(local)
    from lesiongen.diffusion.loading import hub_offline, looks_like_hub_id

    if looks_like_hub_id(str(path)):
        from huggingface_hub import snapshot_download

        try:
            return _folder_hash(Path(snapshot_download(str(path), local_files_only=hub_offline())))
        except Exception as err:  # hub errors come in many types
            raise InputError(f"base model {path}: cannot hash it ({err})") from err
    raise InputError(f"base model {path}: no such file or folder")


def _folder_hash(folder: Path) -> str:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise InputError(f"{folder}: not a diffusers pipeline folder: no model_index.json")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    files = [index_file]
    for name, entry in sorted(index.items()):
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None or not (folder / name).is_dir():
            continue
        files += [p for p in (folder / name).rglob("*")
                  if p.is_file() and p.suffix.lower() in _HASHED_SUFFIXES and not p.name.startswith(".")]
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.relative_to(folder).as_posix().encode())
        digest.update(_memo_sha256(file).encode())
    return digest.hexdigest()


def _memo_file() -> Path:
    from lesiongen.utils.cache import cache_root

    return cache_root() / "file-sha256.json"


def _memo_sha256(path: Path) -> str:
    """sha256 of a file, reused while its size and mtime are unchanged (only for files over 16 MiB)."""
    stat = path.stat()
    if stat.st_size < 16 << 20:
        return sha256_file(path)
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = _memo_file()
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        memo = {}
    if key not in memo:
        memo[key] = sha256_file(path)
        try:
            write_json(memo_path, memo)
        except OSError:  # a read-only cache only costs speed
            pass
    return memo[key]
