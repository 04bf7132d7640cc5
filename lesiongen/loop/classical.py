"""The classical-augmentation arm: copies of the same hard cases made with flips, rotations, crops and
colour jitter instead of a diffusion model, in the same numbers per source image and class as the mined
arm added. The comparison mined vs classical then isolates the generator; mined vs random isolates the
mining.

Rows follow the manifest contract for synthetic images (`synthetic=1`, `source_image`, `method`,
`strength`, `seed`, `generator_hash`) and keep their source's `group_id` and `split`.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from lesiongen.data.images import read_rgb
from lesiongen.data.manifest import Manifest, write_manifest
from lesiongen.errors import InputError
from lesiongen.loop.config import ClassicalConfig
from lesiongen.loop.layout import MANIFEST_NAME
from lesiongen.utils.atomic import atomic_path

METHOD = "classical"


def matched_sources(synthetic: list[Manifest], real: Manifest, seed: int) -> list[tuple[pd.Series, int]]:
    """(real row, copies) with the per-source counts of `synthetic`; its unsourced (class-prompted)
    images are matched by training images of the same class drawn at random."""
    real_rows = real.df.set_index("image", drop=False)
    wanted: dict[str, int] = {}
    unsourced: dict[str, int] = {}
    for manifest in synthetic:
        sources = manifest.df.get("source_image", pd.Series("", index=manifest.df.index)).fillna("")
        for source, label in zip(sources, manifest.df["label"], strict=True):
            if source:
                if source not in real_rows.index:
                    raise InputError(f"{manifest.where}: source_image '{source}' is not an image of {real.where}")
                wanted[source] = wanted.get(source, 0) + 1
            else:
                unsourced[label] = unsourced.get(label, 0) + 1
    plan = [(real_rows.loc[source], n) for source, n in sorted(wanted.items())]
    rng = random.Random(seed)
    train = real.df[real.df["split"] == "train"]
    for label, n in sorted(unsourced.items()):
        pool = list(train.loc[train["label"] == label, "image"])
        for source in (rng.choice(pool) for _ in range(n)) if pool else ():
            plan.append((real_rows.loc[source], 1))
    return plan


def augment_copy(image: torch.Tensor, config: ClassicalConfig, generator: torch.Generator) -> torch.Tensor:
    """One random classical augmentation of a uint8 (3, H, W) image; parameters drawn from `generator`."""
    import torchvision.transforms.v2.functional as F

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    _, height, width = image.shape
    area = uniform(*config.crop_scale) * height * width
    aspect = np.exp(uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_h = int(round(min(height, np.sqrt(area / aspect))))
    crop_w = int(round(min(width, np.sqrt(area * aspect))))
    top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
    left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
    out = F.resized_crop(image, top, left, crop_h, crop_w, [height, width], antialias=True)
    if config.dihedral:
        out = torch.rot90(out, int(torch.randint(0, 4, (), generator=generator)), dims=(1, 2))
        if bool(torch.randint(0, 2, (), generator=generator)):
            out = out.flip(2)
    out = F.adjust_brightness(out, uniform(1 - config.brightness, 1 + config.brightness))
    out = F.adjust_contrast(out, uniform(1 - config.contrast, 1 + config.contrast))
    out = F.adjust_saturation(out, uniform(1 - config.saturation, 1 + config.saturation))
    out = F.adjust_hue(out, uniform(-config.hue, config.hue))
    return out


def make_classical_set(plan: list[tuple[pd.Series, int]], real: Manifest, config: ClassicalConfig, seed: int,
                       out_dir: Path) -> Manifest:
    """Write the augmented copies under `out_dir/images/` and their manifest `out_dir/manifest.csv`."""
    generator_hash = hashlib.sha256(json.dumps({"method": METHOD, **asdict(config)}, sort_keys=True,
                                               default=list).encode()).hexdigest()
    rows = []
    for source_row, copies in plan:
        source = real.root / source_row["image"]
        image = torch.from_numpy(np.array(read_rgb(source))).permute(2, 0, 1).contiguous()
        for _ in range(copies):
            copy_seed = _copy_seed(seed, source_row["image"], len(rows))
            augmented = augment_copy(image, config, torch.Generator().manual_seed(copy_seed))
            name = f"images/{Path(source_row['image']).stem}-{METHOD}-{copy_seed:08x}.png"
            with atomic_path(out_dir / name) as tmp:
                Image.fromarray(augmented.permute(1, 2, 0).numpy()).save(tmp)
            rows.append({"image": name, "label": source_row["label"], "split": source_row["split"],
                         "group_id": source_row["group_id"], "synthetic": 1, "source_image": source_row["image"],
                         "method": METHOD, "strength": "", "seed": copy_seed, "generator_hash": generator_hash})
    columns = ["image", "label", "split", "group_id", "synthetic", "source_image", "method", "strength", "seed",
               "generator_hash"]
    manifest = Manifest(pd.DataFrame(rows, columns=columns), out_dir, list(real.classes))
    write_manifest(manifest, out_dir / MANIFEST_NAME, method=METHOD, config=asdict(config))
    return manifest


def _copy_seed(seed: int, image: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}|{image}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
