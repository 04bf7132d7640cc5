"""Class-prompted synthetic sets for the loop: the random arm (not mined, same per-class counts as the
mined arm) and the rare-class samples the mined arm may add.

Images come from `lesiongen generate` (one folder per class, so each class has its own count and seeds)
and pass the same filters as the mined variants (`lesiongen.synthesis.filters`: off-class by the current
classifier, near-copies of training images). `oversample` draws extra images so that, after the filters,
each class still reaches its count when it can; the first images of a class that pass are kept, in
seed order, so the set does not depend on how many were drawn beyond that.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from lesiongen.data.manifest import Manifest, concat_manifests, load_manifest, write_manifest
from lesiongen.loop.layout import MANIFEST_NAME, has_rows
from lesiongen.utils.atomic import atomic_path

if TYPE_CHECKING:
    from lesiongen.loop.stages import StageContext

GENERATED = "generated"
CANDIDATES = "candidates.csv"


def generate_per_class(ctx: StageContext, counts: dict[str, int], out: Path, seed: int) -> list[Manifest]:
    """`counts[c] x oversample` class-prompted images of every class c into `out/<c>/` (resumable)."""
    from lesiongen.diffusion.generate import load_generator
    from lesiongen.loop.stages import derive_seed

    wanted = {label: count for label, count in sorted(counts.items()) if count >= 1}
    if not wanted:
        return []
    settings = ctx.config.generate
    generator = load_generator(base=ctx.base_path(), adapter=ctx.layout.adapter, steps=settings.steps,
                               guidance=settings.guidance, scheduler=settings.scheduler,
                               batch_size=settings.batch_size, prompts=ctx.config.data.prompts,
                               compile=settings.compile, fuse=settings.fuse, allow_pickle=ctx.config.base.allow_pickle)
    manifests = []
    for label, count in wanted.items():
        folder = out / label
        generator.class_folder({label: math.ceil(count * settings.oversample)}, derive_seed(seed, label), folder,
                               progress=False)
        if has_rows(folder / MANIFEST_NAME):
            manifests.append(load_manifest(folder / MANIFEST_NAME))
    return manifests


def score_like_variants(ctx: StageContext, images: Manifest, judge: Path) -> pd.DataFrame:
    """The mined variants' filters applied to `images`: one row per image with `keep` and the scores."""
    import torch

    from lesiongen.config import from_dict
    from lesiongen.data.images import load_uint8
    from lesiongen.synthesis.pipeline import SynthesisConfig, load_filter

    # Only the filter part of the settings is used; predictions are not read here.
    inputs = {"predictions": "-", "manifest": str(ctx.layout.manifest), "base": ctx.base_path(),
              "classifier": str(judge)}
    config = from_dict(SynthesisConfig, {**ctx.config.synthesis, **inputs}, where="synthesis")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variant_filter = load_filter(config, ctx.real_manifest(), device)
    pixels = load_uint8(images.image_paths(), variant_filter.size)
    return variant_filter.score(pixels, list(images.df["label"]))


def make_prompted_set(ctx: StageContext, counts: dict[str, int], folder: Path, judge: Path, *, seed: int) -> dict:
    """Generate (sharded over the processes), then filter and select on the main process; writes
    `candidates.csv` (every image, scored) and `manifest.csv` (the kept ones, at most `counts[c]` per
    class). Returns a summary for the stage record."""
    from lesiongen.loop.stages import is_main_process

    generated = generate_per_class(ctx, counts, folder / GENERATED, seed)
    if not is_main_process():
        return {}
    if not generated:
        return {"requested": sum(counts.values()), "kept": 0}
    candidates = concat_manifests(generated, folder)
    scores = score_like_variants(ctx, candidates, judge)
    table = pd.concat([candidates.df.reset_index(drop=True), scores.reset_index(drop=True)], axis=1)
    with atomic_path(folder / CANDIDATES) as tmp:
        table.to_csv(tmp, index=False)
    passed = table[table["keep"] == 1]
    kept = pd.concat([group.head(counts[label]) for label, group in passed.groupby("label", sort=True)]
                     or [passed]).drop(columns=["keep", "reject_reason"])
    write_manifest(Manifest(kept.reset_index(drop=True), folder, list(candidates.classes)), folder / MANIFEST_NAME,
                   requested=counts, filters="same as the mined variants (lesiongen.synthesis.filters)")
    shortfall = {c: n - int((kept["label"] == c).sum()) for c, n in counts.items()}
    return {"requested": sum(counts.values()), "generated": len(table), "kept": len(kept),
            "shortfall": {c: n for c, n in shortfall.items() if n > 0}}
