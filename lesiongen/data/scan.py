"""Decode every image once, in a thread pool, and keep what the index and the checks need.

Per image: whether it exists and decodes completely (a truncated JPEG fails here, not in epoch 3),
its size, the SHA-256 of its decoded RGB pixels (exact duplicates even across formats) and two
perceptual hashes, bit-identical to `imagehash.phash` (grey, Lanczos to 4 x hash_size px, 2-D DCT-II,
the hash_size x hash_size low band above its median) with the DCT run once over the whole stack instead
of once per image, which is most of imagehash's per-image cost:

* 64 bits (hash_size 8): the common published form (derm-dev's labels.csv ships it);
* 256 bits (hash_size 16): the one near-duplicates are judged by, as the memorisation filters do (64 bits
  cannot tell dermoscopy apart: on derm-dev, 23 pairs under different lesion ids across splits lie within 2
  of 64 bits, and by eye only 2 of them are copies of one photo; within 24 of 256 bits lie exactly those 2).
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
WIDE_PHASH_SIZE = 16
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
    wide_phash: np.ndarray  # bool (N, 256), imagehash.phash(hash_size=16); False when not ok or not asked for

    @property
    def ok(self) -> np.ndarray:
        return np.array([s == OK for s in self.status], dtype=bool)


def phash_hex(value: int | np.integer) -> str:
    """The 16-hex-digit form `str(imagehash.phash(img))` prints."""
    return f"{int(value):016x}"


def phash_bits(grey_stack: np.ndarray, hash_size: int) -> np.ndarray:
    """(N, 4 hash_size, 4 hash_size) uint8 -> bool (N, hash_size**2), imagehash.phash's bits row-major."""
    if len(grey_stack) == 0:
        return np.zeros((0, hash_size * hash_size), dtype=bool)
    pixels = grey_stack.astype(np.float64)
    dct = scipy.fft.dct(scipy.fft.dct(pixels, axis=1), axis=2)[:, :hash_size, :hash_size]
    low = dct.reshape(len(dct), -1)
    return low > np.median(low, axis=1, keepdims=True)


def bits_hex(bits: np.ndarray) -> str:
    """One hash's bits (first bit highest) as hex, as `str(imagehash.phash(...))` prints them."""
    return np.packbits(bits).tobytes().hex()


def scan_images(paths: list[Path], *, hashes: bool = True, workers: int | None = None) -> ImageScan:
    """Decode each of `paths` once; `hashes=False` only checks existence and readability."""
    n = len(paths)
    status, errors = [OK] * n, [""] * n
    sizes: list[tuple[int, int]] = [(0, 0)] * n
    sha = [""] * n
    sides = {size: size * PHASH_HIGHFREQ_FACTOR for size in (PHASH_SIZE, WIDE_PHASH_SIZE)}
    grey = {size: np.zeros((n, side, side), dtype=np.uint8) for size, side in sides.items()}

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
            luma = rgb.convert("L")
            for size, side in sides.items():
                grey[size][i] = np.asarray(luma.resize((side, side), Image.Resampling.LANCZOS))

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(visit, range(n)))
    phash = np.zeros(n, dtype=np.uint64)
    wide = np.zeros((n, WIDE_PHASH_SIZE ** 2), dtype=bool)
    if hashes:
        ok = np.array([s == OK for s in status], dtype=bool)
        phash[ok] = np.packbits(phash_bits(grey[PHASH_SIZE][ok], PHASH_SIZE), axis=1).view(">u8").ravel()
        wide[ok] = phash_bits(grey[WIDE_PHASH_SIZE][ok], WIDE_PHASH_SIZE)
    return ImageScan(status, errors, sizes, sha, phash, wide)
