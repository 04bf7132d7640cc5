"""Is a score held out? What a classifier trained on, checked against the images it is scored on.

A model records, in classifier.json, the sha256 of the manifest it trained on and the leakage warnings of
its synthetic training rows (variants of test images). An evaluation repeats those warnings and adds one
when the scored images, or their lesions, were training images: a manifest indexed again with another
split puts earlier training images into its test split without any error.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from lesiongen.classifier.models import ClassifierInfo
from lesiongen.data.manifest import Manifest, load_manifest
from lesiongen.errors import InputError
from lesiongen.utils.hashing import sha256_file

TRAINED_ON_TEST = "this model trained on them, so its test-set metrics are not held out"


def leakage_warnings(synthetic_rows: pd.DataFrame, consequence: str = TRAINED_ON_TEST) -> list[str]:
    """Why a model trained on these synthetic rows has no held-out test score: the warnings their manifests
    carry (test mining), and any row made from a test image even without one (its split is its source's)."""
    column = synthetic_rows.get("leakage_warning", pd.Series(dtype=str))
    warnings = sorted({w for w in column.fillna("").astype(str) if w})
    from_test = int((synthetic_rows["split"] == "test").sum())
    if from_test:
        warnings.append(f"LEAKAGE: {from_test} synthetic images were made from TEST-split images; "
                        f"{consequence}")
    return warnings


def held_out_warnings(info: ClassifierInfo, manifest: Manifest, rows: pd.DataFrame, split: str,
                      manifest_sha256: str) -> list[str]:
    """Why the metrics of `info`'s model on `rows` (real rows of `manifest`'s `split`, whose file has
    `manifest_sha256`) are not held out."""
    data = info.training.get("data", {})
    warnings = list(data.get("leakage_warnings", []))
    trained_sha = data.get("manifest_sha256")
    trained_path = info.training.get("config", {}).get("manifest")
    if trained_sha is None or trained_path is None or manifest.path is None:
        return warnings  # a model from an older version, or one trained from memory: nothing to check against
    if manifest_sha256 == trained_sha:
        if split == "train":
            warnings.append(f"the model trained on these images (split 'train' of {manifest.where}); this is "
                            "its training fit, not a held-out score")
        return warnings
    if not Path(trained_path).is_file() or sha256_file(trained_path) != trained_sha:
        warnings.append(f"{manifest.where} is not the manifest the model trained on ({trained_path}), which is "
                        "gone or has changed since, so whether these images were training images is not checked")
        return warnings
    try:
        trained = load_manifest(trained_path)
    except InputError as err:
        warnings.append(f"the model's training manifest could not be read ({err}); not checked")
        return warnings
    train = trained.split("train", allow_empty=True)
    train = train.subset(~train.is_synthetic)
    trained_images = {os.path.normpath(p) for p in train.image_paths()}
    trained_lesions = set(train.df["group_id"].astype(str))
    images = [os.path.normpath(manifest.root / p) for p in rows["image"]]
    seen = pd.Series([p in trained_images for p in images], index=rows.index)
    seen |= rows["group_id"].astype(str).isin(trained_lesions)
    if seen.any():
        warnings.append(
            f"LEAKAGE: {int(seen.sum())} of the {len(rows)} '{split}' images of {manifest.where} "
            f"({rows.loc[seen, 'group_id'].nunique()} lesions) were training images, or of lesions that trained, "
            f"in {trained_path}, the manifest the model trained on; these metrics are not held out. Evaluate "
            "with the manifest the model trained on")
    return warnings
