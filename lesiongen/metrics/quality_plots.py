"""Files of a synthetic-quality evaluation: quality.json, memorization.csv and PNG figures.

Figures use matplotlib's object API (`Figure`, Agg canvas): no global pyplot state, no display. Every
file is written atomically; quality.json is written last, so its presence means the folder is complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lesiongen.utils.atomic import atomic_path, write_json

PLOTS = {
    "per_class": "per_class.png",
    "prdc": "prdc.png",
    "memorization_histogram": "memorization_hist.png",
    "memorization_gallery": "memorization_gallery.png",
    "samples": "samples.png",
}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def _hwc(image: Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def plot_per_class(report: dict, path: Path) -> None:
    """Per class: KID in each feature space (FID in the label when reported), and class fidelity."""
    classes = list(report["per_class"])
    spaces = list(report["feature_extractors"])
    panels = spaces + (["class_fidelity"] if report.get("class_fidelity") else [])
    fig = _figure(3.2 * max(len(panels), 1) + 0.5, 3.4)
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    x = np.arange(len(classes))
    for ax, panel in zip(axes, panels):
        if panel == "class_fidelity":
            fidelity = report["class_fidelity"]
            for offset, (key, label) in zip((-0.2, 0.2), (("synthetic", "synthetic"), ("real_reference", "real"))):
                values = [fidelity[key]["per_class"][c] for c in classes]
                ax.bar(x + offset, [np.nan if v is None else v for v in values], width=0.4, label=label)
            ax.set_ylim(0, 1)
            ax.set_title("class fidelity (assigned to own class)", fontsize=9)
            ax.legend(fontsize=7)
        else:
            entries = [report["per_class"][c].get(panel) or {} for c in classes]
            kid = [e.get("kid_mean") if e.get("kid_mean") is not None else np.nan for e in entries]
            err = [e.get("kid_std") if e.get("kid_std") is not None else 0 for e in entries]
            bars = ax.bar(x, kid, yerr=err, capsize=2, color="tab:orange" if panel == "domain" else "tab:blue")
            for bar, entry in zip(bars, entries):
                if entry.get("fid") is not None:
                    ax.annotate(f"FID {entry['fid']:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=6, rotation=90)
            overall = report["overall"][panel]
            ax.set_title(f"{panel} KID (overall {overall['kid_mean']:.3g})", fontsize=9)
        ax.set_xticks(x, classes, rotation=45, ha="right", fontsize=8)
    images = report["images"]
    fig.suptitle(f"{images['real']['n_images']} real vs {images['synthetic']['n_images']} synthetic images "
                 f"at {images['resolution']}", fontsize=9)
    _save(fig, path)


def plot_prdc(report: dict, path: Path) -> None:
    """Precision / recall / density / coverage overall and per class."""
    space = report["prdc_feature_space"]
    rows = {"overall": report["overall"][space].get("prdc")}
    rows.update({c: (e.get(space) or {}).get("prdc") for c, e in report["per_class"].items()})
    names = ["precision", "recall", "density", "coverage"]
    fig = _figure(6.5, 3.2)
    ax = fig.subplots()
    x = np.arange(len(rows))
    for i, name in enumerate(names):
        values = [r[name] if r else np.nan for r in rows.values()]
        ax.bar(x + (i - 1.5) * 0.2, values, width=0.2, label=name)
    ax.axhline(1.0, color="grey", lw=0.6, ls="--")
    ax.set_xticks(x, list(rows), rotation=45, ha="right", fontsize=8)
    ax.set_title(f"k-NN manifold metrics in the {space} feature space (k={report['config']['prdc_k']})", fontsize=9)
    ax.legend(fontsize=7, ncols=4)
    _save(fig, path)


def plot_memorization_histogram(memorization, path: Path) -> None:
    """Distances of each synthetic image to its nearest real image, with the flag thresholds."""
    panels = [("pHash Hamming distance (bits)", memorization.phash_distance.numpy(), memorization.phash_threshold)]
    if memorization.feature_distance is not None:
        panels.append(("feature cosine distance", memorization.feature_distance.numpy(),
                       memorization.feature_threshold))
    fig = _figure(3.4 * len(panels), 2.8)
    for ax, (title, values, threshold) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.hist(values, bins=40, color="tab:gray")
        ax.axvline(threshold, color="tab:red", ls="--", label=f"flag <= {threshold:.3g}")
        ax.set_title(f"nearest real image: {title}", fontsize=8)
        ax.legend(fontsize=7)
    _save(fig, path)


def save_memorization_gallery(result, path: Path, n_pairs: int) -> None:
    """The closest synthetic/real pairs side by side, closest first, with distances and the flag."""
    memorization = result.memorization
    order = torch.argsort(memorization.score)[:n_pairs].tolist()
    nearest = memorization.nearest_index
    columns = 4
    rows = max(1, -(-len(order) // columns))
    fig = _figure(2.6 * columns, 1.55 * rows + 0.3)
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, order):
        j = int(nearest[i])
        pair = torch.cat([result.synthetic.images[i], result.real.images[j]], dim=2)
        ax.imshow(_hwc(pair))
        text = f"pHash {int(memorization.phash_distance[i])}"
        if memorization.feature_distance is not None:
            text += f", cos {float(memorization.feature_distance[i]):.3f}"
        flag = " FLAGGED" if bool(memorization.flagged[i]) else ""
        ax.set_title(f"{text}{flag}\n{Path(result.synthetic.ids[i]).name} | {Path(result.real.ids[j]).name}",
                     fontsize=6, color="tab:red" if flag else "black")
    fig.suptitle("closest pairs: synthetic (left) | nearest real training image (right)", fontsize=9)
    _save(fig, path)


def save_samples(result, path: Path, per_class: int = 6, seed: int = 0) -> None:
    """One row per class: random real images, then random synthetic ones."""
    classes = result.real.classes
    generator = torch.Generator().manual_seed(seed)
    side = result.real.images.shape[-1]
    blank = torch.full((3, side, side), 255, dtype=torch.uint8)
    rows = []
    for index in range(len(classes)):
        cells = []
        for image_set in (result.real, result.synthetic):
            rows_of_class = image_set.indices_of(index)
            pick = rows_of_class[torch.randperm(len(rows_of_class), generator=generator)[:per_class]]
            cells += [image_set.images[i] for i in pick.tolist()] + [blank] * (per_class - len(pick))
        rows.append(torch.cat(cells, dim=2))
    fig = _figure(1.0 * 2 * per_class + 0.8, 1.0 * len(classes) + 0.4)
    ax = fig.subplots()
    ax.imshow(_hwc(torch.cat(rows, dim=1)))
    ax.set_yticks([side * (i + 0.5) for i in range(len(classes))], classes, fontsize=8)
    ax.set_xticks([side * per_class * 0.5, side * per_class * 1.5], ["real", "synthetic"], fontsize=8)
    ax.axvline(side * per_class - 0.5, color="white", lw=2)
    _save(fig, path)


def write_quality_outputs(result, out_dir: str | os.PathLike, *, gallery_pairs: int = 16) -> Path:
    """quality.json, memorization.csv and the figures in `out_dir`; returns the quality.json path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = result.report
    frame = result.memorization.to_frame(result.real.ids, result.synthetic.ids)
    frame.insert(1, "label", [result.synthetic.classes[i] for i in result.synthetic.labels.tolist()])
    with atomic_path(out_dir / "memorization.csv") as tmp:
        frame.sort_values("score").to_csv(tmp, index=False)
    written = {"memorization_csv": "memorization.csv"}
    if report["feature_extractors"]:
        plot_per_class(report, out_dir / PLOTS["per_class"])
        plot_prdc(report, out_dir / PLOTS["prdc"])
        written.update(per_class=PLOTS["per_class"], prdc=PLOTS["prdc"])
    plot_memorization_histogram(result.memorization, out_dir / PLOTS["memorization_histogram"])
    written["memorization_histogram"] = PLOTS["memorization_histogram"]
    if gallery_pairs:
        save_memorization_gallery(result, out_dir / PLOTS["memorization_gallery"], gallery_pairs)
        written["memorization_gallery"] = PLOTS["memorization_gallery"]
    save_samples(result, out_dir / PLOTS["samples"])
    written["samples"] = PLOTS["samples"]
    report["files"] = written
    return write_json(out_dir / "quality.json", report)
