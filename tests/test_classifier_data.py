"""Classifier data: device augmentation, colour constancy, sampling, class balance, synthetic mixing."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lesiongen.classifier.augment import DeviceAugment
from lesiongen.classifier.config import AugmentConfig, TrainConfig
from lesiongen.classifier.data import (
    EpochSampler,
    balance_weights,
    load_synthetic,
    real_split,
    training_sampler,
    training_table,
)
from lesiongen.classifier.preprocess import shades_of_gray, tta_views
from lesiongen.config import from_dict
from lesiongen.data.manifest import Manifest, load_manifest, write_manifest
from lesiongen.errors import InputError


def make_synthetic_manifest(real_path, out_dir, *, split: str, per_class: int, labels=None, lesions=None) -> str:
    """Copies of real images of `split` (of the `lesions` group ids, when given) under new names, as a synthetic
    manifest with provenance columns."""
    real = load_manifest(real_path)
    rows = real.df[real.df["split"] == split]
    if lesions is not None:
        rows = rows[rows["group_id"].astype(str).isin(lesions)]
    rows = rows.groupby("label").head(per_class).reset_index(drop=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for i, row in rows.iterrows():
        name = f"images/syn-{i:03d}.png"
        (out_dir / "images").mkdir(exist_ok=True)
        shutil.copy(real.root / row["image"], out_dir / name)
        images.append(name)
    df = pd.DataFrame({"image": images, "label": labels or rows["label"].tolist(), "split": rows["split"],
                       "group_id": rows["group_id"], "synthetic": 1, "source_image": rows["image"],
                       "method": "img2img", "strength": 0.5, "seed": range(len(rows)), "generator_hash": "abc"})
    path = out_dir / "synthetic.csv"
    write_manifest(Manifest(df, out_dir, sorted(set(df["label"]))), path)
    return str(path)


def test_geometric_augmentation_without_crop_is_an_exact_dihedral_transform():
    config = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_prob=0.0)
    images = torch.rand(16, 3, 24, 24)
    torch.manual_seed(0)
    out = DeviceAugment(config, 24)(images)
    seen = set()
    for image, result in zip(images, out):
        matches = [k for k, view in enumerate(tta_views(image[None], "dihedral"))
                   if torch.allclose(view[0], result, atol=1e-5)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 3  # the transforms really vary


def test_augmentation_crops_resizes_and_jitters_within_range():
    images = torch.rand(8, 3, 48, 48)
    out = DeviceAugment(AugmentConfig(jitter_prob=1.0), 32)(images)
    assert out.shape == (8, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    flat = torch.full((2, 3, 16, 16), 0.5)
    no_jitter = DeviceAugment(AugmentConfig(jitter_prob=0.0), 16)(flat)
    assert torch.allclose(no_jitter, flat, atol=1e-6)  # a flat grey image is a fixed point without jitter


def test_shades_of_gray_removes_a_colour_cast():
    torch.manual_seed(0)
    grey_lit = torch.rand(2, 1, 20, 20).repeat(1, 3, 1, 1) * 0.8
    assert torch.allclose(shades_of_gray(grey_lit.clone(), 6), grey_lit, atol=1e-5)
    cast = grey_lit * torch.tensor([1.0, 0.7, 0.5])[None, :, None, None]
    corrected = shades_of_gray(cast, 6)
    channel_means = corrected.pow(6).mean(dim=(2, 3)).pow(1 / 6)
    assert torch.allclose(channel_means[:, 0], channel_means[:, 1], rtol=1e-3)
    assert torch.allclose(channel_means[:, 0], channel_means[:, 2], rtol=1e-3)


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(50, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and list(sampler) == first
    sampler.set_epoch(3)
    assert list(sampler) != first
    other = EpochSampler(50, seed=3)
    other.set_epoch(2)
    assert list(other) == first


def test_epoch_sampler_longer_than_its_population_repeats_whole_permutations():
    sampler = EpochSampler(10, seed=1, num_samples=25)
    order = list(sampler)
    assert len(sampler) == len(order) == 25
    assert sorted(order[:10]) == sorted(order[10:20]) == list(range(10))  # each row once per pass
    assert len(set(order[20:])) == 5
    short = EpochSampler(10, seed=1, num_samples=4)
    assert len(list(short)) == 4 and len(set(short)) == 4


@pytest.mark.parametrize("sampler_balance", [0.0, 0.5])
def test_epoch_length_real_keeps_the_steps_of_the_real_only_classifier(toy_manifest, tmp_path, sampler_balance):
    real = load_manifest(toy_manifest)
    synthetic = make_synthetic_manifest(toy_manifest, tmp_path / "a", split="train", per_class=3)
    steps = {}
    for length in ("all", "real"):
        config = from_dict(TrainConfig, {"epoch_length": length, "sampler_balance": sampler_balance})
        table = training_table(real, load_synthetic([synthetic], real), config)
        sampler = training_sampler(table, config)
        assert all(0 <= i < len(table.rows) for i in sampler)  # synthetic rows can be drawn either way
        steps[length] = len(sampler)
    real_rows = int((real.df["split"] == "train").sum())
    assert steps == {"all": real_rows + 3 * len(real.classes), "real": real_rows}


def test_balance_weights_and_balanced_sampling():
    counts = np.array([100, 10, 0, 40])
    assert torch.equal(balance_weights(counts, 0.0), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    full = balance_weights(counts, 1.0)
    assert full[0] * 100 == pytest.approx(full[1] * 10) == pytest.approx(full[3] * 40)
    assert full[[0, 1, 3]].mean() == pytest.approx(1.0)
    labels = np.repeat([0, 1, 3], [100, 10, 40])
    table = type("T", (), {"class_counts": lambda self: counts, "rows": pd.DataFrame({"label_index": labels})})()
    sampler = training_sampler(table, TrainConfig(sampler_balance=1.0, loss_balance=0.0))
    drawn = np.bincount(labels[list(sampler)], minlength=4)
    assert drawn.sum() == 150 and drawn[2] == 0
    assert all(30 <= drawn[c] <= 70 for c in (0, 1, 3))  # ~50 each instead of 100 / 10 / 40


def test_real_split_errors_name_the_manifest_and_split(toy_manifest, tmp_path):
    manifest = load_manifest(toy_manifest)
    no_val = manifest.subset(manifest.df["split"] != "val")
    write_manifest(no_val, tmp_path / "no-val.csv")
    with pytest.raises(InputError, match=r"no-val.csv has no rows in split 'val'"):
        real_split(load_manifest(tmp_path / "no-val.csv"), "val")
    synthetic_test = manifest.df.assign(synthetic=(manifest.df["split"] == "test").astype(int))
    write_manifest(Manifest(synthetic_test, manifest.root, manifest.classes), tmp_path / "syn-test.csv")
    with pytest.raises(InputError, match=r"split 'test' has no real images"):
        real_split(load_manifest(tmp_path / "syn-test.csv"), "test")


def test_training_table_mixes_synthetic_rows_with_cap_splits_and_weight(toy_manifest, tmp_path):
    real = load_manifest(toy_manifest)
    from_val = make_synthetic_manifest(toy_manifest, tmp_path / "a", split="val", per_class=3)
    from_test = make_synthetic_manifest(toy_manifest, tmp_path / "b", split="test", per_class=1)
    config = from_dict(TrainConfig, {"max_synthetic_ratio": 0.1, "synthetic_weight": 0.25, "seed": 1})
    table = training_table(real, load_synthetic([from_val, from_test], real), config)
    real_counts = real.split("train").class_counts()
    rows = table.rows
    assert (~rows["synthetic"]).sum() == sum(real_counts.values())
    synthetic = rows[rows["synthetic"]]
    assert set(synthetic["split"]) == {"val"}  # test-split variants never train by default
    for label, count in synthetic["label"].value_counts().items():
        assert count <= int(0.1 * real_counts[label])
    assert (synthetic["weight"] == 0.25).all() and (rows.loc[~rows["synthetic"], "weight"] == 1.0).all()
    assert table.summary["synthetic_outside_splits"] == 7
    assert table.summary["synthetic_over_cap"] == len(load_manifest(from_val).df) - len(synthetic)
    assert rows["label_index"].tolist() == [real.classes.index(c) for c in rows["label"]]
    uncapped = training_table(real, load_synthetic([from_val], real),
                              from_dict(TrainConfig, {"max_synthetic_ratio": None}))
    assert uncapped.rows["synthetic"].sum() == len(load_manifest(from_val).df)


def test_synthetic_classes_must_exist_in_the_real_manifest(toy_manifest, tmp_path):
    real = load_manifest(toy_manifest)
    path = make_synthetic_manifest(toy_manifest, tmp_path / "c", split="train", per_class=1)
    df = load_manifest(path).df.copy()
    df.loc[0, "label"] = "scc"
    write_manifest(Manifest(df, tmp_path / "c", sorted(set(df["label"]))), path)
    with pytest.raises(InputError, match=r"synthetic classes \['scc'\] are not classes of the real manifest"):
        load_synthetic([path], real)


def test_config_validation_names_the_key():
    with pytest.raises(InputError, match="sampler_balance must be in"):
        from_dict(TrainConfig, {"sampler_balance": 2})
    with pytest.raises(InputError, match=r"augment.scale must satisfy"):
        from_dict(TrainConfig, {"augment": {"scale": [0.9, 0.2]}})
    with pytest.raises(InputError, match="unknown key"):
        from_dict(TrainConfig, {"learning_rate": 0.1})
    with pytest.raises(InputError, match=r"epoch_length must be one of \['all', 'real'\]"):
        from_dict(TrainConfig, {"epoch_length": "synthetic"})


def test_synthetic_manifest_without_synthetic_rows_is_an_error(toy_manifest):
    real = load_manifest(toy_manifest)
    expected = re.escape(f"{toy_manifest}: has no synthetic rows (column synthetic = 1)")
    with pytest.raises(InputError, match=expected):
        load_synthetic([str(toy_manifest)], real)


def test_variants_must_come_from_the_real_manifest_with_its_split_and_lesion(toy_manifest, tmp_path):
    real = load_manifest(toy_manifest)
    path = make_synthetic_manifest(toy_manifest, tmp_path / "d", split="val", per_class=1)
    source = load_manifest(path).df.loc[0, "source_image"]
    resplit = real.df.copy()  # the same data indexed again: the first variant's source is now a test image
    resplit.loc[resplit["image"] == source, "split"] = "test"
    resplit_path = tmp_path / "resplit.csv"
    write_manifest(Manifest(resplit, real.root, real.classes), resplit_path)
    with pytest.raises(InputError, match=rf"synthetic.csv row 2: its source {re.escape(source)} is split 'test'"):
        load_synthetic([path], load_manifest(resplit_path))
    df = load_manifest(path).df.copy()
    df.loc[1, "source_image"] = "images/elsewhere.png"
    write_manifest(Manifest(df, tmp_path / "d", sorted(set(df["label"]))), path)
    with pytest.raises(InputError, match=r"row 3: source_image 'images/elsewhere.png' is not an image of the real"):
        load_synthetic([path], real)


def test_variants_check_against_a_copied_manifest_while_the_original_still_exists(toy_manifest, tmp_path):
    """A run folder copied with its data keeps the original manifest's absolute path in the variants' meta;
    the copy, byte-identical, is the manifest they were made from, not 'another data set'."""
    original = load_manifest(toy_manifest)
    shutil.copytree(original.root, tmp_path / "copy" / "data")
    copy_path = tmp_path / "copy" / "manifest.csv"
    shutil.copy(toy_manifest, copy_path)
    write_manifest(Manifest(original.df, tmp_path / "copy" / "data", original.classes), copy_path)
    assert copy_path.read_bytes() == Path(toy_manifest).read_bytes()
    path = make_synthetic_manifest(copy_path, tmp_path / "copy" / "variants", split="train", per_class=1)
    synthetic = load_manifest(path)
    write_manifest(synthetic, path, source_manifest=str(Path(toy_manifest).resolve()))
    assert load_synthetic([path], load_manifest(copy_path))[0].meta["source_manifest"] == str(toy_manifest)

    other = tmp_path / "other.csv"  # a recorded manifest with other rows still decides the root
    resplit = original.df.copy()
    resplit["image"] = "elsewhere/" + resplit["image"]
    write_manifest(Manifest(resplit, original.root.parent, original.classes), other)
    write_manifest(load_manifest(path), path, source_manifest=str(other))
    with pytest.raises(InputError, match="is not an image of the real manifest"):
        load_synthetic([path], load_manifest(copy_path))
