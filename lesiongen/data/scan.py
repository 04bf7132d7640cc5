"""Decode every image once, in a thread pool, and keep what the index and the checks need.

Per image: whether it exists and decodes completely (a truncated JPEG fails here, not in epoch 3),
its size, the SHA-256 of its decoded RGB pixels (exact duplicates even across formats) and its
64-bit perceptual hash. The pHash is bit-identical to `imagehash.phash` (grey, 32x32 Lanczos, 2-D
DCT-II, 8x8 low band above its median) but the DCT runs once over the whole stack instead of once per
image, which is most of imagehash's per-image cost.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.fft
from PIL import Image, UnidentifiedImageError

PHASH_SIZE = 8
PHASH_HIGHFREQ_FACTOR = 4
MISSING, UNREADABLE, OK = "missing", "unreadable", "ok"


@dataclass
class ImageScan:
    """Per-image results, aligned with the input paths."""

    status: list[str]  # ok / missing / unreadable
    errors: list[str]  # '' when ok
    sizes: list[tuple[int, int]]  # (width, height); (0, 0) when not ok
    pixel_sha256: list[str]  # '' when not ok or hashes were not asked for
    phash: np.ndarray  # uint64 (N,); 0 when not ok or hashes were not asked for

    @property
    def ok(self) -> np.ndarray:
        return np.array([s == OK for s in self.status], dtype=bool)


def phash_hex(value: int | np.integer) -> str:
    """The 16-hex-digit form `str(imagehash.phash(img))` prints."""
    return f"{int(value):016x}"


def _phash_bits(grey_stack: np.ndarray) -> np.ndarray:
    """(N, 32, 32) uint8 -> (N,) uint64, the imagehash.phash bits packed row-major, first bit highest."""
    if len(grey_stack) == 0:
        return np.zeros(0, dtype=np.uint64)
    pixels = grey_stack.astype(np.float64)
    dct = scipy.fft.dct(scipy.fft.dct(pixels, axis=1), axis=2)[:, :PHASH_SIZE, :PHASH_SIZE]
    low = dct.reshape(len(dct), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64).ravel()


def scan_images(paths: list[Path], *, hashes: bool = True, workers: int | None = None) -> ImageScan:
    """Decode each of `paths` once; `hashes=False` only checks existence and readability."""
    n = len(paths)
    status, errors = [OK] * n, [""] * n
    sizes: list[tuple[int, int]] = [(0, 0)] * n
    sha = [""] * n
    side = PHASH_SIZE * PHASH_HIGHFREQ_FACTOR
    grey = np.zeros((n, side, side), dtype=np.uint8)

    def visit(i: int) -> None:
        path = Path(paths[i])
        if not path.is_file():
            status[i], errors[i] = MISSING, "file not found"
            return
        try:
            with Image.open(path) as img:
                img.load()  # forces a full decode: truncated files raise here
                rgb = img if img.mode == "RGB" else img.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            status[i], errors[i] = UNREADABLE, f"{type(err).__name__}: {err}"
            return
        sizes[i] = rgb.size
        if hashes:
            sha[i] = hashlib.sha256(rgb.tobytes()).hexdigest()
            grey[i] = np.asarray(rgb.convert("L").resize((side, side), Image.Resampling.LANCZOS))

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(visit, range(n)))
    phash = np.zeros(n, dtype=np.uint64)
    if hashes:
        ok = np.array([s == OK for s in status], dtype=bool)
        phash[ok] = _phash_bits(grey[ok])
    return ImageScan(status, errors, sizes, sha, phash)
