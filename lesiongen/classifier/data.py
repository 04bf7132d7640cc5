"""From manifests to what the trainer holds: decoded uint8 images, labels, loss weights, a sampler.

- The real manifest's train split trains and its val split selects the model; evaluation uses real
  (non-synthetic) rows only. With `selection: unseen` a validation lesion that synthetic training images
  were made from (a mined hard case) no longer selects the model; `all` (the default) keeps every row;
  `reserved` selects on the selection reserve, a fixed share of the validation lesions that mining skips.
- Synthetic manifests must use the real manifest's classes. Per class, at most `max_synthetic_ratio`
  synthetic rows per real training row are kept (a seeded random subset), each with loss weight
  `synthetic_weight`. Rows of the splits in `synthetic_splits` are used; the others are counted and left out.
- Class imbalance is split between the sampler (class c drawn with mass ~ n_c^(1 - sampler_balance))
  and the loss (weight ~ n_c^(-loss_balance)); the two powers add up to the overall correction.
- Images are decoded once (lesiongen.data.images.load_uint8, cached on disk) into one uint8 tensor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Sampler

from lesiongen.classifier.config import TrainConfig
from lesiongen.classifier.held_out import leakage_warnings
from lesiongen.data.images import load_uint8
from lesiongen.data.manifest import Manifest, check_rows, load_manifest
from lesiongen.data.reserve import reserved_groups
from lesiongen.errors import InputError
from lesiongen.utils.hashing import sha256_file


def real_split(manifest: Manifest, split: str) -> Manifest:
    """The real (non-synthetic) rows of one split; an absent or empty split is an error naming the file."""
    part = manifest.split(split)
    real = part.subset(~part.is_synthetic)
    if len(real) == 0:
        raise InputError(f"{manifest.where}: split '{split}' has no real images (all {len(part)} rows are synthetic)")
    return real


def load_synthetic(paths: list[str], real: Manifest) -> list[Manifest]:
    """Load synthetic manifests and check that their labels are classes of the real manifest and that each
    has synthetic rows (a real manifest passed as --synthetic would otherwise add nothing, silently)."""
    from lesiongen.utils.outdir import warn_if_unfinished_manifest

    manifests = []
    for path in paths:
        synthetic = load_manifest(path)
        warn_if_unfinished_manifest(path)
        if not synthetic.is_synthetic.any():
            raise InputError(f"{path}: has no synthetic rows (column synthetic = 1); --synthetic expects a manifest "
                             "of generated images (e.g. from `lesiongen mine-and-generate`), not a real one")
        extra = sorted(set(synthetic.df["label"]) - set(real.classes))
        if extra:
            raise InputError(f"{path}: synthetic classes {extra} are not classes of the real manifest "
                             f"{real.where} ({real.classes})")
        check_sources(synthetic, real)
        manifests.append(synthetic)
    return manifests


def check_sources(synthetic: Manifest, real: Manifest) -> None:
    """A variant of a real image (`source_image` set) must come from an image of `real`, with its split and
    lesion id: variants made on another split of the same data (a re-indexed manifest) would put that
    split's test images into training unnoticed. Rows without a source (txt2img) need no check."""
    if "source_image" not in synthetic.df.columns:
        return
    df = synthetic.df
    sourced = synthetic.is_synthetic & df["source_image"].fillna("").astype(str).str.len().gt(0)
    if not sourced.any():
        return
    source_root = _source_root(synthetic, real)
    by_path = {os.path.normpath(real.root / image): i for i, image in enumerate(real.df["image"])}
    found = [by_path.get(os.path.normpath(source_root / image)) if ok else None
             for image, ok in zip(df["source_image"].astype(str), sourced)]
    in_real = pd.Series([i is not None for i in found], index=df.index)
    check_rows(df, in_real | ~sourced, synthetic.path or Path(synthetic.where), lambda row: (
        f": source_image '{row['source_image']}' is not an image of the real manifest {real.where}; these variants "
        "were made from another data set or manifest, so they could hold its val/test images. Train with the "
        "manifest they were made from"))
    real_split_of = pd.Series([real.df["split"].iat[i] if i is not None else "" for i in found], index=df.index)
    real_group_of = pd.Series([str(real.df["group_id"].iat[i]) if i is not None else "" for i in found],
                              index=df.index)
    same = (df["split"].astype(str) == real_split_of) & (df["group_id"].astype(str) == real_group_of)
    check_rows(df, same | ~sourced, synthetic.path or Path(synthetic.where), lambda row: (
        f": its source {row['source_image']} is split '{real_split_of[row.name]}', lesion "
        f"'{real_group_of[row.name]}' in {real.where}, but the row says split '{row['split']}', lesion "
        f"'{row['group_id']}'; the manifest was split again after the variants were made. Make the variants "
        "from this manifest's predictions, or train with the manifest they were made from"))


def _source_root(synthetic: Manifest, real: Manifest) -> Path:
    """The folder `source_image` paths are relative to: the recorded source manifest's image root, unless
    that manifest is gone or holds the same rows as `real`. A run folder copied with its data (the copy's
    manifest is byte-identical, the original still on disk) must check against the copy, not the original."""
    source_manifest = synthetic.meta.get("source_manifest")
    if not source_manifest or not Path(source_manifest).is_file():
        return real.root
    if real.path is not None and Path(real.path).is_file() and sha256_file(source_manifest) == sha256_file(real.path):
        return real.root
    return load_manifest(source_manifest).root


@dataclass
class TrainingTable:
    """One row per training image: absolute path, class index, loss weight, whether synthetic."""

    rows: pd.DataFrame  # columns: path, label, label_index, weight, synthetic, group_id, split, leakage_warning
    classes: list[str]
    summary: dict  # per-class counts, what was dropped and why (saved in classifier.json)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.rows["label_index"].to_numpy(), minlength=len(self.classes))


def training_table(real: Manifest, synthetic: list[Manifest], config: TrainConfig) -> TrainingTable:
    train = real.split("train")
    frames = [_rows(train.subset(~train.is_synthetic), synthetic=False)]
    real_counts = frames[0]["label"].value_counts()
    # Synthetic rows may also sit in the real manifest itself; they follow the same rules.
    candidates = [m.subset(m.is_synthetic) for m in [real, *synthetic]]
    pool = pd.concat([_rows(m, synthetic=True) for m in candidates if len(m)] or [frames[0].iloc[:0]],
                     ignore_index=True)
    in_splits = pool["split"].isin(config.synthetic_splits)
    kept = _cap_per_class(pool[in_splits], real_counts, config.max_synthetic_ratio, config.seed)
    kept = kept.assign(weight=config.synthetic_weight)
    rows = pd.concat([frames[0], kept], ignore_index=True)
    duplicated = rows["path"].duplicated()
    if duplicated.any():
        raise InputError(f"image {rows.loc[duplicated, 'path'].iloc[0]} is listed in more than one training manifest")
    index = {c: i for i, c in enumerate(real.classes)}
    rows["label_index"] = rows["label"].map(index).astype(np.int64)
    summary = {
        "manifest_sha256": sha256_file(real.path) if real.path else None,  # evaluate checks what trained
        "real": {c: int(real_counts.get(c, 0)) for c in real.classes},
        "synthetic_used": {c: int((kept["label"] == c).sum()) for c in real.classes},
        "synthetic_outside_splits": int((~in_splits).sum()),
        "synthetic_over_cap": int(in_splits.sum() - len(kept)),
        "synthetic_splits": list(config.synthetic_splits),
        "synthetic_manifests": [str(m.path) for m in synthetic],
        "leakage_warnings": leakage_warnings(kept),
    }
    return TrainingTable(rows, list(real.classes), summary)


@dataclass
class SelectionRows:
    """Which validation rows select the model (best epoch, early stopping), and which lesions no synthetic
    training image came from (their score is held out whatever the rule)."""

    mask: np.ndarray  # bool, one per real validation row: selects the model
    unseen: np.ndarray  # bool, one per real validation row: its lesion is no synthetic training image's source
    summary: dict  # saved in classifier.json under training.selection


def selection_rows(val: Manifest, table: TrainingTable, rule: str, reserve_share: float = 0.3) -> SelectionRows:
    """A mined hard case's variants keep its `group_id`, so some validation lesions may be sources of synthetic
    training images. `all` selects on every row anyway; `unseen` leaves those lesions out (falling back to
    every row, and saying so, when none is left); `reserved` selects on the selection reserve
    (lesiongen.data.reserve), which must be the source of no synthetic image."""
    groups = val.df["group_id"].astype(str).to_numpy()
    synthetic = table.rows[table.rows["synthetic"]]
    seen = set(synthetic["group_id"].astype(str)) & set(groups)
    unseen = ~np.isin(groups, sorted(seen))
    summary = {"rule": rule, "source_lesions": len(seen), "source_rows": int((~unseen).sum())}
    if rule == "reserved":
        reserve = reserved_groups(val.df, reserve_share)
        _refuse_reserved_sources(synthetic, seen & reserve, reserve_share)
        mask = np.isin(groups, sorted(reserve))
        summary.update(reserve_share=reserve_share, reserved_lesions=len(reserve))
    else:
        mask = unseen.copy() if rule == "unseen" else np.ones(len(groups), dtype=bool)
    if not mask.any():
        mask[:] = True
        summary.update(rule="all", note=(
            f"every validation lesion is the source of a synthetic training image ({len(seen)} lesions); "
            "the model is selected on all of them, so its validation score is not held out"))
    labels = val.df["label"].to_numpy()
    summary["rows"] = int(mask.sum())
    summary["classes_without_rows"] = sorted(set(val.classes) & set(labels) - set(labels[mask]))
    return SelectionRows(mask, unseen, summary)


def _refuse_reserved_sources(synthetic: pd.DataFrame, lesions: set[str], share: float) -> None:
    """Selecting on lesions the model trained variants of is what the reserve exists to prevent."""
    if not lesions:
        return
    hit = synthetic[synthetic["group_id"].astype(str).isin(lesions)]
    raise InputError(
        f"selection 'reserved': {len(hit)} synthetic training image(s) come from {len(lesions)} lesion(s) of the "
        f"selection reserve (e.g. {hit['path'].iloc[0]}, lesion {hit['group_id'].iloc[0]}); mine with "
        f"--selection-reserve {share:g} (mining.selection_reserve) so those lesions are never mined, or select "
        "with --selection all / unseen")


def _rows(manifest: Manifest, *, synthetic: bool) -> pd.DataFrame:
    df = manifest.df
    warning = df["leakage_warning"].fillna("").astype(str).to_numpy() if "leakage_warning" in df else ""
    return pd.DataFrame({
        "path": [os.path.join(manifest.root, p) for p in df["image"]],
        "label": df["label"].to_numpy(),
        "weight": 1.0,
        "synthetic": synthetic,
        "group_id": df["group_id"].to_numpy(),
        "split": df["split"].to_numpy(),
        "leakage_warning": warning,
    })


def _cap_per_class(pool: pd.DataFrame, real_counts: pd.Series, ratio: float | None, seed: int) -> pd.DataFrame:
    if ratio is None or pool.empty:
        return pool
    kept = []
    for label, group in pool.groupby("label", sort=True):
        limit = int(np.floor(ratio * real_counts.get(label, 0)))
        kept.append(group if len(group) <= limit else group.sample(n=limit, random_state=seed))
    return pd.concat(kept).sort_index()


@dataclass
class LabelledImages:
    """Decoded images (uint8, N x 3 x S x S, CPU) with labels and per-image loss weights."""

    images: Tensor
    labels: Tensor
    weights: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> LabelledImages:
        return LabelledImages(self.images.to(device), self.labels.to(device), self.weights.to(device))


def decode(paths: list[str] | list[Path], labels: list[int] | np.ndarray, size: int,
           weights: np.ndarray | None = None, cache_dir: str | os.PathLike | None = None) -> LabelledImages:
    images = load_uint8([Path(p) for p in paths], size, cache_dir=cache_dir)
    labels_t = torch.tensor(np.asarray(labels), dtype=torch.long)
    weights_t = torch.ones(len(labels_t)) if weights is None else torch.tensor(np.asarray(weights), dtype=torch.float32)
    return LabelledImages(images, labels_t, weights_t)


def balance_weights(counts: np.ndarray, power: float) -> Tensor:
    """Per-class weight ~ n_c^(-power), scaled to mean 1 over the classes that have images."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.where(counts > 0, np.maximum(counts, 1.0) ** -power, 0.0)
    present = counts > 0
    weights[present] /= weights[present].mean()
    return torch.as_tensor(weights, dtype=torch.float32)


class EpochSampler(Sampler[int]):
    """Training order for one epoch, a pure function of (seed, epoch): every process draws the same
    sequence (accelerate shards it) and a resumed run redraws the interrupted epoch exactly.

    An epoch is `num_samples` positions among `population` rows (default: as many as there are rows).
    Without weights they are permutations of the rows, one after another, cut to length; with weights,
    draws with replacement.
    """

    def __init__(self, population: int, weights: Tensor | None = None, seed: int = 0,
                 num_samples: int | None = None) -> None:
        self.population, self.weights, self.seed, self.epoch = population, weights, seed, 0
        self.num_samples = population if num_samples is None else num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is None:
            passes = -(-self.num_samples // self.population)
            order = torch.cat([torch.randperm(self.population, generator=generator) for _ in range(passes)])
            order = order[:self.num_samples]
        else:
            order = torch.multinomial(self.weights.double(), self.num_samples, replacement=True, generator=generator)
        return iter(order.tolist())


def training_sampler(table: TrainingTable, config: TrainConfig) -> EpochSampler:
    """One epoch draws every training row once on average (`epoch_length: all`), or as many rows as there are
    real training images (`real`), so that synthetic images replace real draws instead of adding steps."""
    rows = len(table.rows)
    draws = rows if config.epoch_length == "all" else int((~table.rows["synthetic"]).sum())
    if config.sampler_balance == 0:
        return EpochSampler(rows, None, config.seed, num_samples=draws)
    per_class = balance_weights(table.class_counts(), config.sampler_balance)
    per_image = per_class[torch.tensor(table.rows["label_index"].to_numpy())]
    return EpochSampler(rows, per_image, config.seed, num_samples=draws)
