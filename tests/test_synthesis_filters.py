"""Variant filters: off-class by a classifier, near-copies of training images, failed reconstructions."""

from __future__ import annotations

import pytest
import torch

from lesiongen.data.images import load_uint8
from lesiongen.data.manifest import load_manifest
from lesiongen.synthesis.filters import (
    FilterConfig,
    VariantFilter,
    build_memorization_index,
    reconstruction_verdicts,
    resize_uint8,
)

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@pytest.fixture(scope="module")
def train(toy_manifest):
    manifest = load_manifest(toy_manifest)
    train = manifest.split("train")
    return train, load_uint8(train.image_paths(), 64)


@pytest.fixture(scope="module")
def melanoma_classifier(tmp_path_factory):
    """A real saved classifier that calls everything melanoma (its head's bias says so)."""
    from lesiongen.classifier.models import ClassifierInfo, create_classifier, load_classifier, save_classifier

    model = create_classifier("test_efficientnet", len(CLASSES), "none")
    with torch.no_grad():
        model.get_classifier().bias[CLASSES.index("mel")] = 50.0
    folder = tmp_path_factory.mktemp("classifier")
    save_classifier(model, ClassifierInfo("test_efficientnet", CLASSES, 32, (0.5,) * 3, (0.5,) * 3, load_size=48),
                    folder)
    return load_classifier(folder)


def test_failed_reconstructions():
    scores = [{"inversion_psnr": 35.0, "recon_psnr": 24.0}, {"inversion_psnr": 12.0, "recon_psnr": 24.0},
              {"inversion_psnr": 35.0, "recon_psnr": 9.0}]
    verdicts = reconstruction_verdicts(scores, FilterConfig(min_inversion_psnr=20.0, min_recon_psnr=10.0))
    assert verdicts[0] == ""
    assert verdicts[1].startswith("failed-reconstruction: 12.0 dB against the VAE")
    assert verdicts[2].startswith("failed-reconstruction: 9.0 dB against the input")
    assert reconstruction_verdicts(scores, FilterConfig(min_inversion_psnr=None)) == ["", "", ""]


def test_off_class_and_near_copies(train, melanoma_classifier, toy_manifest):
    train_split, train_images = train
    config = FilterConfig(min_label_prob=0.5)
    val = load_manifest(toy_manifest).split("val")
    fresh = load_uint8(val.image_paths()[:2], 64)  # images the index has never seen
    images = torch.cat([train_images[:1], fresh])
    labels = ["mel", "mel", "nv"]
    variant_filter = VariantFilter(config, CLASSES, classifier=melanoma_classifier)
    assert variant_filter.size == 48  # compared at the size the classifier decodes its data at
    reference = load_uint8(train_split.image_paths(), variant_filter.size)
    variant_filter.memorization = build_memorization_index(reference, list(train_split.df["group_id"]), config,
                                                           classifier=melanoma_classifier)
    variant_filter.reference_ids = list(train_split.df["image"])
    scores = variant_filter.score(images, labels)

    assert list(scores["near_copy"]) == [1, 0, 0]
    assert scores.at[0, "nearest_train"] == train_split.df["image"].iloc[0]
    assert list(scores["off_class"]) == [0, 0, 1] and scores.at[2, "p_label"] < 0.01
    assert list(scores["keep"]) == [0, 1, 0]
    assert scores.at[0, "reject_reason"].startswith("near-copy of training image")
    assert scores.at[2, "reject_reason"].startswith("off-class: p(nv) = 0.00")
    assert {"phash_distance", "feature_distance", "memorization_score", "pred"} <= set(scores.columns)


def test_without_classifier_only_the_hash_check_runs(train):
    train_split, train_images = train
    config = FilterConfig()
    index = build_memorization_index(train_images, list(train_split.df["group_id"]), config)
    flipped = train_images[3:4].flip(-1)  # a mirrored copy is still a copy
    variant_filter = VariantFilter(config, CLASSES, memorization=index, reference_ids=list(train_split.df["image"]))
    scores = variant_filter.score(resize_uint8(flipped, 96), ["mel"])
    assert scores.at[0, "near_copy"] == 1 and "p_label" not in scores and "feature_distance" not in scores


def test_a_copy_of_a_val_or_test_image_is_dropped_by_hash(toy_manifest, train):
    from lesiongen.metrics.memorization import MemorizationIndex
    from lesiongen.synthesis.pipeline import SynthesisConfig, load_filter

    manifest = load_manifest(toy_manifest)
    config = SynthesisConfig(predictions="p.csv", manifest=str(toy_manifest), base="b", out="o",
                             filters=FilterConfig(reference_size=64))
    variant_filter = load_filter(config, manifest, torch.device("cpu"), judge=None)
    held_out = manifest.subset(manifest.df["split"] != "train")
    assert isinstance(variant_filter.held_out, MemorizationIndex)
    assert variant_filter.held_out_ids == list(held_out.df["image"])
    source = load_uint8(held_out.image_paths()[:1], 64)  # a variant that came back as its val source
    _, train_images = train
    scores = variant_filter.score(torch.cat([source.flip(-2), train_images[:1]]), ["mel", "mel"])
    assert scores["near_copy"].tolist() == [1, 1]
    assert scores.at[0, "nearest_held_out"] == held_out.df["image"].iloc[0]
    assert f"near-copy of held-out image {held_out.df['image'].iloc[0]}" in scores.at[0, "reject_reason"]
    assert "near-copy of training image" in scores.at[1, "reject_reason"]
    assert "held-out" not in scores.at[1, "reject_reason"]
