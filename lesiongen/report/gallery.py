"""Pictures of what the run did: hard cases beside their reconstructions and variants, and per-class
grids of the synthetic images every arm trained on (a real image of the class first)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lesiongen.data.images import read_rgb, to_uint8_array
from lesiongen.data.manifest import Manifest, load_manifest
from lesiongen.errors import InputError
from lesiongen.loop.layout import ModelKey, RunLayout
from lesiongen.report.figures import image_grid

CELL_PX = 96


def _image(path, size: int = CELL_PX) -> np.ndarray | None:
    if path is None:
        return None
    try:
        return to_uint8_array(read_rgb(path), size)
    except InputError:  # a missing picture leaves a blank cell; the report still renders
        return None


def hard_case_gallery(layout: RunLayout, key: ModelKey, real: Manifest, n_cases: int = 6,
                      n_variants: int = 4) -> bytes | None:
    """Rows: the hardest mined cases of `key`'s round; columns: image, its DDIM reconstruction, and the
    variants that passed the filters."""
    from lesiongen.synthesis.outputs import HARD_CASES, reconstruction_path

    vary = layout.path(key.stage("vary"))
    cases_file = vary / HARD_CASES
    if not cases_file.is_file():
        return None
    cases = pd.read_csv(cases_file, dtype=str, keep_default_na=False).head(n_cases)
    if cases.empty:
        return None
    variants = _synthetic_rows(layout, key, "vary")
    rows, labels = [], []
    for _, case in cases.iterrows():
        row = [_image(real.root / case["image"]), _image(vary / reconstruction_path(case["label"], case["image"]))]
        if variants is not None:
            mine = variants.df[variants.df["source_image"] == case["image"]].head(n_variants)
            row += [_image(variants.root / p) for p in mine["image"]]
        rows.append(row)
        labels.append(f"{case['label']} → {case.get('pred', '?')}")
    columns = ["hard case", "reconstruction", *[f"variant {i + 1}" for i in range(n_variants)]]
    return image_grid(rows, labels, columns)


def class_sample_grid(layout: RunLayout, key: ModelKey, real: Manifest, per_class: int = 5) -> bytes | None:
    """Rows: classes; first column a real training image, then the arm's synthetic images of that class."""
    from lesiongen.loop.layout import SYNTHETIC_STAGES

    manifests = [m for leaf in SYNTHETIC_STAGES[key.arm] if (m := _synthetic_rows(layout, key, leaf)) is not None]
    if not manifests or not any(len(m) for m in manifests):
        return None
    train = real.df[real.df["split"] == "train"]
    rows = []
    for c in real.classes:
        examples = train.loc[train["label"] == c, "image"].head(1)
        row = [_image(real.root / p) for p in examples] or [None]
        for manifest in manifests:
            picked = manifest.df.loc[manifest.df["label"] == c, "image"].head(per_class - len(row) + 1)
            row += [_image(manifest.root / p) for p in picked]
        rows.append(row[: per_class + 1])
    return image_grid(rows, real.classes, ["real", *[f"synthetic {i + 1}" for i in range(per_class)]])


def _synthetic_rows(layout: RunLayout, key: ModelKey, leaf: str) -> Manifest | None:
    from lesiongen.loop.layout import MANIFEST_NAME

    path = layout.path(key.stage(leaf)) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return load_manifest(path)
    except InputError:  # an empty synthetic set (nothing mined) has no rows to show
        return None
