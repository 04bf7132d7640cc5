"""Clinical metrics of a multiclass skin-lesion classifier: functional form and torchmetrics `Metric`s.

Every functional metric takes an optional `sample_weight` (one non-negative weight per image). The
point estimate uses none; the lesion-level bootstrap (`lesiongen.metrics.bootstrap`) passes how many
times each image was drawn, so one implementation serves both.

Conventions (the ones sklearn uses):
- confusion matrix rows are the true class, columns the predicted class;
- balanced accuracy is the mean sensitivity (recall) over the classes present in the targets;
- a class's ROC is one-vs-rest on its probability; an image is called positive when its score is
  >= the threshold, so the operating points are the distinct scores plus "call nothing positive";
- sensitivity at specificity s is the best sensitivity among operating points with specificity >= s
  (and specificity at sensitivity likewise); a class without positives or negatives gives NaN.

The `Metric` classes keep either a summed confusion matrix or the concatenated scores as state, so
under DDP `compute()` sees every process's images (torchmetrics syncs them); feed each image once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

# ----------------------------------------------------------------------------- functional


def confusion_matrix(preds: Tensor, target: Tensor, num_classes: int, sample_weight: Tensor | None = None) -> Tensor:
    """(C, C) float64 counts: row = true class, column = predicted class."""
    weight = _weight(target, sample_weight)
    flat = target.long() * num_classes + preds.long()
    return torch.bincount(flat, weights=weight, minlength=num_classes * num_classes).view(num_classes, num_classes)


def accuracy_from_confmat(confmat: Tensor) -> Tensor:
    total = confmat.sum()
    return confmat.diagonal().sum() / total if total > 0 else _nan()


def sensitivity_from_confmat(confmat: Tensor) -> Tensor:
    """Per-class sensitivity (recall); NaN for a class with no true images."""
    positives = confmat.sum(dim=1)
    return torch.where(positives > 0, confmat.diagonal() / positives.clamp_min(1e-300), _nan())


def specificity_from_confmat(confmat: Tensor) -> Tensor:
    """Per-class specificity: true negatives / all images of the other classes."""
    total = confmat.sum()
    negatives = total - confmat.sum(dim=1)
    false_positives = confmat.sum(dim=0) - confmat.diagonal()
    return torch.where(negatives > 0, (negatives - false_positives) / negatives.clamp_min(1e-300), _nan())


def balanced_accuracy_from_confmat(confmat: Tensor) -> Tensor:
    return torch.nanmean(sensitivity_from_confmat(confmat))


def balanced_accuracy(preds: Tensor, target: Tensor, num_classes: int, sample_weight: Tensor | None = None) -> Tensor:
    return balanced_accuracy_from_confmat(confusion_matrix(preds, target, num_classes, sample_weight))


@dataclass(frozen=True)
class RocCurve:
    """One-vs-rest ROC: operating points sorted from the strictest threshold (+inf) to the loosest."""

    fpr: Tensor
    tpr: Tensor
    thresholds: Tensor

    @property
    def defined(self) -> bool:
        return not (torch.isnan(self.tpr[-1]) or torch.isnan(self.fpr[-1]))


def roc_curve(scores: Tensor, is_positive: Tensor, sample_weight: Tensor | None = None) -> RocCurve:
    """Weighted ROC at every distinct score (sklearn's `roc_curve(drop_intermediate=False)`)."""
    scores = scores.double()
    weight = _weight(scores, sample_weight)
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores, weight, positive = scores[order], weight[order], is_positive[order].double()
    true_pos = torch.cumsum(weight * positive, 0)
    false_pos = torch.cumsum(weight * (1.0 - positive), 0)
    # Tied scores share one threshold: keep the last position of each run of equal scores.
    last_of_run = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_run[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    zero = scores.new_zeros(1)
    true_pos = torch.cat([zero, true_pos[last_of_run]])
    false_pos = torch.cat([zero, false_pos[last_of_run]])
    thresholds = torch.cat([scores.new_full((1,), math.inf), sorted_scores[last_of_run]])
    n_pos, n_neg = true_pos[-1], false_pos[-1]
    tpr = true_pos / n_pos if n_pos > 0 else torch.full_like(true_pos, math.nan)
    fpr = false_pos / n_neg if n_neg > 0 else torch.full_like(false_pos, math.nan)
    return RocCurve(fpr, tpr, thresholds)


def auroc(scores: Tensor, is_positive: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    curve = roc_curve(scores, is_positive, sample_weight)
    if not curve.defined:
        return _nan()
    return torch.trapezoid(curve.tpr, curve.fpr)


def sensitivity_at_specificity(scores: Tensor, is_positive: Tensor, min_specificity: float,
                               sample_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(best sensitivity with specificity >= min_specificity, the threshold that reaches it)."""
    curve = roc_curve(scores, is_positive, sample_weight)
    return _best_point(curve, curve.tpr, 1.0 - curve.fpr, min_specificity)


def specificity_at_sensitivity(scores: Tensor, is_positive: Tensor, min_sensitivity: float,
                               sample_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(best specificity with sensitivity >= min_sensitivity, the threshold that reaches it)."""
    curve = roc_curve(scores, is_positive, sample_weight)
    return _best_point(curve, 1.0 - curve.fpr, curve.tpr, min_sensitivity)


def _best_point(curve: RocCurve, maximise: Tensor, constrained: Tensor, minimum: float) -> tuple[Tensor, Tensor]:
    if not curve.defined:
        return _nan(), _nan()
    # A small tolerance so that e.g. 9/10 counts as reaching 0.90 despite float rounding.
    allowed = constrained >= minimum - 1e-12
    value = torch.where(allowed, maximise, torch.full_like(maximise, -1.0))
    best = int(torch.argmax(value))  # first (strictest) threshold among ties
    return maximise[best], curve.thresholds[best]


# ----------------------------------------------------------------------------- the whole clinical panel


@dataclass(frozen=True)
class ClinicalSpec:
    """Which numbers the clinical panel reports: classes, the class of concern, operating points."""

    classes: tuple[str, ...]
    positive_class: str | None = "mel"
    at_specificity: tuple[float, ...] = (0.80, 0.90)
    at_sensitivity: tuple[float, ...] = (0.80, 0.90)
    # Operating points fixed beforehand, (point name, threshold on p(positive)): the thresholds another
    # split (validation) chose. The points above are each split's own best ROC points, so on test they are
    # an ROC summary; a threshold applied unchanged is what a clinic would see.
    fixed_thresholds: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "fixed_thresholds", tuple((str(n), float(t)) for n, t in self.fixed_thresholds))
        if len(self.classes) < 2:
            raise ValueError(f"need at least two classes, got {list(self.classes)}")
        if self.positive_class is not None and self.positive_class not in self.classes:
            raise ValueError(f"positive class '{self.positive_class}' is not one of {list(self.classes)}")
        for level in (*self.at_specificity, *self.at_sensitivity):
            if not 0.0 < level < 1.0:
                raise ValueError(f"operating points must lie in (0, 1), got {level}")

    @classmethod
    def default_for(cls, classes: Sequence[str], positive_class: str | None = "mel") -> ClinicalSpec:
        """The standard panel; the positive class is dropped when a data set does not have it."""
        return cls(tuple(classes), positive_class if positive_class in classes else None)

    def sens_at_spec_name(self, level: float) -> str:
        return f"{self.positive_class}_sensitivity@specificity={level:.2f}"

    def spec_at_sens_name(self, level: float) -> str:
        return f"{self.positive_class}_specificity@sensitivity={level:.2f}"

    def fixed_point_names(self, point: str) -> tuple[str, str]:
        """(sensitivity, specificity) names at the fixed threshold of `point`, e.g. 'mel_sensitivity@
        specificity=0.90' -> 'mel_sensitivity@val_threshold(specificity=0.90)' and the specificity there."""
        target = point.split("@", 1)[1]
        return (f"{self.positive_class}_sensitivity@val_threshold({target})",
                f"{self.positive_class}_specificity@val_threshold({target})")


def clinical_metrics(probs: Tensor, target: Tensor, spec: ClinicalSpec,
                     sample_weight: Tensor | None = None) -> dict[str, float]:
    """Every scalar of the panel by name: accuracy, balanced_accuracy, macro_auroc, sensitivity/<c>,
    specificity/<c>, auroc/<c>, and the positive class's operating points."""
    num_classes = len(spec.classes)
    _check_inputs(probs, target, num_classes)
    confmat = confusion_matrix(probs.argmax(dim=1), target, num_classes, sample_weight)
    out = {
        "accuracy": accuracy_from_confmat(confmat),
        "balanced_accuracy": balanced_accuracy_from_confmat(confmat),
    }
    per_class_auroc = torch.stack([auroc(probs[:, i], target == i, sample_weight) for i in range(num_classes)])
    out["macro_auroc"] = torch.nanmean(per_class_auroc) if not torch.isnan(per_class_auroc).all() else _nan()
    for i, name in enumerate(spec.classes):
        out[f"sensitivity/{name}"] = sensitivity_from_confmat(confmat)[i]
        out[f"specificity/{name}"] = specificity_from_confmat(confmat)[i]
        out[f"auroc/{name}"] = per_class_auroc[i]
    for name, (value, _) in operating_points(probs, target, spec, sample_weight).items():
        out[name] = value
    if spec.fixed_thresholds and spec.positive_class is not None:
        index = spec.classes.index(spec.positive_class)
        called = probs[:, index].double()  # positive at or above the threshold, as roc_curve counts
        positive, weight = target == index, _weight(called, sample_weight)
        for point, threshold in spec.fixed_thresholds:
            sensitivity, specificity = spec.fixed_point_names(point)
            hit = (called >= threshold).double()
            n_pos, n_neg = (weight * positive).sum(), (weight * ~positive).sum()
            out[sensitivity] = (weight * hit * positive).sum() / n_pos if n_pos > 0 else _nan()
            out[specificity] = (weight * (1 - hit) * ~positive).sum() / n_neg if n_neg > 0 else _nan()
    return {name: float(value) for name, value in out.items()}


def operating_points(probs: Tensor, target: Tensor, spec: ClinicalSpec,
                     sample_weight: Tensor | None = None) -> dict[str, tuple[float, float]]:
    """Positive-class operating points: name -> (value, threshold on p(positive class))."""
    if spec.positive_class is None:
        return {}
    index = spec.classes.index(spec.positive_class)
    scores, positive = probs[:, index], target == index
    points = {}
    for level in spec.at_specificity:
        value, threshold = sensitivity_at_specificity(scores, positive, level, sample_weight)
        points[spec.sens_at_spec_name(level)] = (float(value), float(threshold))
    for level in spec.at_sensitivity:
        value, threshold = specificity_at_sensitivity(scores, positive, level, sample_weight)
        points[spec.spec_at_sens_name(level)] = (float(value), float(threshold))
    return points


def _check_inputs(probs: Tensor, target: Tensor, num_classes: int) -> None:
    if probs.ndim != 2 or probs.shape[1] != num_classes:
        raise ValueError(f"probabilities must have shape (N, {num_classes}), got {tuple(probs.shape)}")
    if target.shape != probs.shape[:1]:
        raise ValueError(f"targets must have shape ({probs.shape[0]},), got {tuple(target.shape)}")
    if len(target) and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"targets must be class indices in [0, {num_classes})")


def _weight(reference: Tensor, sample_weight: Tensor | None) -> Tensor:
    if sample_weight is None:
        return torch.ones(reference.shape[0], dtype=torch.float64, device=reference.device)
    if sample_weight.shape != reference.shape[:1]:
        raise ValueError(f"sample_weight must have shape ({reference.shape[0]},), got {tuple(sample_weight.shape)}")
    return sample_weight.double()


def _nan() -> Tensor:
    return torch.tensor(math.nan, dtype=torch.float64)


# ----------------------------------------------------------------------------- torchmetrics Metric classes


class ConfusionMatrix(Metric):
    """Summed confusion matrix from probabilities (or logits); subclasses reduce it to one number."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        _check_inputs(probs, target, self.num_classes)
        self.confmat += confusion_matrix(probs.argmax(dim=1), target, self.num_classes).to(self.confmat)

    def compute(self) -> Tensor:
        return self.confmat


class Accuracy(ConfusionMatrix):
    higher_is_better = True

    def compute(self) -> Tensor:
        return accuracy_from_confmat(self.confmat)


class BalancedAccuracy(ConfusionMatrix):
    higher_is_better = True

    def compute(self) -> Tensor:
        return balanced_accuracy_from_confmat(self.confmat)


class Sensitivity(ConfusionMatrix):
    """Per-class sensitivity, shape (C,)."""

    def compute(self) -> Tensor:
        return sensitivity_from_confmat(self.confmat)


class Specificity(ConfusionMatrix):
    """Per-class specificity, shape (C,)."""

    def compute(self) -> Tensor:
        return specificity_from_confmat(self.confmat)


class _Scores(Metric):
    """Keeps every probability row and target (ROC metrics need them all); synced by concatenation."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, target: Tensor) -> None:
        _check_inputs(probs, target, self.num_classes)
        self.probs.append(probs.detach().double())
        self.target.append(target.detach().long())

    def _all(self) -> tuple[Tensor, Tensor]:
        return dim_zero_cat(self.probs), dim_zero_cat(self.target)


class AUROC(_Scores):
    """One-vs-rest AUROC: per class (C,) with `average=None`, or their mean with `average="macro"`."""

    higher_is_better = True

    def __init__(self, num_classes: int, average: str | None = "macro", **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        if average not in ("macro", None):
            raise ValueError(f"average must be 'macro' or None, got {average!r}")
        self.average = average

    def compute(self) -> Tensor:
        probs, target = self._all()
        per_class = torch.stack([auroc(probs[:, i], target == i) for i in range(self.num_classes)])
        return torch.nanmean(per_class) if self.average == "macro" else per_class


class SensitivityAtSpecificity(_Scores):
    """Sensitivity of one class (one-vs-rest on its probability) at specificity >= `min_specificity`."""

    higher_is_better = True

    def __init__(self, num_classes: int, class_index: int, min_specificity: float, **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        self.class_index, self.min_specificity = class_index, min_specificity

    def compute(self) -> Tensor:
        probs, target = self._all()
        return sensitivity_at_specificity(probs[:, self.class_index], target == self.class_index,
                                          self.min_specificity)[0]


class SpecificityAtSensitivity(_Scores):
    """Specificity of one class at sensitivity >= `min_sensitivity`."""

    higher_is_better = True

    def __init__(self, num_classes: int, class_index: int, min_sensitivity: float, **kwargs) -> None:
        super().__init__(num_classes, **kwargs)
        self.class_index, self.min_sensitivity = class_index, min_sensitivity

    def compute(self) -> Tensor:
        probs, target = self._all()
        return specificity_at_sensitivity(probs[:, self.class_index], target == self.class_index,
                                          self.min_sensitivity)[0]


class ClinicalMetrics(_Scores):
    """The whole panel of `clinical_metrics` as one Metric; `compute()` returns name -> float."""

    def __init__(self, spec: ClinicalSpec, **kwargs) -> None:
        super().__init__(len(spec.classes), **kwargs)
        self.spec = spec

    def compute(self) -> dict[str, float]:
        probs, target = self._all()
        return clinical_metrics(probs, target, self.spec)
