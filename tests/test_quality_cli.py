"""`lesiongen evaluate-synthetic` and `evaluate_synthetic` end to end on toy data (CPU, 64 px)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.data.manifest import Manifest, load_manifest, write_manifest

runner = CliRunner(env={"COLUMNS": "500"})  # rich would wrap long paths in error boxes


def write_synthetic_manifest(source_labels: Path, out: Path, *, drop_class: str | None = None,
                             plant: dict[str, Path] | None = None, size: int | None = None) -> Path:
    """A synthetic manifest (provenance columns, synthetic=1) over toy images; `plant` copies given real
    files in under new names (name -> file; a '.jpg' name is re-encoded at JPEG quality 75)."""
    table = pd.read_csv(source_labels)
    root = out.parent / f"{out.stem}-images"
    root.mkdir(parents=True)
    rows = []
    for image, label, group in zip(table["image"], table["label"], table["group_id"]):
        if label == drop_class:
            continue
        img = Image.open(source_labels.parent / image).convert("RGB")
        if size:
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        name = Path(image).name
        img.save(root / name)
        rows.append({"image": name, "label": label, "group_id": group})
    for name, (label, real_file) in (plant or {}).items():
        img = Image.open(real_file).convert("RGB")
        if name.endswith(".jpg"):
            buffer = io.BytesIO()
            img.save(buffer, "JPEG", quality=75)
            img = Image.open(buffer)
        img.save(root / name)
        rows.append({"image": name, "label": label, "group_id": f"copy-{name}"})
    df = pd.DataFrame(rows)
    df.insert(2, "split", "train")
    df["synthetic"], df["source_image"], df["method"] = 1, "", "txt2img"
    df["strength"], df["seed"], df["generator_hash"] = 1.0, range(len(df)), "0" * 16
    write_manifest(Manifest(df, root, ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]), out)
    return out


@pytest.fixture(scope="module")
def clean_toy(tmp_path_factory) -> Path:
    """New toy lesions (another seed): stand-ins for good generated images."""
    from lesiongen.data.toy import make_toy_dataset

    return make_toy_dataset(tmp_path_factory.mktemp("toy-seed1"), n_per_class=6, size=64, seed=1)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, toy_manifest) -> Path:
    """A real (tiny, untrained) timm classifier folder in the format `train-classifier` writes."""
    from lesiongen.classifier.models import ClassifierInfo, create_classifier, save_classifier

    model = create_classifier("test_efficientnet", 7)
    info = ClassifierInfo("test_efficientnet", load_manifest(toy_manifest).classes, 64, (0.5,) * 3, (0.5,) * 3,
                          num_features=model.num_features, tta="none")
    return save_classifier(model, info, tmp_path_factory.mktemp("classifier"))


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LESIONGEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _train_files(manifest_path: Path, n: int) -> list[tuple[str, Path]]:
    real = load_manifest(manifest_path).split("train")
    return [(label, real.root / image) for label, image in zip(real.df["label"][:n], real.df["image"][:n])]


def test_cli_end_to_end(toy_manifest, clean_toy, classifier_dir, cache, tmp_path):
    (label_a, copied), (label_b, reencoded) = _train_files(toy_manifest, 2)
    synthetic = write_synthetic_manifest(clean_toy, tmp_path / "synthetic.csv",
                                         plant={"copy.png": (label_a, copied), "reencoded.jpg": (label_b, reencoded)})
    out = tmp_path / "quality"
    args = ["evaluate-synthetic", "--real", str(toy_manifest), "--synthetic", str(synthetic), "--classifier",
            str(classifier_dir), "--out", str(out), "--inception-feature", "64", "--kid-subsets", "10",
            "--fd-inf-components", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "synthetic images at 64x64" in result.output and "memorisation: 2 of 44 flagged" in result.output

    report = json.loads((out / "quality.json").read_text())
    images = report["images"]
    assert images["synthetic"]["n_images"] == 44 and images["real"]["rows"] == "train"
    assert images["real"]["n_images"] == len(load_manifest(toy_manifest).split("train"))
    assert images["resolution"] == "64x64" and "bicubic" in images["resize_method"]
    extractors = report["feature_extractors"]
    assert extractors["inception"]["feature_dim"] == 64 and len(extractors["inception"]["weights_sha256"]) == 64
    assert extractors["domain"]["arch"] == "test_efficientnet"
    assert report["prdc_feature_space"] == "domain"
    assert set(report["overall"]["domain"]["prdc"]) >= {"precision", "recall", "density", "coverage"}
    assert report["overall"]["inception"]["kid_mean"] is not None
    # 44 synthetic images: too few for FD∞ even in 8 directions; the report says how many it needs
    assert report["overall"]["domain"]["fd_inf"] is None
    assert "FD∞ in 8 principal directions needs >= 80 images" in report["overall"]["domain"]["fd_inf_note"]
    assert report["config"]["fd_inf_components"] == 8
    assert set(report["per_class"]) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    assert report["per_class"]["df"]["n_synthetic"] == 6
    assert 0.0 <= report["class_fidelity"]["synthetic"]["overall"] <= 1.0
    assert report["memorization"]["n_flagged"] == 2

    pairs = pd.read_csv(out / "memorization.csv")
    assert set(pairs.loc[pairs["flagged"], "synthetic"]) == {"copy.png", "reencoded.jpg"}
    assert pairs.loc[pairs["synthetic"] == "copy.png", "nearest_real"].item() == \
        str(Path(copied).relative_to(load_manifest(toy_manifest).root))
    for name in report["files"].values():
        assert (out / name).is_file()
        if name.endswith(".png"):
            assert Image.open(out / name).size[0] > 200
    assert list((cache / "quality-features").glob("*.safetensors"))  # real features cached

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output and "--overwrite" in again.output


def test_resized_synthetic_images_and_an_empty_class(toy_manifest, clean_toy, cache, tmp_path):
    """96 px synthetic images are resized to the real 64 px (stated); a class without images is named."""
    from lesiongen.metrics.quality import QualityConfig, evaluate_synthetic

    synthetic = write_synthetic_manifest(clean_toy, tmp_path / "synthetic.csv", drop_class="df", size=96)
    report = evaluate_synthetic(load_manifest(toy_manifest), load_manifest(synthetic),
                                config=QualityConfig(inception_feature=None))
    assert report["images"]["synthetic"]["native_resolutions"] == {"96x96": 36}
    assert any("{'96x96': 36} were resized to 64x64 with PIL bicubic" in w for w in report["warnings"])
    assert report["per_class"]["df"]["note"] == "no synthetic images of class 'df': nothing to compare"
    assert any("class 'df'" in w for w in report["warnings"])
    assert report["memorization"]["n_flagged"] == 0 and report["class_fidelity"] is None


def test_real_features_come_from_the_cache(toy_manifest, clean_toy, classifier_dir, cache, tmp_path):
    from lesiongen.metrics.quality import QualityConfig, evaluate_synthetic

    synthetic = load_manifest(write_synthetic_manifest(clean_toy, tmp_path / "synthetic.csv"))
    config = QualityConfig(inception_feature=None, kid_subsets=5)
    first = evaluate_synthetic(load_manifest(toy_manifest), synthetic, classifier_dir, config=config)
    cached = list((cache / "quality-features").glob("domain-*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    second = evaluate_synthetic(load_manifest(toy_manifest), synthetic, classifier_dir, config=config)
    assert cached[0].stat().st_mtime_ns == stamp
    assert second["overall"] == first["overall"]


def test_bad_input_is_named(toy_manifest, clean_toy, tmp_path, cache):
    synthetic = write_synthetic_manifest(clean_toy, tmp_path / "synthetic.csv")
    base = ["evaluate-synthetic", "--real", str(toy_manifest), "--synthetic", str(synthetic),
            "--inception-feature", "none", "--out", str(tmp_path / "out")]

    result = runner.invoke(app, base + ["--feature-threshold", "close"])
    assert result.exit_code == 2 and "--feature-threshold" in result.output

    not_synthetic = pd.read_csv(synthetic).assign(synthetic=0)
    not_synthetic.to_csv(synthetic, index=False)
    result = runner.invoke(app, base)
    assert result.exit_code == 2 and "0 synthetic rows" in result.output and str(synthetic) in result.output

    foreign = pd.read_csv(synthetic).assign(synthetic=1)
    foreign.loc[0, "label"] = "scc"
    foreign.to_csv(synthetic, index=False)
    meta = json.loads(synthetic.with_name("synthetic.meta.json").read_text())
    meta["classes"].append("scc")
    synthetic.with_name("synthetic.meta.json").write_text(json.dumps(meta))
    result = runner.invoke(app, base)
    assert result.exit_code == 2 and "['scc'] are not classes of the real manifest" in result.output

    result = runner.invoke(app, base[:-2] + ["--classifier", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "--classifier" in result.output

    swapped = ["evaluate-synthetic", "--real", str(synthetic), "--synthetic", str(synthetic),
               "--inception-feature", "none", "--out", str(tmp_path / "out")]
    result = runner.invoke(app, swapped)  # the synthetic manifest given as the real one
    assert result.exit_code == 2 and "no real rows (every row has synthetic=1)" in result.output


def test_bad_device_is_named(toy_manifest, clean_toy, tmp_path, cache, monkeypatch):
    import torch

    from lesiongen.errors import InputError
    from lesiongen.utils.device import resolve_device

    synthetic = write_synthetic_manifest(clean_toy, tmp_path / "synthetic.csv")
    base = ["evaluate-synthetic", "--real", str(toy_manifest), "--synthetic", str(synthetic),
            "--inception-feature", "none", "--out", str(tmp_path / "out")]
    result = runner.invoke(app, base + ["--device", "tpu"])
    assert result.exit_code == 2, result.output
    assert "--device tpu: expected auto, cpu, cuda or cuda:N" in result.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, base + ["--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "--device cuda: no CUDA GPU is visible" in result.output
    assert not (tmp_path / "out").exists()
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InputError, match=r"--device cuda:2: only 2 CUDA GPU\(s\) are visible"):
        resolve_device("cuda:2")


def test_evaluate_images_refuses_mismatched_resolutions(toy_manifest):
    import torch

    from lesiongen.errors import InputError
    from lesiongen.metrics.quality import ImageSet, evaluate_images

    classes = load_manifest(toy_manifest).classes
    def image_set(size):
        return ImageSet(torch.zeros(4, 3, size, size, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                        classes, [f"{i}" for i in range(4)], [f"{i}" for i in range(4)])
    with pytest.raises(InputError, match="real images are 64x64 but synthetic ones 32x32"):
        evaluate_images(image_set(64), image_set(32), spaces=[])


def test_in_memory_images_as_finetune_validation_uses_them(toy_manifest):
    """Generated images held as tensors go through the same evaluation (here: copies are caught)."""
    from lesiongen.metrics.quality import (
        ImageSet,
        QualityConfig,
        evaluate_images,
        feature_spaces,
        load_image_set,
        native_resolutions,
    )

    rows = load_manifest(toy_manifest).split("train")
    real = load_image_set(rows, 64, classes=rows.classes, sizes=native_resolutions(rows.image_paths()),
                          role="real", split="train", cacheable=False)
    generated = ImageSet.from_tensor(real.images[:10].flip(-1), real.labels[:10], real.classes)
    result = evaluate_images(real, generated, spaces=feature_spaces(QualityConfig(inception_feature=None)))
    assert result.report["memorization"]["n_flagged"] == 10
    assert result.memorization.nearest_index.tolist() == list(range(10))


def test_synthetic_images_made_from_test_images_carry_a_leakage_warning(toy_manifest, clean_toy, cache, tmp_path):
    from lesiongen.metrics.quality import QualityConfig, evaluate_synthetic

    path = write_synthetic_manifest(clean_toy, tmp_path / "synthetic.csv")
    synthetic = load_manifest(path)
    assert "leakage_warnings" not in evaluate_synthetic(load_manifest(toy_manifest), synthetic,
                                                        config=QualityConfig(inception_feature=None))
    synthetic.df.loc[:4, "split"] = "test"  # their sources were test images (variants keep the split)
    report = evaluate_synthetic(load_manifest(toy_manifest), synthetic, config=QualityConfig(inception_feature=None))
    assert report["leakage_warnings"] == [
        "LEAKAGE: 5 synthetic images were made from TEST-split images; a classifier trained on them has no "
        "held-out test score, and the memorisation check compared them with the 'train' images only"]


def test_a_synthetic_manifest_of_an_unfinished_run_is_flagged(toy_manifest, clean_toy, cache, tmp_path):
    """`generate` rewrites its manifest after every batch: a killed run's manifest is valid but partial."""
    from lesiongen.utils.outdir import write_marker

    folder = tmp_path / "killed-generate"
    folder.mkdir()
    synthetic = write_synthetic_manifest(clean_toy, folder / "manifest.csv")
    write_marker(folder, "generation", complete=False)
    result = runner.invoke(app, ["evaluate-synthetic", "--real", str(toy_manifest), "--synthetic", str(synthetic),
                                 "--out", str(tmp_path / "quality"), "--inception-feature", "none"])
    assert result.exit_code == 0, result.output
    assert f"WARNING: {folder} is an unfinished run" in result.output
    assert "Finish it with: the same `lesiongen generate` command again" in result.output
