"""safetensors writes whose bytes depend only on the tensors and the metadata.

safetensors keeps `__metadata__` in a Rust HashMap, so a file with two or more metadata entries comes out
with its header in a different order in every process: identical weights, different sha256. Provenance
(adapter hashes, a classifier's `weights_sha256`) needs equal files for equal content, so after writing
we put the metadata in sorted order. The header keeps its length, so this is a rewrite in place.
"""

from __future__ import annotations

import json
import os
import struct

import torch

_HEADER_SIZE = struct.Struct("<Q")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, then the header's metadata in sorted order (see the module note)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    if metadata and len(metadata) > 1:
        sort_header_metadata(path)


def sort_header_metadata(path: str | os.PathLike) -> bool:
    """Rewrite a safetensors header with `__metadata__` sorted by key; False where that would change its length."""
    with open(path, "r+b") as handle:
        (length,) = _HEADER_SIZE.unpack(handle.read(_HEADER_SIZE.size))
        raw = handle.read(length)
        header = json.loads(raw)  # dicts keep the file's order: only the metadata is reordered
        if "__metadata__" not in header:
            return False
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        padding = len(raw) - len(text)
        # safetensors pads the header with spaces to an 8-byte boundary; an escaping difference between
        # serde_json and Python's json would show up as a length change: keep the original then
        if padding < 0 or raw[len(raw) - padding:] != b" " * padding:
            return False
        handle.seek(_HEADER_SIZE.size)
        handle.write(text + b" " * padding)
    return True
