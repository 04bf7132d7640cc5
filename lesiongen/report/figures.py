"""Figures of the report as PNG bytes (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def round_curves(series: dict[str, list[tuple[int, float, float, float]]], metric: str) -> bytes:
    """One line per arm: (round, mean, low, high) points; the band is the spread over seeds or a CI."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for arm, points in series.items():
        points = sorted(p for p in points if np.isfinite(p[1]))
        if not points:
            continue
        rounds, mean, low, high = (np.array(v, dtype=float) for v in zip(*points, strict=True))
        line, = ax.plot(rounds, mean, marker="o", label=arm)
        if np.all(np.isfinite(low)) and np.all(np.isfinite(high)):
            ax.fill_between(rounds, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    else:  # e.g. a metric that no round could compute: say so instead of drawing empty axes
        ax.text(0.5, 0.5, f"no finite {metric} values", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def confusion_matrices(matrices: dict[str, np.ndarray], classes: Sequence[str]) -> bytes:
    """Row-normalised confusion matrices side by side (rows: true class, columns: predicted)."""
    plt = _pyplot()
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n + 0.4, 3.4), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], matrices.items(), strict=True):
        matrix = np.asarray(matrix, dtype=float)
        rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        ax.imshow(rates, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.55 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=60, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
    axes[0][0].set_ylabel("true", fontsize=8)
    return _png(fig)


def image_grid(rows: list[list[np.ndarray | None]], row_labels: Sequence[str], col_labels: Sequence[str],
               cell_inches: float = 1.1) -> bytes:
    """A grid of uint8 HWC images with row and column labels; None leaves a cell blank."""
    plt = _pyplot()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell_inches * n_cols + 1.0, cell_inches * n_rows + 0.3),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            image = row[j] if j < len(row) else None
            if image is not None:
                ax.imshow(image)
            if i == 0 and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=7)
            if j == 0 and i < len(row_labels):
                ax.set_ylabel(row_labels[i], fontsize=7, rotation=0, ha="right", va="center")
    fig.subplots_adjust(wspace=0.05, hspace=0.12)
    return _png(fig)
