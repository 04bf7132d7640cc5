"""Lesion-aware, class-stratified splitting (lesiongen.data.split)."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest

from lesiongen.data.split import SplitConfig, assign_splits, group_labels

CLASSES = ["a", "b", "c"]


def synthetic_rows(seed: int = 0) -> tuple[list[str], list[str]]:
    """Class a: 200 lesions of 1-4 images; b: 12 lesions; c: 3 lesions; plus 30 images without a lesion id."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for label, n_groups in (("a", 200), ("b", 12), ("c", 3)):
        for g in range(n_groups):
            for _ in range(int(rng.integers(1, 5))):
                labels.append(label)
                groups.append(f"{label}-lesion-{g}")
    for i in range(30):
        labels.append("a")
        groups.append(f"image-{i}")  # an image without a lesion id is its own group
    return labels, groups


def splits_per_group(groups, splits) -> dict[str, set]:
    out = defaultdict(set)
    for g, s in zip(groups, splits):
        out[g].add(s)
    return out


def test_no_lesion_straddles_splits_and_every_class_is_in_every_split():
    labels, groups = synthetic_rows()
    splits = assign_splits(labels, groups, CLASSES, SplitConfig((0.7, 0.15, 0.15), seed=0))
    assert all(len(s) == 1 for s in splits_per_group(groups, splits).values())
    present = Counter(zip(labels, splits))
    for label in CLASSES:  # c has exactly 3 lesions: one per split
        for split in ("train", "val", "test"):
            assert present[(label, split)] > 0, (label, split)


def test_fractions_are_met_for_a_large_class():
    labels, groups = synthetic_rows()
    splits = assign_splits(labels, groups, CLASSES, SplitConfig((0.6, 0.1, 0.3), seed=3))
    a = Counter(s for label, s in zip(labels, splits) if label == "a")
    total = sum(a.values())
    assert abs(a["train"] / total - 0.6) < 0.02
    assert abs(a["val"] / total - 0.1) < 0.02
    assert abs(a["test"] / total - 0.3) < 0.02


def test_deterministic_independent_of_row_order_and_seed_dependent():
    labels, groups = synthetic_rows()
    config = SplitConfig(seed=7)
    first = assign_splits(labels, groups, CLASSES, config)
    assert first == assign_splits(labels, groups, CLASSES, config)
    order = np.random.default_rng(1).permutation(len(labels))
    shuffled = assign_splits([labels[i] for i in order], [groups[i] for i in order], CLASSES, config)
    assert [shuffled[list(order).index(i)] for i in range(len(labels))] == first
    assert assign_splits(labels, groups, CLASSES, SplitConfig(seed=8)) != first


def test_small_classes_fill_train_first_and_zero_fraction_split_stays_empty():
    labels = ["a"] * 10 + ["b", "c", "c"]
    groups = [f"a{i}" for i in range(10)] + ["b0", "c0", "c1"]
    splits = assign_splits(labels, groups, CLASSES, SplitConfig((0.8, 0.2, 0.0)))
    assert "test" not in splits
    assert splits[10] == "train"  # a class with one lesion trains
    assert sorted(splits[11:]) == ["train", "val"]


def test_mixed_label_group_follows_its_majority_label():
    labels = ["a", "a", "b"]
    groups = ["g", "g", "g"]
    assert group_labels(labels, groups, CLASSES) == {"g": "a"}
    assert len(set(assign_splits(labels, groups, CLASSES))) == 1


@pytest.mark.parametrize("fractions, message", [
    ((0.5, 0.2, 0.2), "sum to 1"),
    ((0.0, 0.5, 0.5), "train fraction"),
    ((1.2, -0.1, -0.1), ">= 0"),
    ((0.7, 0.3), "3 values"),
])
def test_split_config_rejects_bad_fractions(fractions, message):
    with pytest.raises(ValueError, match=message):
        SplitConfig(fractions)


def test_split_config_rejects_negative_seed():
    with pytest.raises(ValueError, match="seed"):
        SplitConfig(seed=-1)
