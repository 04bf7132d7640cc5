"""Content hashes for provenance (generator_hash, adapter hashes, cache keys)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """One hash over several files (names relative to `root` included), order independent."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        name = str(path.relative_to(root)) if root is not None else path.name
        digest.update(name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def sha256_dir(root: str | os.PathLike, patterns: tuple[str, ...] = ("*.safetensors", "*.json", "*.txt")) -> str:
    root = Path(root)
    files = {p for pattern in patterns for p in root.rglob(pattern) if p.is_file()}
    return sha256_files(files, root=root)
