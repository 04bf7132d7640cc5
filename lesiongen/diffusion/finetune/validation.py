"""Validation grids: a few images per class from the model being trained, one row per class, as a PNG.

The same seeds are used at every step, so grids of successive steps show the same noise turning into
each class; that is how a user sees a token being learned (or a rare class collapsing).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lesiongen.data.prompts import PromptSet
from lesiongen.diffusion.generate import GenerationSettings, Renderer, class_requests
from lesiongen.utils.atomic import atomic_path

LABEL_WIDTH = 96


def render_validation_grid(pipe, prompts: PromptSet, *, images_per_class: int, steps: int, guidance: float,
                           resolution: int, seed: int = 1234, batch_size: int = 8):
    """A PIL image: one row per class (label on the left), `images_per_class` columns."""
    from diffusers import DDIMScheduler

    scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    try:
        settings = GenerationSettings(steps=steps, guidance=guidance, scheduler="ddim", batch_size=batch_size)
        renderer = Renderer(pipe, settings, prompts.negative_prompt, resolution)
        requests = class_requests(prompts, dict.fromkeys(prompts.class_names, images_per_class), seed)
        images = torch.cat([renderer(requests[i:i + batch_size]) for i in range(0, len(requests), batch_size)])
    finally:
        pipe.scheduler = scheduler
    return make_grid(images, prompts.class_names, images_per_class)


def make_grid(images: torch.Tensor, row_labels: list[str], columns: int):
    """Tile uint8 images (N, 3, H, W) row by row, writing each row's label in a left margin."""
    from PIL import Image, ImageDraw

    size = images.shape[-1]
    height = max(size, 14)
    grid = Image.new("RGB", (LABEL_WIDTH + columns * size, len(row_labels) * height), "white")
    draw = ImageDraw.Draw(grid)
    for row, label in enumerate(row_labels):
        draw.text((4, row * height + height // 2 - 6), label, fill="black")
        for col in range(columns):
            tile = images[row * columns + col].permute(1, 2, 0).numpy()
            grid.paste(Image.fromarray(tile), (LABEL_WIDTH + col * size, row * height))
    return grid


def save_grid(grid, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        grid.save(tmp)
    return Path(path)
