"""Paired comparison of two classifiers on the same images: metric differences and McNemar's test.

Both models are scored on identical images, so the comparison is paired: every bootstrap resample
draws the same lesions for A and B and the interval is that of B - A. McNemar's test asks whether the
images only A gets right and those only B gets right are equally common (exact binomial form, valid
at any count); it treats images as independent, the bootstrap interval does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest
from torch import Tensor

from lesiongen.metrics.bootstrap import percentile_interval, resample_weights
from lesiongen.metrics.clinical import ClinicalSpec, clinical_metrics


@dataclass(frozen=True)
class McNemarResult:
    only_a_correct: int
    only_b_correct: int
    statistic: float  # chi-square with continuity correction, for reference
    p_value: float  # exact two-sided binomial p-value

    def to_dict(self) -> dict:
        return dict(self.__dict__, method="exact binomial (two-sided); statistic = (|b - c| - 1)^2 / (b + c)")


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> McNemarResult:
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs one outcome per image for both models, got {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    if discordant == 0:
        return McNemarResult(only_a, only_b, 0.0, 1.0)
    statistic = (abs(only_a - only_b) - 1) ** 2 / discordant
    p_value = binomtest(min(only_a, only_b), discordant, 0.5).pvalue
    return McNemarResult(only_a, only_b, float(statistic), float(min(1.0, p_value)))


def paired_comparison(probs_a: Tensor, probs_b: Tensor, target: Tensor, groups: Sequence, spec: ClinicalSpec,
                      n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Per metric: A, B, B - A and the lesion-level bootstrap interval of B - A; plus McNemar's test."""
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"both models must score the same images: {tuple(probs_a.shape)} vs {tuple(probs_b.shape)}")
    point_a = clinical_metrics(probs_a, target, spec)
    point_b = clinical_metrics(probs_b, target, spec)
    differences: dict[str, list[float]] = {name: [] for name in point_a}
    for weights in resample_weights(groups, n_resamples, seed):
        resample_a = clinical_metrics(probs_a, target, spec, weights)
        resample_b = clinical_metrics(probs_b, target, spec, weights)
        for name in differences:
            differences[name].append(resample_b[name] - resample_a[name])
    metrics = {}
    for name in point_a:
        samples = np.asarray(differences[name], dtype=np.float64)
        finite = samples[np.isfinite(samples)]
        metrics[name] = {
            "a": point_a[name],
            "b": point_b[name],
            "difference": point_b[name] - point_a[name],
            f"ci{round(confidence * 100)}": percentile_interval(samples, confidence),
            # Share of resamples in which B does not beat A: a one-sided bootstrap p-value for "B > A".
            "p_b_not_better": float((finite <= 0).mean()) if finite.size else None,
        }
    correct_a = (probs_a.argmax(1) == target).numpy()
    correct_b = (probs_b.argmax(1) == target).numpy()
    return {
        "n_images": int(len(target)),
        "n_lesions": int(len(set(map(str, groups)))),
        "metrics": metrics,
        "mcnemar": mcnemar(correct_a, correct_b).to_dict(),
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "unit": "group_id", "confidence": confidence},
    }
