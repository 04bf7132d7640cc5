"""Shared pieces of the diffusion benchmarks: a random-weight base on disk, synthetic data, timing, tables."""

from __future__ import annotations

import gc
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()} (torch {torch.__version__})"


def save_base(preset: str, folder: Path) -> Path:
    """A random-weight base of `preset` saved as a diffusers folder (what `lesiongen finetune` reads)."""
    from lesiongen.diffusion.build import build_pipeline

    if not (folder / "model_index.json").is_file():
        build_pipeline(preset, seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


def synthetic_manifest(folder: Path, n_images: int, size: int = 128) -> Path:
    """`n_images` noise PNGs (derm-dev's 128 px) in a train-split manifest with the 7 HAM10000 classes."""
    import pandas as pd
    from PIL import Image

    from lesiongen.data.manifest import Manifest, write_manifest

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_images):
        name = f"images/img-{i:05d}.png"
        path = folder / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        rows.append({"image": name, "label": CLASSES[i % len(CLASSES)], "split": "train", "group_id": f"g{i}"})
    manifest = folder / "manifest.csv"
    write_manifest(Manifest(pd.DataFrame(rows), folder, CLASSES), manifest)
    return manifest


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step: Callable[[], None], warmup: int, steps: int) -> float:
    """Seconds per call of `step` after `warmup` calls (compilation and caches excluded)."""
    for _ in range(warmup):
        step()
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return (time.perf_counter() - started) / steps


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_table(title: str, rows: list[tuple[str, float, str]], reference: str) -> None:
    """rows: (name, images per second, note); ratios against the row named `reference`."""
    base = dict((name, value) for name, value, _ in rows)[reference]
    print(f"\n{title}")
    print(f"| pattern | img/s | vs {reference} | note |")
    print("| --- | ---: | ---: | --- |")
    for name, value, note in rows:
        print(f"| {name} | {value:.2f} | {value / base:.2f}x | {note} |")
