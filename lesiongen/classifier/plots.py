"""Evaluation figures: confusion matrix and one-vs-rest ROC curves (PNG, written atomically)."""

from __future__ import annotations

import os

import numpy as np
from torch import Tensor

from lesiongen.metrics.clinical import ClinicalSpec, roc_curve
from lesiongen.utils.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(confmat: np.ndarray, classes: list[str], path: str | os.PathLike, title: str = "") -> None:
    """Cells coloured by the share of the true class (row), labelled with count and share."""
    plt = _pyplot()
    confmat = np.asarray(confmat, dtype=np.float64)
    shares = confmat / np.maximum(confmat.sum(axis=1, keepdims=True), 1)
    size = 1.0 + 0.75 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(confmat[i, j])}\n{shares[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (share of the true class)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path)


def plot_roc(probs: Tensor, target: Tensor, spec: ClinicalSpec, path: str | os.PathLike,
             operating_points: dict[str, tuple[float, float]] | None = None, title: str = "") -> None:
    """One-vs-rest ROC per class (AUROC in the legend); the positive class drawn bold with its operating points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for i, name in enumerate(spec.classes):
        curve = roc_curve(probs[:, i], target == i)
        if not curve.defined:
            continue
        area = float(np.trapezoid(curve.tpr.numpy(), curve.fpr.numpy()))
        bold = name == spec.positive_class
        ax.plot(curve.fpr.numpy(), curve.tpr.numpy(), lw=2.5 if bold else 1.2, label=f"{name} (AUROC {area:.3f})")
    for name, (value, _threshold) in (operating_points or {}).items():
        if "_sensitivity@specificity=" in name:
            level = float(name.rsplit("=", 1)[1])
            ax.plot(1.0 - level, value, "o", color="black")
            ax.annotate(f"sens {value:.2f} @ spec {level:.2f}", (1.0 - level, value), textcoords="offset points",
                        xytext=(8, -12), fontsize=8)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title or "one-vs-rest ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str | os.PathLike) -> None:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
