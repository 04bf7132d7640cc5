"""Evaluate a classifier on one manifest split, and compare two classifiers on the same images.

An evaluation folder holds (DESIGN contract):
- `predictions.csv`: image (relative to the manifest root), label, split, group_id, pred, correct, loss
  (-log p(true)), margin (p(true) - max p(other)), prob_<class>...; the input of mining;
- `predictions.meta.json`: manifest path and sha256, split, classes, model;
- `metrics.json`: the clinical panel with lesion-level bootstrap intervals, thresholds, confusion matrix;
- `confusion_matrix.png`, `roc.png`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lesiongen.data.manifest import check_rows, numeric_column, read_csv_text
from lesiongen.errors import InputError
from lesiongen.metrics.bootstrap import bootstrap_ci
from lesiongen.metrics.clinical import ClinicalSpec, clinical_metrics, confusion_matrix, operating_points
from lesiongen.metrics.compare import paired_comparison
from lesiongen.utils.atomic import atomic_dir, write_json
from lesiongen.utils.hashing import sha256_file
from lesiongen.utils.outdir import check_replaceable, write_marker

PREDICTIONS = "predictions.csv"
PREDICTIONS_META = "predictions.meta.json"
METRICS = "metrics.json"
VAL_EVALUATION = "eval-val"  # inside a model folder: the trainer's evaluation of the model it selected
EVALUATION_META_KEYS = ("manifest", "manifest_sha256", "split", "classes", "model")
EVALUATION_ROW_COLUMNS = ("image", "label", "split", "group_id")


@dataclass
class BootstrapSettings:
    n_resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.n_resamples < 0:
            raise InputError(f"--bootstrap must be >= 0 resamples, got {self.n_resamples}")


@dataclass
class Evaluation:
    """Probabilities of one model on the real images of one split, with the rows they belong to."""

    rows: pd.DataFrame  # the manifest rows (image, label, split, group_id, ...)
    probs: Tensor  # (N, C) float
    target: Tensor  # (N,) class indices
    classes: list[str]
    meta: dict  # manifest, manifest_sha256, split, classes, model
    folder: Path | None = None  # the evaluation folder it was read from, if any
    # the positive class's operating thresholds chosen on validation (`val_thresholds`), applied unchanged
    fixed_thresholds: dict[str, float] | None = None
    thresholds_from: str = "the model's validation evaluation (eval-val/metrics.json)"
    # the trainer's validation evaluation: which rows selected the model (`selection`), and by which rule
    selection_mask: np.ndarray | None = None
    selection_rule: str | None = None

    @property
    def name(self) -> str:
        """How messages name it: its folder, else its model."""
        return str(self.folder if self.folder is not None else self.meta.get("model", "?"))

    @property
    def spec(self) -> ClinicalSpec:
        return ClinicalSpec.default_for(self.classes)

    def predictions(self) -> pd.DataFrame:
        probs = self.probs.double()
        n = len(self.target)
        p_true = probs[torch.arange(n), self.target]
        others = probs.clone()
        others[torch.arange(n), self.target] = -1.0
        pred = probs.argmax(dim=1)
        frame = pd.DataFrame({
            "image": self.rows["image"].to_numpy(),
            "label": [self.classes[i] for i in self.target.tolist()],
            "split": self.rows["split"].to_numpy(),
            "group_id": self.rows["group_id"].to_numpy(),
            "pred": [self.classes[i] for i in pred.tolist()],
            "correct": (pred == self.target).int().numpy(),
            "loss": (-p_true.clamp_min(1e-12).log()).numpy(),
            "margin": (p_true - others.max(dim=1).values).numpy(),
        })
        for i, name in enumerate(self.classes):
            frame[f"prob_{name}"] = probs[:, i].numpy()
        return frame

    def metrics(self, bootstrap: BootstrapSettings) -> dict:
        spec = self.spec
        if self.fixed_thresholds:
            spec = replace(spec, fixed_thresholds=tuple(self.fixed_thresholds.items()))
        probs, target = self.probs.double(), self.target
        groups = self.rows["group_id"].astype(str).tolist()
        intervals = {}
        if bootstrap.n_resamples:
            intervals = bootstrap_ci(lambda w: clinical_metrics(probs, target, spec, w), groups,
                                     bootstrap.n_resamples, bootstrap.seed, bootstrap.confidence)
        points = operating_points(probs, target, spec)
        confmat = confusion_matrix(probs.argmax(1), target, len(self.classes))
        return _json_safe({
            **self.meta,
            "n_images": len(target),
            "n_lesions": len(set(groups)),
            "positive_class": spec.positive_class,
            "metrics": clinical_metrics(probs, target, spec),
            f"ci{round(bootstrap.confidence * 100)}": intervals,
            "thresholds": {name: threshold for name, (_, threshold) in points.items()},
            **({"selection": self._selection_points()} if self._selects_on_part() else {}),
            **({"fixed_thresholds": {"from": self.thresholds_from,
                                     "thresholds": self.fixed_thresholds}} if self.fixed_thresholds else {}),
            "confusion_matrix": {"rows": "true class", "columns": "predicted class",
                                 "classes": self.classes, "counts": confmat.long().tolist()},
            "bootstrap": {"n_resamples": bootstrap.n_resamples, "seed": bootstrap.seed, "unit": "group_id",
                          "confidence": bootstrap.confidence, "method": "percentile"},
        })

    def _selects_on_part(self) -> bool:
        return self.selection_mask is not None and not bool(np.all(self.selection_mask))

    def _selection_points(self) -> dict:
        """The operating points on the rows that selected the model: the thresholds later splits apply. Rows
        the model trained variants of (mined lesions) would give it a threshold tuned on its own material."""
        mask = torch.from_numpy(np.asarray(self.selection_mask, dtype=bool))
        points = operating_points(self.probs.double()[mask], self.target[mask], self.spec)
        return {"rule": self.selection_rule, "n_images": int(mask.sum()),
                "thresholds": {name: threshold for name, (_, threshold) in points.items()},
                "metrics": {name: value for name, (value, _) in points.items()}}


def evaluation_meta(manifest_path: str | os.PathLike, split: str, classes: list[str], model: str) -> dict:
    return {"manifest": str(manifest_path), "manifest_sha256": sha256_file(manifest_path), "split": split,
            "classes": list(classes), "model": str(model)}


def write_evaluation(evaluation: Evaluation, out_dir: str | os.PathLike, bootstrap: BootstrapSettings,
                     *, overwrite: bool = False) -> dict:
    """Write the evaluation folder as a whole (a killed run leaves no half folder); returns metrics.json."""
    from lesiongen.classifier.plots import plot_confusion_matrix, plot_roc

    out_dir = check_replaceable(out_dir, "evaluation", overwrite, what="evaluation folder")
    report = evaluation.metrics(bootstrap)
    title = f"{Path(evaluation.meta['model']).name} on {evaluation.meta['split']}"
    with atomic_dir(out_dir) as tmp:
        evaluation.predictions().to_csv(tmp / PREDICTIONS, index=False)
        write_json(tmp / PREDICTIONS_META, evaluation.meta)
        write_json(tmp / METRICS, report)
        plot_confusion_matrix(np.asarray(report["confusion_matrix"]["counts"]), evaluation.classes,
                              tmp / "confusion_matrix.png", title=title)
        plot_roc(evaluation.probs.double(), evaluation.target, evaluation.spec, tmp / "roc.png",
                 operating_points(evaluation.probs.double(), evaluation.target, evaluation.spec), title=title)
        write_marker(tmp, "evaluation")
    return report


def evaluate_model(model_dir: str | os.PathLike, manifest_path: str | os.PathLike, split: str, *,
                   accelerator=None, batch_size: int = 256, cache_dir: str | os.PathLike | None = None,
                   tta: str | None = None) -> Evaluation:
    """Score a trained classifier on the real images of a manifest split (sharded under `accelerate launch`);
    `tta` replaces the model's own test-time augmentation (none | flip | dihedral)."""
    from accelerate import Accelerator

    from lesiongen.classifier.config import TTA_MODES
    from lesiongen.classifier.data import decode, real_split
    from lesiongen.classifier.held_out import held_out_warnings
    from lesiongen.classifier.models import load_classifier
    from lesiongen.classifier.predict import predict_distributed
    from lesiongen.data.manifest import load_manifest
    from lesiongen.utils.cache import cache_root

    accelerator = accelerator or Accelerator()
    if tta is not None and tta not in TTA_MODES:
        raise InputError(f"--tta must be one of {list(TTA_MODES)}, got {tta!r}")
    model, info = load_classifier(model_dir, device=accelerator.device)
    own_tta = info.tta  # the views the model's validation thresholds were chosen with
    info = replace(info, tta=tta) if tta is not None else info
    # Labels are read against the model's classes: a label the model does not know is an error naming the row.
    manifest = load_manifest(manifest_path, classes=list(info.classes))
    rows = real_split(manifest, split)
    cache = Path(cache_dir or cache_root()) / "images"
    with accelerator.main_process_first():  # the first process decodes and caches, the others read the cache
        data = decode(rows.image_paths(), rows.label_indices(), info.decode_size, cache_dir=cache)
    probs = predict_distributed(accelerator, model, info, data.images, batch_size=batch_size)
    meta = {**evaluation_meta(manifest_path, split, info.classes, str(model_dir)), "tta": info.tta}
    warnings = held_out_warnings(info, manifest, rows.df, split, meta["manifest_sha256"])
    if warnings:
        meta["leakage_warnings"] = warnings
    fixed, source = val_thresholds(model_dir) if split != "val" and info.tta == own_tta else (None, "")
    return Evaluation(rows.df, probs, data.labels, list(info.classes), meta, fixed_thresholds=fixed,
                      thresholds_from=source)


def val_thresholds(model_dir: str | os.PathLike) -> tuple[dict[str, float] | None, str]:
    """The operating thresholds the trainer's validation evaluation of its selected model chose, on the rows
    that selected it (its `selection` block, when only some did), and where they come from; None when the
    folder has none (a model from elsewhere).

    JSON has no infinity, so a threshold is null both where the point is undefined (no melanoma in val: its
    value is null too) and where only +inf reached it (call nothing positive: its value is defined); the
    first is left out, the second comes back as +inf."""
    path = Path(model_dir) / VAL_EVALUATION / METRICS
    source = "the model's validation evaluation (eval-val/metrics.json)"
    if not path.is_file():
        return None, source
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        chosen = report.get("selection") or report
        thresholds, values = chosen.get("thresholds", {}), chosen.get("metrics", {})
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise InputError(f"{path}: not the metrics.json `lesiongen train-classifier` writes ({err})") from err
    if not isinstance(thresholds, dict) or not isinstance(values, dict):
        raise InputError(f"{path}: 'thresholds' and 'metrics' must be mappings; expected the metrics.json "
                         "`lesiongen train-classifier` writes")
    if chosen is not report:
        source += (f", on the {chosen.get('n_images', '?')} validation images that selected the model "
                   f"(selection: {chosen.get('rule', '?')})")
    fixed = {}
    for name, threshold in thresholds.items():
        if threshold is None and values.get(name) is not None:
            fixed[name] = math.inf
        elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold):
            fixed[name] = float(threshold)
    return fixed or None, source


def read_evaluation(folder: str | os.PathLike) -> Evaluation:
    """An evaluation folder back as an `Evaluation` (probabilities from predictions.csv), every part checked:
    a hand-edited or truncated file is an error naming the file, column or row, not a wrong comparison."""
    folder = Path(folder)
    meta_path, csv_path = folder / PREDICTIONS_META, folder / PREDICTIONS
    if not csv_path.is_file() or not meta_path.is_file():
        raise InputError(f"{folder}: not an evaluation folder (needs {PREDICTIONS} and {PREDICTIONS_META})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{meta_path}: not valid JSON ({err}); `lesiongen evaluate` writes this file") from err
    missing = [k for k in EVALUATION_META_KEYS if k not in meta] if isinstance(meta, dict) else EVALUATION_META_KEYS
    if missing:
        raise InputError(f"{meta_path}: missing key(s) {list(missing)}; expected the file `lesiongen evaluate` writes")
    classes = meta["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise InputError(f"{meta_path}: 'classes' must be a list of class names, got {classes!r}")
    frame = read_csv_text(csv_path)
    prob_columns = [f"prob_{c}" for c in classes]
    missing = [c for c in (*EVALUATION_ROW_COLUMNS, *prob_columns) if c not in frame]
    if missing:
        raise InputError(f"{csv_path}: missing column(s) {missing}; expected the predictions `lesiongen evaluate` "
                         "writes")
    if frame.empty:
        raise InputError(f"{csv_path}: no rows")
    check_rows(frame, frame["label"].isin(classes), csv_path,
               lambda row: f": label '{row['label']}' is not one of {classes}")
    check_rows(frame, ~frame["image"].duplicated(), csv_path, lambda row: f": image '{row['image']}' is listed twice")
    for column in prob_columns:
        frame[column] = numeric_column(frame, column, csv_path, low=0.0, high=1.0)
    index = {c: i for i, c in enumerate(classes)}
    probs = torch.as_tensor(frame[prob_columns].to_numpy(dtype=np.float64))
    target = torch.tensor(frame["label"].map(index).to_numpy(dtype=np.int64))
    return Evaluation(frame, probs, target, classes, meta, folder=folder)


def compare_evaluations(a: Evaluation, b: Evaluation, bootstrap: BootstrapSettings) -> dict:
    """Paired comparison of two evaluations of the same images (B - A)."""
    for key in ("manifest_sha256", "split", "classes"):
        if a.meta.get(key) != b.meta.get(key):
            raise InputError(f"--compare: the two evaluations differ in {key} ({a.meta.get(key)!r} vs "
                             f"{b.meta.get(key)!r}); a paired comparison needs the same images")
    images_a, images_b = a.rows["image"], b.rows["image"]
    only_a, only_b = sorted(set(images_a) - set(images_b)), sorted(set(images_b) - set(images_a))
    if only_a or only_b:
        def listed(names: list[str]) -> str:
            return f"{len(names)} (e.g. '{names[0]}')" if names else "0"
        raise InputError(f"--compare: the two evaluations do not cover the same images: {listed(only_a)} only in "
                         f"A ({a.name}), {listed(only_b)} only in B ({b.name})")
    order_b = pd.Series(range(len(b.rows)), index=images_b.to_numpy())
    aligned = torch.tensor(order_b.loc[images_a.to_numpy()].to_numpy())
    differ = (b.target[aligned] != a.target).nonzero().flatten()
    if len(differ):
        i = int(differ[0])
        raise InputError(f"--compare: image '{images_a.iloc[i]}' is labelled '{a.classes[a.target[i]]}' in A "
                         f"({a.name}) but '{b.classes[b.target[aligned[i]]]}' in B ({b.name}); a paired comparison "
                         "needs the same labels")
    result = paired_comparison(a.probs.double(), b.probs.double()[aligned], a.target,
                               a.rows["group_id"].astype(str).tolist(), a.spec,
                               bootstrap.n_resamples, bootstrap.seed, bootstrap.confidence)
    warnings = list(dict.fromkeys([*a.meta.get("leakage_warnings", []), *b.meta.get("leakage_warnings", [])]))
    return _json_safe({"a": a.meta["model"], "b": b.meta["model"], "manifest": a.meta["manifest"],
                       "manifest_sha256": a.meta["manifest_sha256"], "split": a.meta["split"],
                       **({"leakage_warnings": warnings} if warnings else {}), **result})


def _json_safe(value):
    """NaN / inf are not JSON: undefined metrics (e.g. no positives in a split) are written as null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
