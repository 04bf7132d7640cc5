"""safetensors files lesiongen writes: equal content gives equal bytes (provenance hashes depend on it)."""

from __future__ import annotations

import json
import struct

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lesiongen.utils.hashing import sha256_file
from lesiongen.utils.tensor_files import save_safetensors, sort_header_metadata

METADATA = {f"key{i}": f"välue \"{i}\"\n/{i}" for i in range(8)} | {"format": "pt"}


def test_equal_content_gives_equal_files(tmp_path):
    # safetensors' HashMap orders the metadata differently for every map: eight writes would differ
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    hashes = set()
    for i in range(8):
        save_safetensors(tensors, tmp_path / f"{i}.safetensors", metadata=dict(reversed(METADATA.items())))
        hashes.add(sha256_file(tmp_path / f"{i}.safetensors"))
    assert len(hashes) == 1
    path = tmp_path / "0.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == METADATA
    header = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert list(header["__metadata__"]) == sorted(METADATA)
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_a_file_without_metadata_is_left_alone(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_safetensors({"a": torch.zeros(3)}, path)
    before = path.read_bytes()
    assert sort_header_metadata(path) is False and path.read_bytes() == before


def test_lora_and_embedding_files_are_reproducible(tmp_path):
    from lesiongen.diffusion.lora_files import write_safetensors

    hashes = {sha256_file(write_safetensors(tmp_path / f"{i}.safetensors", {"w": torch.ones(2)}, METADATA))
              for i in range(8)}
    assert len(hashes) == 1
