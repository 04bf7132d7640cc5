"""Decode images once into uint8 tensors (N, 3, H, W); everything downstream augments on the device.

A decoded set is cached as one `.npy` per (file list, size) so a second run memory-maps it instead of
decoding JPEGs again.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lesiongen.errors import InputError
from lesiongen.utils.atomic import atomic_path


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB, with an error naming the file if it is missing, corrupt or truncated."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{path}: unreadable or truncated image ({err})") from err


def to_uint8_array(img: Image.Image, size: int | None) -> np.ndarray:
    """HWC uint8; resized (bicubic, antialiased) to size x size when size is given."""
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def load_uint8(paths: list[Path], size: int, *, workers: int | None = None,
               cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Decode `paths` into a uint8 tensor (N, 3, size, size), optionally through an on-disk cache."""
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256()
        key.update(str(size).encode())
        for p in paths:
            p = Path(p)
            stat = p.stat() if p.exists() else None
            key.update(f"{p.resolve()}|{stat.st_size if stat else -1}|{stat.st_mtime_ns if stat else -1}\n".encode())
        cache_file = Path(cache_dir) / f"images-{size}px-{len(paths)}-{key.hexdigest()[:16]}.npy"
        if cache_file.is_file():
            return torch.from_numpy(np.load(cache_file, mmap_mode="r").copy())
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def decode(i: int) -> None:
        out[i] = to_uint8_array(read_rgb(paths[i]), size)

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(decode, range(len(paths))))
    chw = np.ascontiguousarray(out.transpose(0, 3, 1, 2))
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, chw)
    return torch.from_numpy(chw)
