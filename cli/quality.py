"""Commands of the 'quality' group: `evaluate-synthetic`.

Only typer and the standard library are imported here; torch, torchmetrics and the metrics load inside
the command so `lesiongen --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

DEFAULT_OUT_ROOT = Path("checkpoints/quality")
RealSplit = Literal["train", "val", "test", "all"]
InceptionFeature = Literal["64", "192", "768", "2048", "none"]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("evaluate-synthetic")(evaluate_synthetic)


def _feature_threshold(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        threshold = float(value)
    except ValueError:
        threshold = -1.0
    if not 0 < threshold < float("inf"):  # NaN fails this too
        raise typer.BadParameter(f"'{value}' is neither 'auto' nor a positive cosine distance",
                                 param_hint="--feature-threshold")
    return threshold


def evaluate_synthetic(
    real: Annotated[Path, typer.Option(help="Real manifest (its --real-split rows are the reference).")],
    synthetic: Annotated[Path, typer.Option(
        help="Synthetic manifest (its synthetic=1 rows; all rows if it has no such column).")],
    classifier: Annotated[Optional[Path], typer.Option(
        help="Trained classifier folder: domain distance, PRDC, class fidelity, feature memorisation check.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Output folder (default: checkpoints/quality/<synthetic manifest name>).")] = None,
    real_split: Annotated[RealSplit, typer.Option(
        help="Real rows to compare with (the generator's training data by default).")] = "train",
    size: Annotated[Optional[int], typer.Option(
        min=2, help="Evaluate at SIZE x SIZE px (default: the real images' size); "
                    "others are resized (PIL bicubic).")] = None,
    inception_feature: Annotated[InceptionFeature, typer.Option(
        help="Inception layer for standard FID/KID; 'none' skips it.")] = "2048",
    max_real: Annotated[Optional[int], typer.Option(min=2, help="Seeded random subsample of the real rows.")] = None,
    max_synthetic: Annotated[Optional[int], typer.Option(
        min=2, help="Seeded random subsample of the synthetic rows.")] = None,
    kid_subsets: Annotated[int, typer.Option(min=1)] = 100,
    kid_subset_size: Annotated[int, typer.Option(min=2, help="Shrunk to the smaller set when larger.")] = 1000,
    fd_inf_components: Annotated[int, typer.Option(
        min=0, help="Principal directions of FD∞, the bias-corrected Fréchet distance; 0 skips it.")] = 64,
    prdc_k: Annotated[int, typer.Option(min=1, help="k of the k-NN precision / recall / density / coverage.")] = 5,
    phash_threshold: Annotated[int, typer.Option(
        min=1, help="Flag a synthetic image within this many of 256 pHash bits of a real one.")] = 24,
    feature_threshold: Annotated[str, typer.Option(
        help="Flag within this cosine distance in classifier features; "
             "'auto' calibrates it on the real set.")] = "auto",
    gallery_pairs: Annotated[int, typer.Option(
        min=0, help="Closest synthetic/real pairs shown in memorization_gallery.png.")] = 16,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of subsampling and KID subsets.")] = 0,
    cache_dir: Annotated[Optional[Path], typer.Option(
        help="Cache of real-image features (default: $LESIONGEN_CACHE or ~/.cache/lesiongen).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing quality.json in --out.")] = False,
) -> None:
    """Judge synthetic images against real ones: FID/KID, domain distance, PRDC, class fidelity, memorisation."""
    from lesiongen.data.manifest import load_manifest
    from lesiongen.metrics.quality import QualityConfig
    from lesiongen.metrics.quality import evaluate_synthetic as run_evaluation
    from lesiongen.utils.device import resolve_device
    from lesiongen.utils.outdir import warn_if_unfinished_manifest

    threshold = _feature_threshold(feature_threshold)
    resolve_device(device)  # the flag's own message (the config's would not name --device)
    config = QualityConfig(
        real_split=real_split, size=size,
        inception_feature=None if inception_feature == "none" else int(inception_feature),
        kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, fd_inf_components=fd_inf_components,
        prdc_k=prdc_k, max_real=max_real, max_synthetic=max_synthetic, phash_threshold=phash_threshold,
        feature_threshold=threshold, gallery_pairs=gallery_pairs, batch_size=batch_size, device=device, seed=seed,
        cache_dir=str(cache_dir) if cache_dir else None,
    )
    if classifier is not None and not classifier.is_dir():
        raise typer.BadParameter(f"'{classifier}' is not a folder", param_hint="--classifier")
    out = out or DEFAULT_OUT_ROOT / synthetic.stem
    real_manifest, synthetic_manifest = load_manifest(real), load_manifest(synthetic)
    warn_if_unfinished_manifest(synthetic)
    report = run_evaluation(real_manifest, synthetic_manifest, classifier, config=config,
                            out_dir=out, overwrite=overwrite)
    for line in summary_lines(report):
        typer.echo(line)
    typer.echo(f"-> {out / 'quality.json'}")


def summary_lines(report: dict) -> list[str]:
    """A few lines for the terminal; quality.json has everything."""
    images = report["images"]
    lines = [f"{images['real']['n_images']} real ({images['real']['rows']}) vs {images['synthetic']['n_images']} "
             f"synthetic images at {images['resolution']}"]
    for space, entry in report["overall"].items():
        fid = f"FID {entry['fid']:.3f}" if entry["fid"] is not None else "FID n/a"
        kid = f"KID {entry['kid_mean']:.5f} ± {entry['kid_std']:.5f}" if entry["kid_mean"] is not None else "KID n/a"
        lines.append(f"{space} ({report['feature_extractors'][space]['name']}, {entry['feature_dim']}-d): {fid}, {kid}")
        if entry.get("fd_inf") is not None:
            lines.append(f"  FD∞ {entry['fd_inf']:.3f} in {entry['fd_inf_components']} principal directions "
                         f"(FD there before extrapolation {entry['fd_k']:.3f})")
        if entry.get("prdc"):
            p = entry["prdc"]
            lines.append(f"  precision {p['precision']:.3f}  recall {p['recall']:.3f}  density {p['density']:.3f}  "
                         f"coverage {p['coverage']:.3f} (k={p['k']})")
    if report.get("class_fidelity"):
        fidelity = report["class_fidelity"]
        lines.append(f"class fidelity {fidelity['synthetic']['overall']:.3f} "
                     f"(real images: {fidelity['real_reference']['overall']:.3f})")
    memo = report["memorization"]
    lines.append(f"memorisation: {memo['n_flagged']} of {memo['n_synthetic']} flagged "
                 f"(nearest pHash distance {memo['phash_distance_min']} bits; threshold {memo['phash_threshold']})")
    lines += [f"warning: {w}" for w in report["warnings"]]
    lines += [f"WARNING: {w}" for w in report.get("leakage_warnings", [])]
    return lines
