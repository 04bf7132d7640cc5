"""Reference values of the synthetic-quality metrics: real vs real, and real vs the procedural toy set.

Two lesion-disjoint halves of derm-dev's val + test rows are the "real vs real" pair (what a perfect
generator would score), and the toy data set at the same resolution is the "real vs toy" pair (a
generator that learned nothing about dermoscopy). Both go through `evaluate_synthetic`, the function
behind `lesiongen evaluate-synthetic`, with a dermoscopy classifier trained by this project on the
train split (so neither half was seen in training), and print one table side by side. A third column,
"Gaussian twin", is what the domain metrics give for two samples of one Gaussian fitted to the first
half's features, at the same image count and dimension: the best any pair of sets can score at this
size, which tells finite-sample effects (k-NN precision / recall in high dimension, Fréchet bias) apart
from real differences.

    python bench/quality_reference.py                       # derm-dev, 1,500 images per set, CPU
    python bench/quality_reference.py --n 2100 --inception-feature 2048 --device cuda
    python bench/quality_reference.py --classifier checkpoints/classifier   # reuse a trained one
    python bench/quality_reference.py --smoke               # toy data only, a minute on CPU

The Fréchet distance is reported only when both sets have more images than feature dimensions
(1,280 for EfficientNet-Lite0, 2,048 for Inception), hence the default of 1,500 images per set. Even
then it keeps a finite-sample bias that grows with the dimension, so the real-vs-real value is a floor,
not zero. FD∞ (bias-corrected, in the 64 leading principal directions; lesiongen.metrics.frechet_unbiased)
and KID are the near-zero-for-equal-distributions measures.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DERM_DEV = ROOT.parent / "shared" / "data" / "derm-dev"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DERM_DEV, help="labels.csv folder (derm-dev)")
    parser.add_argument("--n", type=int, default=1500, help="images per compared set")
    parser.add_argument("--classifier", type=Path, default=None, help="trained classifier folder (else one is trained)")
    parser.add_argument("--train-images", type=int, default=3000, help="train rows for the quick classifier")
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--inception-feature", default="none", choices=["none", "64", "192", "768", "2048"],
                        help="standard FID/KID layer; 'none' (default) saves ~0.5 s per image on CPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "bench-quality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="toy data as the 'real' set, tiny sizes")
    return parser.parse_args(argv)


def index(labels_dir: Path, out: Path):
    from lesiongen.data.index import index_dataset
    from lesiongen.data.manifest import load_manifest

    return load_manifest(out) if out.is_file() else index_dataset(labels_dir, out, seed=0)


def lesion_halves(manifest, n: int, seed: int):
    """Two lesion-disjoint halves of the val + test rows (never seen by the classifier), n rows each."""
    import numpy as np

    held_out = manifest.subset(manifest.df["split"].isin(["val", "test"]))
    rng = np.random.default_rng(seed)
    groups = rng.permutation(np.asarray(held_out.df["group_id"].unique(), dtype=str))
    first = set(groups[: len(groups) // 2])
    in_first = held_out.df["group_id"].isin(first)
    halves = []
    for mask in (in_first, ~in_first):
        half = held_out.subset(mask)
        if len(half) < n:
            raise SystemExit(f"only {len(half)} held-out images in a half; lower --n (now {n})")
        keep = np.zeros(len(half), dtype=bool)
        keep[rng.choice(len(half), n, replace=False)] = True
        halves.append(half.subset(keep))
    return halves


def quick_classifier(manifest_path: Path, args: argparse.Namespace, out: Path, img_size: int) -> Path:
    """Train `--arch` (ImageNet init) briefly on a subsample of the train split; val selects the model."""
    import numpy as np

    from lesiongen.classifier.config import TrainConfig
    from lesiongen.classifier.train import train_classifier
    from lesiongen.data.manifest import load_manifest, write_manifest

    if (out / "classifier.json").is_file():
        return out
    manifest = load_manifest(manifest_path)
    rng = np.random.default_rng(args.seed)
    keep = np.zeros(len(manifest), dtype=bool)
    for split, n in (("train", args.train_images), ("val", max(args.train_images // 5, 50))):
        rows = np.flatnonzero(manifest.df["split"].to_numpy() == split)
        keep[rng.choice(rows, min(n, len(rows)), replace=False)] = True
    subset_path = write_manifest(manifest.subset(keep), out.parent / "classifier-train.csv")
    config = TrainConfig(manifest=str(subset_path), arch=args.arch,
                         pretrained="none" if args.smoke else "imagenet", img_size=img_size,
                         epochs=args.train_epochs, batch_size=32, tta="none", seed=args.seed)
    train_classifier(config, out, overwrite=True)
    return out


def evaluate(real, synthetic, classifier: Path, args: argparse.Namespace, out: Path) -> tuple[dict, float]:
    from lesiongen.metrics.quality import QualityConfig, evaluate_synthetic

    config = QualityConfig(real_split="all", inception_feature=None if args.inception_feature == "none"
                           else int(args.inception_feature), max_real=args.n, max_synthetic=args.n,
                           device=args.device, seed=args.seed, kid_subsets=100)
    start = time.perf_counter()
    report = evaluate_synthetic(real, synthetic, classifier, config=config, out_dir=out, overwrite=True)
    return report, time.perf_counter() - start


def rows_of(report: dict) -> dict[str, float | None]:
    domain = report["overall"]["domain"]
    rows = {
        "images (real / compared)":
            f"{report['images']['real']['n_images']} / {report['images']['synthetic']['n_images']}",
        "resolution": report["images"]["resolution"],
        "domain Fréchet distance": domain["fid"],
        "domain FD∞ (bias-corrected, 64 principal directions)": domain.get("fd_inf"),
        "domain FD in those directions, before extrapolation": domain.get("fd_k"),
        "domain KID (x1e3)": domain["kid_mean"] * 1e3,
        **{f"domain {k}": domain["prdc"][k] for k in ("precision", "recall", "density", "coverage")},
        "class fidelity (compared set)": report["class_fidelity"]["synthetic"]["overall"],
        "memorisation flags": report["memorization"]["n_flagged"],
        "nearest pHash distance (bits of 256)": report["memorization"]["phash_distance_min"],
    }
    if "inception" in report["overall"]:
        inception = report["overall"]["inception"]
        rows["Inception FID"] = inception["fid"]
        rows["Inception KID (x1e3)"] = inception["kid_mean"] * 1e3
    return rows


def real_features(real, classifier: Path, args: argparse.Namespace):
    """Domain features of the first half, as `evaluate` computed them (from its cache)."""
    from lesiongen.metrics.quality import (
        QualityConfig,
        classifier_space,
        common_size,
        compute_features,
        load_image_set,
        native_resolutions,
        select_rows,
    )
    from lesiongen.utils.cache import cache_root

    rows = select_rows(real, synthetic=False, split="all", max_images=args.n, seed=args.seed)
    sizes = native_resolutions(rows.image_paths())
    images = load_image_set(rows, common_size(sizes, None), classes=real.classes, sizes=sizes, role="real",
                            split="all", cacheable=True)
    space = classifier_space(classifier, batch_size=QualityConfig().batch_size, device=args.device)
    return compute_features(images, space, cache_root())["features"]


def gaussian_twin(features, args: argparse.Namespace) -> dict:
    """Domain metrics of two samples (n each) of the Gaussian with these features' mean and covariance."""
    import torch

    from lesiongen.metrics.fid import distribution_distances
    from lesiongen.metrics.manifold import prdc

    features = features.to(torch.float64)
    values, vectors = torch.linalg.eigh(torch.cov(features.T))
    factor = vectors * values.clamp_min(0).sqrt()  # cov = factor @ factor.T
    generator = torch.Generator().manual_seed(args.seed)
    first, second = (features.mean(0) + torch.randn(args.n, len(values), generator=generator,
                                                     dtype=torch.float64) @ factor.T for _ in range(2))
    distances = distribution_distances(first, second, seed=args.seed)
    manifold = prdc(first, second)
    return {
        "images (real / compared)": f"{args.n} / {args.n} (sampled)",
        "domain Fréchet distance": distances["fid"],
        "domain FD∞ (bias-corrected, 64 principal directions)": distances.get("fd_inf"),
        "domain FD in those directions, before extrapolation": distances.get("fd_k"),
        "domain KID (x1e3)": distances["kid_mean"] * 1e3,
        **{f"domain {k}": manifold[k] for k in ("precision", "recall", "density", "coverage")},
    }


def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lesiongen.data.manifest import load_manifest, write_manifest
    from lesiongen.data.toy import make_toy_dataset
    from lesiongen.utils.atomic import write_json

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    size = 64 if args.smoke else 128
    if args.smoke:
        args.n, args.train_images, args.train_epochs = min(args.n, 40), min(args.train_images, 120), 1
        args.arch = "test_efficientnet"
        data = out / "smoke-real"
        if not (data / "labels.csv").is_file():
            make_toy_dataset(data, n_per_class=60, size=size, seed=7)
    else:
        data = args.data
        if not (data / "labels.csv").is_file():
            raise SystemExit(f"{data}/labels.csv not found (derm-dev); pass --data or --smoke")
    manifest = index(data, out / "real.csv")
    half_a, half_b = lesion_halves(manifest, args.n, args.seed)
    half_a_path, half_b_path = write_manifest(half_a, out / "half-a.csv"), write_manifest(half_b, out / "half-b.csv")
    toy_dir = out / f"toy-{size}px"
    if not (toy_dir / "labels.csv").is_file():
        make_toy_dataset(toy_dir, n_per_class=math.ceil(args.n / 7), size=size, seed=args.seed)
    toy = index(toy_dir, out / "toy.csv")
    classifier = args.classifier or quick_classifier(out / "real.csv", args, out / "classifier", size)

    real = load_manifest(half_a_path)
    results = {}
    for name, compared in (("real vs real", load_manifest(half_b_path)), ("real vs toy", toy)):
        report, seconds = evaluate(real, compared, classifier, args, out / name.replace(" ", "-"))
        results[name] = {"rows": rows_of(report), "seconds": round(seconds, 1), "warnings": report["warnings"]}
    start = time.perf_counter()
    twin = gaussian_twin(real_features(real, classifier, args), args)
    results["Gaussian twin"] = {"rows": twin, "seconds": round(time.perf_counter() - start, 1), "warnings": []}
    extractor = report["feature_extractors"]["domain"]
    header = f"| metric | {' | '.join(results)} |"
    lines = [f"classifier: {extractor['name']} at {extractor['img_size']} px ({classifier}); "
             f"data: {data}; seed {args.seed}", "", header, "|" + " --- |" * (len(results) + 1)]
    for metric in results["real vs real"]["rows"]:
        lines.append(f"| {metric} | {' | '.join(fmt(r['rows'].get(metric)) for r in results.values())} |")
    lines.append(f"| evaluation time (s) | {' | '.join(str(r['seconds']) for r in results.values())} |")
    print("\n".join(lines))
    write_json(out / "results.json", {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
