"""Synthetic image quality: one evaluation for the CLI, fine-tuning validation and the loop's report.

`evaluate_synthetic(real_manifest, synthetic_manifest, classifier_dir)` loads both image sets at one
resolution and `evaluate_images` measures, overall and per class:

* standard FID / KID in the FID Inception network's feature space (comparable with the literature only
  at the same image count, resolution and Inception weights, so all three are in the report);
* the same Fréchet / kernel distances in the penultimate feature space of a dermoscopy classifier
  trained by this project (the "domain" distance: ImageNet Inception features judge lesions poorly);
* in every feature space, FD∞: the Fréchet distance in the leading principal directions extrapolated to
  infinitely many images, which (unlike the plain FD at n ~ D) is near zero for two samples of the same
  data (`lesiongen.metrics.frechet_unbiased`);
* precision / recall / density / coverage (k-NN manifolds) on the domain features (Inception's when
  there is no classifier), so fidelity and diversity are reported apart;
* class fidelity: the share of synthetic images of class c that the classifier assigns to c, beside the
  same share on the real images as the reference;
* memorisation: the nearest real image of every synthetic one (perceptual hash + domain features).

For images held in memory (fine-tuning validation, the loop) build `ImageSet.from_tensor(...)` for the
generated images and call `evaluate_images(real, generated, spaces=feature_spaces(config, classifier))`.

Features of the real set are cached per manifest (content, chosen rows, resolution, extractor), so a
second evaluation against the same real data only runs the networks on the synthetic images.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from lesiongen.classifier.held_out import leakage_warnings
from lesiongen.data.manifest import Manifest
from lesiongen.errors import InputError
from lesiongen.metrics.fid import DEFAULT_KID_SUBSET_SIZE, DEFAULT_KID_SUBSETS, distribution_distances
from lesiongen.metrics.frechet_unbiased import DEFAULT_COMPONENTS
from lesiongen.metrics.manifold import DEFAULT_K, prdc
from lesiongen.metrics.memorization import DEFAULT_PHASH_THRESHOLD, MemorizationIndex, MemorizationResult
from lesiongen.utils.device import resolve_device
from lesiongen.utils.hashing import sha256_file

RESIZE_METHOD = "PIL bicubic (antialiased)"
REAL_SPLITS = ("train", "val", "test", "all")


@dataclass
class QualityConfig:
    """How to evaluate; every field has a CLI flag of the same name in `lesiongen evaluate-synthetic`."""

    real_split: str = "train"  # rows of the real manifest to compare with (the generator's training data)
    size: int | None = None  # common resolution; None: the real images' own
    inception_feature: int | None = 2048  # Inception layer for FID/KID (64/192/768/2048); None: skip
    kid_subsets: int = DEFAULT_KID_SUBSETS
    kid_subset_size: int = DEFAULT_KID_SUBSET_SIZE
    fd_inf_components: int = DEFAULT_COMPONENTS  # principal directions of FD∞; 0: skip it
    prdc_k: int = DEFAULT_K
    max_real: int | None = None  # random subsample (seeded) to bound the cost; None: all
    max_synthetic: int | None = None
    phash_threshold: int = DEFAULT_PHASH_THRESHOLD
    feature_threshold: float | str = "auto"
    gallery_pairs: int = 16
    batch_size: int = 64
    device: str = "cpu"
    seed: int = 0
    cache_dir: str | None = None  # None: $LESIONGEN_CACHE or ~/.cache/lesiongen

    def __post_init__(self) -> None:
        from lesiongen.utils.device import is_device_name

        if not is_device_name(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        if self.real_split not in REAL_SPLITS:
            raise ValueError(f"real_split must be one of {list(REAL_SPLITS)}, got '{self.real_split}'")
        if self.inception_feature not in (None, 64, 192, 768, 2048):
            raise ValueError(f"inception_feature must be 64, 192, 768, 2048 or None, got {self.inception_feature}")
        for name in ("size", "max_real", "max_synthetic"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"{name} must be >= 2, got {value}")
        for name in ("kid_subsets", "kid_subset_size", "prdc_k", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gallery_pairs < 0:
            raise ValueError(f"gallery_pairs must be >= 0, got {self.gallery_pairs}")
        if self.fd_inf_components < 0:
            raise ValueError(f"fd_inf_components must be >= 0 (0 skips FD∞), got {self.fd_inf_components}")
        if isinstance(self.feature_threshold, str) and self.feature_threshold != "auto":
            self.feature_threshold = float(self.feature_threshold)


@dataclass
class ImageSet:
    """Decoded images (uint8, one resolution) with labels, ids and what they came from."""

    images: Tensor
    labels: Tensor  # class index into `classes`
    classes: list[str]
    ids: list[str]
    groups: list[str]
    description: dict = field(default_factory=dict)  # source, counts, native resolutions
    cache_key: str | None = None  # set for sets whose features may be cached (real data)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels) or len(self.ids) != len(self.images):
            raise InputError(f"{len(self.images)} images, {len(self.labels)} labels, {len(self.ids)} ids")

    @classmethod
    def from_tensor(cls, images: Tensor, labels: Tensor, classes: list[str],
                    description: dict | None = None) -> ImageSet:
        """Images held in memory (e.g. fine-tuning validation samples): ids and groups are positions."""
        ids = [str(i) for i in range(len(images))]
        return cls(images, labels.to(torch.long), list(classes), ids, ids, description or {"n_images": len(images)})

    def __len__(self) -> int:
        return len(self.images)

    def indices_of(self, class_index: int) -> Tensor:
        return torch.nonzero(self.labels == class_index).flatten()

    @property
    def resolution(self) -> str:
        return f"{self.images.shape[-1]}x{self.images.shape[-2]}"


# ---------------------------------------------------------------------------------------------- loading


def native_resolutions(paths: list[Path]) -> Counter:
    """Counter of 'WxH' over the files (headers only)."""
    from PIL import Image, UnidentifiedImageError

    sizes: Counter = Counter()
    for path in paths:
        try:
            with Image.open(path) as img:
                sizes[f"{img.width}x{img.height}"] += 1
        except FileNotFoundError as err:
            raise InputError(f"{path}: image file not found") from err
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"{path}: unreadable image ({err})") from err
    return sizes


def select_rows(manifest: Manifest, *, synthetic: bool, split: str = "all", max_images: int | None = None,
                seed: int = 0) -> Manifest:
    """Real rows of a split, or the synthetic rows of a manifest (all rows if it has no `synthetic` column)."""
    if synthetic:
        chosen = manifest.subset(manifest.is_synthetic) if "synthetic" in manifest.df else manifest
        what = "synthetic rows"
    else:
        chosen = manifest.subset(~manifest.is_synthetic)
        if chosen.df.empty:
            raise InputError(f"{manifest.where}: no real rows (every row has synthetic=1); --real takes the "
                             "manifest of the real data set, e.g. the one `lesiongen data index` wrote")
        if split != "all":
            chosen = chosen.split(split)
        what = f"real rows in split '{split}'"
    if len(chosen) < 2:
        raise InputError(f"{manifest.where}: {len(chosen)} {what}; need at least 2 images to compare")
    if max_images is not None and len(chosen) > max_images:
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(chosen), generator=generator)[:max_images].sort().values
        mask = torch.zeros(len(chosen), dtype=torch.bool)
        mask[keep] = True
        chosen = chosen.subset(mask.numpy())
    return chosen


def common_size(real_sizes: Counter, requested: int | None) -> int:
    """The evaluation resolution: the requested one, else the shorter side of the commonest real size."""
    if requested is not None:
        return requested
    width, height = (int(v) for v in real_sizes.most_common(1)[0][0].split("x"))
    return min(width, height)


def _cache_key(manifest: Manifest, paths: list[Path], size: int) -> str:
    """Identifies decoded images: manifest content, chosen rows, each file's size and mtime, resolution."""
    digest = hashlib.sha256()
    if manifest.path is not None and Path(manifest.path).is_file():
        digest.update(sha256_file(manifest.path).encode())
    digest.update(f"{size}".encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_image_set(manifest: Manifest, size: int, *, classes: list[str], sizes: Counter, role: str,
                   split: str, cacheable: bool) -> ImageSet:
    """Decode `manifest`'s rows at `size` x `size` (PIL bicubic, antialiased) into an ImageSet."""
    from lesiongen.data.images import load_uint8

    unknown = sorted(set(manifest.df["label"]) - set(classes))
    if unknown:
        raise InputError(f"{manifest.where}: labels {unknown} are not classes of the real manifest {classes}")
    paths = manifest.image_paths()
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[label] for label in manifest.df["label"]], dtype=torch.long)
    groups = list(manifest.df["group_id"].astype(str))
    description = {
        "manifest": str(manifest.path) if manifest.path else None,
        "manifest_sha256": sha256_file(manifest.path) if manifest.path and Path(manifest.path).is_file() else None,
        "rows": split if role == "real" else "synthetic",
        "n_images": len(manifest),
        "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(classes)},
        "native_resolutions": dict(sizes.most_common()),
        "evaluated_at": f"{size}x{size}",
    }
    return ImageSet(load_uint8(paths, size), labels, list(classes), list(manifest.df["image"]), groups,
                    description, _cache_key(manifest, paths, size) if cacheable else None)


# ------------------------------------------------------------------------------------------ feature spaces


@dataclass
class FeatureSpace:
    """A named feature extractor: `extract(images)` gives {'features'} and, for classifiers (`classes` set),
    {'probs'} too, from one pass of the network."""

    name: str
    description: dict
    extract: object  # Callable[[Tensor], dict[str, Tensor]]
    classes: list[str] | None = None


def inception_space(feature: int, *, batch_size: int, device: str) -> FeatureSpace:
    from lesiongen.metrics.fid import extract_inception_features
    from lesiongen.metrics.inception import EXTRACTOR_NAME, weights_record

    record = weights_record()
    return FeatureSpace(
        name="inception",
        description={"name": EXTRACTOR_NAME, "layer": feature, "feature_dim": feature,
                     "weights_sha256": record["sha256"], "source": record["source"],
                     "input": "resized to 299x299 inside the network (bilinear, antialiased: torchmetrics' default)"},
        extract=lambda images: {"features": extract_inception_features(images, feature, batch_size=batch_size,
                                                                       device=device)},
    )


def classifier_space(classifier_dir: str | os.PathLike, *, batch_size: int, device: str) -> FeatureSpace:
    from lesiongen.classifier.models import MODEL_FILE, load_classifier

    model, info = load_classifier(classifier_dir, device=device)
    return FeatureSpace(
        name="domain",
        description={"name": f"classifier penultimate features ({info.arch})", "classifier": str(classifier_dir),
                     "arch": info.arch, "feature_dim": info.num_features or None, "img_size": info.img_size,
                     "tta_for_class_fidelity": info.tta,
                     "weights_sha256": sha256_file(Path(classifier_dir) / MODEL_FILE),
                     "input": f"resized to {info.img_size}x{info.img_size} by the classifier (bilinear, antialiased)"},
        extract=lambda images: _probs_and_features(model, info, images, batch_size),
        classes=list(info.classes),
    )


def _probs_and_features(model, info, images: Tensor, batch_size: int) -> dict[str, Tensor]:
    from lesiongen.classifier.predict import predict_proba_and_features

    probs, features = predict_proba_and_features(model, info, images, batch_size=batch_size)
    return {"features": features.to(torch.float64), "probs": probs}


def feature_spaces(config: QualityConfig, classifier_dir: str | os.PathLike | None = None) -> list[FeatureSpace]:
    """The configured Inception layer (unless None) and, given a classifier folder, its features."""
    spaces = []
    device = str(resolve_device(config.device))
    if config.inception_feature:
        spaces.append(inception_space(config.inception_feature, batch_size=config.batch_size, device=device))
    if classifier_dir is not None:
        spaces.append(classifier_space(classifier_dir, batch_size=config.batch_size, device=device))
    return spaces


def _feature_cache_file(cache_dir: Path, image_set: ImageSet, space: FeatureSpace) -> Path | None:
    if image_set.cache_key is None:
        return None
    extractor = "|".join(f"{k}={v}" for k, v in sorted(space.description.items()))
    key = hashlib.sha256(f"{image_set.cache_key}|{extractor}".encode()).hexdigest()[:32]
    return cache_dir / "quality-features" / f"{space.name}-{key}.safetensors"


def compute_features(image_set: ImageSet, space: FeatureSpace, cache_dir: Path) -> dict[str, Tensor]:
    """{'features': (N, D)[, 'probs': (N, C)]} of an image set, from the cache when it is there."""
    from safetensors.torch import load_file, save_file

    from lesiongen.utils.atomic import atomic_path

    cache_file = _feature_cache_file(cache_dir, image_set, space)
    if cache_file is not None and cache_file.is_file():
        cached = load_file(str(cache_file))
        if len(cached["features"]) == len(image_set):
            return cached
    result = {key: value.contiguous() for key, value in space.extract(image_set.images).items()}
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            save_file(result, str(tmp))
    return result


# -------------------------------------------------------------------------------------------- evaluation


@dataclass
class QualityResult:
    """The JSON-able report plus what the plots need."""

    report: dict
    real: ImageSet
    synthetic: ImageSet
    memorization: MemorizationResult


def class_fidelity(probs: Tensor, labels: Tensor, classes: list[str], model_classes: list[str]) -> dict:
    """Share of images whose predicted class is their label, overall and per class (by class name)."""
    missing = sorted(set(classes[i] for i in labels.unique().tolist()) - set(model_classes))
    if missing:
        raise InputError(f"the classifier knows classes {model_classes}; it cannot judge images of {missing}")
    target = torch.tensor([model_classes.index(classes[i]) for i in labels.tolist()], dtype=torch.long)
    correct = probs.argmax(dim=1) == target
    per_class = {}
    for i, name in enumerate(classes):
        mask = labels == i
        per_class[name] = float(correct[mask].double().mean()) if mask.any() else None
    return {"overall": float(correct.double().mean()), "per_class": per_class,
            "mean_probability_of_label": float(probs[torch.arange(len(target)), target].mean())}


def _distances_and_prdc(real: Tensor, fake: Tensor, config: QualityConfig, with_prdc: bool) -> dict:
    entry = distribution_distances(real, fake, kid_subsets=config.kid_subsets, kid_subset_size=config.kid_subset_size,
                                   fd_inf_components=config.fd_inf_components, seed=config.seed)
    if with_prdc:
        if min(len(real), len(fake)) > config.prdc_k:
            entry["prdc"] = prdc(real, fake, config.prdc_k)
        else:
            entry["prdc"] = None
            entry["prdc_note"] = (f"precision/recall/density/coverage need more than k={config.prdc_k} images "
                                  f"per set; got {len(real)} real and {len(fake)} synthetic")
    return entry


def evaluate_images(real: ImageSet, synthetic: ImageSet, *, spaces: list[FeatureSpace],
                    config: QualityConfig | None = None) -> QualityResult:
    """Every quality measure of `synthetic` against `real` (same classes, same resolution)."""
    from lesiongen.utils.cache import cache_root

    config = config or QualityConfig()
    if real.classes != synthetic.classes:
        raise InputError(f"real classes {real.classes} and synthetic classes {synthetic.classes} differ")
    if real.images.shape[-2:] != synthetic.images.shape[-2:]:
        raise InputError(f"real images are {real.resolution} but synthetic ones {synthetic.resolution}; "
                         "load both at one resolution (evaluate_synthetic resizes with PIL bicubic)")
    cache_dir = Path(config.cache_dir) if config.cache_dir else cache_root()
    warnings: list[str] = []
    features = {space.name: (compute_features(real, space, cache_dir), compute_features(synthetic, space, cache_dir))
                for space in spaces}
    prdc_space = "domain" if "domain" in features else ("inception" if "inception" in features else None)

    overall = {name: _distances_and_prdc(r["features"], s["features"], config, name == prdc_space)
               for name, (r, s) in features.items()}
    per_class: dict[str, dict] = {}
    for index, name in enumerate(real.classes):
        real_rows, synthetic_rows = real.indices_of(index), synthetic.indices_of(index)
        entry: dict = {"n_real": len(real_rows), "n_synthetic": len(synthetic_rows)}
        if len(synthetic_rows) == 0 or len(real_rows) == 0:
            missing = "synthetic" if len(synthetic_rows) == 0 else f"real ({real.description.get('rows')})"
            entry["note"] = f"no {missing} images of class '{name}': nothing to compare"
            if len(synthetic_rows) or len(real_rows):
                warnings.append(f"class '{name}': {entry['note']}")
            per_class[name] = entry
            continue
        for space_name, (r, s) in features.items():
            entry[space_name] = _distances_and_prdc(r["features"][real_rows], s["features"][synthetic_rows],
                                                    config, space_name == prdc_space)
        per_class[name] = entry

    for space_name in features:
        short = [c for c, e in per_class.items() if space_name in e and e[space_name]["fid"] is None]
        if overall[space_name]["fid"] is None:
            dim = overall[space_name]["feature_dim"]
            smaller = [str(d) for d in (64, 192, 768) if d < dim] if space_name == "inception" else []
            layer = f" (or --inception-feature {'/'.join(smaller)})" if smaller else ""
            warnings.append(f"{space_name}: {overall[space_name]['note']}{layer}")
        if short:
            warnings.append(f"{space_name}: FID not reported for classes {short} (fewer images than the "
                            f"{overall[space_name]['feature_dim']} feature dimensions); compare them by KID")

    fidelity = None
    classifier = next((space for space in spaces if space.classes is not None), None)
    if classifier is not None:
        real_probs, synthetic_probs = features[classifier.name][0]["probs"], features[classifier.name][1]["probs"]
        fidelity = {
            "synthetic": class_fidelity(synthetic_probs, synthetic.labels, synthetic.classes, classifier.classes),
            "real_reference": class_fidelity(real_probs, real.labels, real.classes, classifier.classes),
        }

    domain = features.get("domain")
    memorization_index = MemorizationIndex(real.images, real_features=domain[0]["features"] if domain else None,
                                           groups=real.groups, phash_threshold=config.phash_threshold,
                                           feature_threshold=config.feature_threshold)
    memorization = memorization_index.query(synthetic.images, features=domain[1]["features"] if domain else None)
    memorization_summary = memorization.summary()
    memorization_summary["against"] = f"{len(real)} real images ({real.description.get('rows')})"
    memorization_summary["feature_space"] = "domain" if domain else None
    if memorization_summary["n_flagged"]:
        warnings.append(f"memorisation: {memorization_summary['n_flagged']} of {len(synthetic)} synthetic images "
                        "are near-copies of real training images (see memorization.csv)")

    report = {
        "images": {"real": real.description, "synthetic": synthetic.description,
                   "resolution": real.resolution, "resize_method": RESIZE_METHOD},
        "feature_extractors": {space.name: space.description for space in spaces},
        "prdc_feature_space": prdc_space,
        "overall": overall,
        "class_fidelity": fidelity,
        "per_class": per_class,
        "memorization": memorization_summary,
        "config": asdict(config),
        "warnings": warnings,
    }
    return QualityResult(report, real, synthetic, memorization)


def _resolution_warning(real_sizes: Counter, synthetic_sizes: Counter, size: int) -> list[str]:
    notes = []
    target = f"{size}x{size}"
    for role, sizes in (("real", real_sizes), ("synthetic", synthetic_sizes)):
        others = {s: n for s, n in sizes.items() if s != target}
        if others:
            notes.append(f"{role} images {others} were resized to {target} with {RESIZE_METHOD}"
                         + ("; non-square images are squashed" if any(
                             s.split('x')[0] != s.split('x')[1] for s in others) else ""))
    return notes


def evaluate_synthetic(real: Manifest, synthetic: Manifest, classifier_dir: str | os.PathLike | None = None, *,
                       config: QualityConfig | None = None, out_dir: str | os.PathLike | None = None,
                       overwrite: bool = False) -> dict:
    """Quality of a synthetic manifest against a real one -> the report dict (also `out_dir/quality.json`).

    With `out_dir`, also writes memorization.csv and the plots (see `write_quality_outputs`).
    """
    from lesiongen.errors import OutputExistsError
    from lesiongen.utils.outdir import OutputFolder

    config = config or QualityConfig()
    config = replace(config, device=str(resolve_device(config.device)))  # fails before any work
    folder = OutputFolder(out_dir, "quality") if out_dir is not None else None
    if folder is not None and folder.existing and (folder.path / "quality.json").exists() and not overwrite:
        raise OutputExistsError(f"quality report {folder.path / 'quality.json'} already exists; pass --overwrite "
                                "to replace it")
    real_rows = select_rows(real, synthetic=False, split=config.real_split, max_images=config.max_real,
                            seed=config.seed)
    synthetic_rows = select_rows(synthetic, synthetic=True, max_images=config.max_synthetic, seed=config.seed)
    real_sizes = native_resolutions(real_rows.image_paths())
    synthetic_sizes = native_resolutions(synthetic_rows.image_paths())
    size = common_size(real_sizes, config.size)
    real_set = load_image_set(real_rows, size, classes=real.classes, sizes=real_sizes, role="real",
                              split=config.real_split, cacheable=True)
    synthetic_set = load_image_set(synthetic_rows, size, classes=real.classes, sizes=synthetic_sizes,
                                   role="synthetic", split="synthetic", cacheable=False)
    result = evaluate_images(real_set, synthetic_set, spaces=feature_spaces(config, classifier_dir), config=config)
    result.report["warnings"] = _resolution_warning(real_sizes, synthetic_sizes, size) + result.report["warnings"]
    leakage = leakage_warnings(synthetic_rows.df, "a classifier trained on them has no held-out test score, and "
                               f"the memorisation check compared them with the '{config.real_split}' images only")
    if leakage:
        result.report = {"leakage_warnings": leakage, **result.report}
    if folder is not None:
        from lesiongen.metrics.quality_plots import write_quality_outputs

        folder.start(replace=overwrite)
        with folder.removed_on_failure():
            write_quality_outputs(result, out_dir, gallery_pairs=config.gallery_pairs)
        folder.finish()
    return result.report
