"""Class-prompted synthetic sets for the loop: the random arm (not mined, same per-class counts as the
mined arm) and the rare-class samples the mined arm may add.

Images come from `lesiongen generate` (one folder per class, so each class has its own count and seeds)
and pass the same filters as the mined variants (`lesiongen.synthesis.filters`: off-class by the current
classifier, near-copies of training images). `oversample` draws extra images so that, after the filters,
each class still reaches its count; a class that still falls short is drawn again, by its measured pass
rate, up to `max_oversample` times its count (a base that rarely draws a class would otherwise leave the
random arm smaller than the mined arm it is compared with). Image i of a class always has the same seed
and the first images of a class that pass are kept, in seed order, so the set does not depend on how
many were drawn beyond that.
"""

from __future__ import annotations

import json
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


def load_prompted_generator(ctx: StageContext):
    from lesiongen.diffusion.generate import load_generator

    settings = ctx.config.generate
    return load_generator(base=ctx.base_path(), adapter=ctx.layout.adapter, steps=settings.steps,
                          guidance=settings.guidance, scheduler=settings.scheduler, batch_size=settings.batch_size,
                          prompts=ctx.config.data.prompts, compile=settings.compile, fuse=settings.fuse,
                          allow_pickle=ctx.config.base.allow_pickle)


def generate_per_class(generator, draws: dict[str, int], out: Path, seed: int) -> list[Manifest]:
    """`draws[c]` class-prompted images of every class c into `out/<c>/` (resumable: a larger count only
    renders the images not there yet)."""
    from lesiongen.loop.stages import derive_seed

    manifests = []
    for label, count in sorted(draws.items()):
        folder = out / label
        generator.class_folder({label: count}, derive_seed(seed, label), folder, progress=False)
        if has_rows(folder / MANIFEST_NAME):
            manifests.append(load_manifest(folder / MANIFEST_NAME))
    return manifests


def load_variant_filter(ctx: StageContext, judge: Path):
    """The mined variants' filters (`lesiongen.synthesis.filters`), judged by `judge`."""
    import torch

    from lesiongen.config import from_dict
    from lesiongen.synthesis.pipeline import SynthesisConfig, load_filter

    # Only the filter part of the settings is used; predictions are not read here.
    inputs = {"predictions": "-", "manifest": str(ctx.layout.manifest), "base": ctx.base_path(),
              "classifier": str(judge)}
    config = from_dict(SynthesisConfig, {**ctx.config.synthesis, **inputs}, where="synthesis")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return load_filter(config, ctx.real_manifest(), device)


def next_draws(counts: dict[str, int], draws: dict[str, int], passed: dict[str, int],
               max_oversample: float) -> dict[str, int]:
    """How many images of each class to have drawn next: a class short of its count after the filters gets
    what its measured pass rate says it needs (10 % spare), never more than `max_oversample` x its count.
    Returns `draws` itself when nothing more is worth drawing."""
    planned = dict(draws)
    for label, count in counts.items():
        short = count - passed.get(label, 0)
        cap = max(draws[label], math.ceil(count * max_oversample))
        if short <= 0 or draws[label] >= cap:
            continue
        rate = passed.get(label, 0) / draws[label]
        needed = math.ceil(1.1 * short / rate) if rate > 0 else cap
        planned[label] = min(cap, draws[label] + max(needed, 1))
    return planned


def make_prompted_set(ctx: StageContext, counts: dict[str, int], folder: Path, judge: Path, *, seed: int) -> dict:
    """Generate (sharded over the processes), filter and select on the main process, and draw again for
    classes the filters left short; writes `candidates.csv` (every image, scored) and `manifest.csv` (the
    kept ones, at most `counts[c]` per class). Returns a summary for the stage record."""
    from lesiongen.loop.stages import is_main_process
    from lesiongen.runs import current_processes
    from lesiongen.utils.atomic import write_json
    from lesiongen.utils.distributed import together

    counts = {label: count for label, count in sorted(counts.items()) if count >= 1}
    if not counts:
        return {"requested": 0, "kept": 0}
    settings = ctx.config.generate
    draws = {label: math.ceil(count * settings.oversample) for label, count in counts.items()}
    generator, variant_filter, summary = load_prompted_generator(ctx), None, {}
    plan_file = folder / "draws.json"  # the main process's plan, read by every process
    while True:
        generated = generate_per_class(generator, draws, folder / GENERATED, seed)
        with together(current_processes()):
            if is_main_process():
                variant_filter = variant_filter or load_variant_filter(ctx, judge)
                summary, passed = _select(generated, counts, folder, variant_filter)
                write_json(plan_file, next_draws(counts, draws, passed, settings.max_oversample))
        planned = json.loads(plan_file.read_text(encoding="utf-8"))
        if planned == draws:
            return {**summary, "draws": draws} if summary else {}
        draws = planned


def _select(generated: list[Manifest], counts: dict[str, int], folder: Path, variant_filter):
    """Score every generated image, keep the first `counts[c]` that pass per class; (summary, passed per class)."""
    from lesiongen.data.images import load_uint8

    candidates = concat_manifests(generated, folder)
    pixels = load_uint8(candidates.image_paths(), variant_filter.size)
    scores = variant_filter.score(pixels, list(candidates.df["label"]))
    table = pd.concat([candidates.df.reset_index(drop=True), scores.reset_index(drop=True)], axis=1)
    with atomic_path(folder / CANDIDATES) as tmp:
        table.to_csv(tmp, index=False)
    passed = table[table["keep"] == 1]
    kept = pd.concat([group.head(counts[label]) for label, group in passed.groupby("label", sort=True)]
                     or [passed]).drop(columns=["keep", "reject_reason"])
    write_manifest(Manifest(kept.reset_index(drop=True), folder, list(candidates.classes)), folder / MANIFEST_NAME,
                   requested=counts, filters="same as the mined variants (lesiongen.synthesis.filters)")
    shortfall = {c: n - int((kept["label"] == c).sum()) for c, n in counts.items()}
    summary = {"requested": sum(counts.values()), "generated": len(table), "kept": len(kept),
               "shortfall": {c: n for c, n in shortfall.items() if n > 0}}
    return summary, {str(c): int(n) for c, n in passed["label"].value_counts().items()}
