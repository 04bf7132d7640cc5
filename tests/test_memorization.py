"""Memorisation check: planted copies of training images are flagged, new images are not."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lesiongen.data.images import load_uint8
from lesiongen.errors import InputError
from lesiongen.metrics.memorization import (
    DEFAULT_PHASH_THRESHOLD,
    MemorizationIndex,
    dihedral_views,
    hamming_distances,
    phash_bits,
    phash_hex,
)


def _load_toy(labels_csv) -> tuple[torch.Tensor, pd.DataFrame]:
    table = pd.read_csv(labels_csv)
    return load_uint8([labels_csv.parent / p for p in table["image"]], 64), table


@pytest.fixture(scope="module")
def real(toy_data_dir):
    return _load_toy(toy_data_dir / "labels.csv")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """New lesions from the same procedural distribution: what a good generator should produce."""
    from lesiongen.data.toy import make_toy_dataset

    labels = make_toy_dataset(tmp_path_factory.mktemp("toy-clean"), n_per_class=6, size=64, seed=1)
    return _load_toy(labels)[0]


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=quality)
    return torch.from_numpy(np.array(Image.open(buffer).convert("RGB"))).permute(2, 0, 1)


def _resized(image: torch.Tensor, size: int) -> torch.Tensor:
    small = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True)
    return F.interpolate(small, size=image.shape[-2:], mode="bicubic").round().clamp(0, 255).to(torch.uint8)[0]


def _planted(real_images: torch.Tensor, clean_images: torch.Tensor):
    """Clean images with copies of training images 3, 10, 20, 30 planted at known positions."""
    copies = {
        5: (3, real_images[3]),                          # exact copy
        11: (10, _jpeg(real_images[10], 75)),            # re-encoded
        17: (20, _resized(real_images[20], 56)),         # slight resize
        23: (30, real_images[30].flip(-1)),              # mirrored copy
    }
    synthetic = clean_images.clone()
    for position, (_, image) in copies.items():
        synthetic[position] = image
    return synthetic, {position: source for position, (source, _) in copies.items()}


def test_phash_matches_imagehash(real):
    images, _ = real
    ours = phash_bits(images[:40], hash_size=8)
    theirs = torch.stack([
        torch.from_numpy(imagehash.phash(Image.fromarray(img.permute(1, 2, 0).numpy())).hash.reshape(-1))
        for img in images[:40]
    ])
    differing = (ours != theirs).sum(1).float()
    assert differing.mean() <= 2.0, differing  # only the resize filter differs (PIL Lanczos vs bicubic)
    assert phash_hex(theirs) == [str(imagehash.ImageHash(h.numpy().reshape(8, 8))) for h in theirs]


def test_hamming_distances_brute_force():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(7, 256, generator=generator) > 0.5
    b = torch.rand(5, 256, generator=generator) > 0.5
    expected = torch.tensor([[int((x != y).sum()) for y in b] for x in a])
    assert torch.equal(hamming_distances(a, b), expected)


def test_dihedral_views_are_the_eight_orientations(real):
    image = real[0][:1]
    views = dihedral_views(image)
    assert len(views) == 8
    assert len({v.numpy().tobytes() for v in views}) == 8


def test_flags_planted_copies_and_passes_clean_images(real, clean):
    real_images, _ = real
    synthetic, planted = _planted(real_images, clean)
    result = MemorizationIndex(real_images).query(synthetic)
    flagged = set(torch.nonzero(result.flagged).flatten().tolist())
    assert flagged == set(planted), result.phash_distance
    for position, source in planted.items():
        assert result.nearest_index[position] == source
        assert result.score[position] <= 1
    assert result.phash_distance[5] == 0
    clean_positions = [i for i in range(len(synthetic)) if i not in planted]
    assert result.phash_distance[clean_positions].min() > DEFAULT_PHASH_THRESHOLD


def test_without_orientations_a_mirrored_copy_is_missed(real, clean):
    real_images, _ = real
    synthetic, _ = _planted(real_images, clean)
    result = MemorizationIndex(real_images, orientations=False).query(synthetic)
    assert not result.flagged[23]
    assert result.flagged[5] and result.flagged[11] and result.flagged[17]


def thumbnail_features(images: torch.Tensor) -> torch.Tensor:
    """An 8x8 colour thumbnail (192-d), centred: a simple real feature extractor for the test."""
    thumb = F.adaptive_avg_pool2d(images.float() / 255, 8).flatten(1)
    return thumb - thumb.mean(1, keepdim=True)


def test_feature_distance_with_calibrated_threshold(real, clean):
    real_images, table = real
    synthetic, planted = _planted(real_images, clean)
    index = MemorizationIndex(real_images, feature_fn=thumbnail_features, groups=table["group_id"],
                              phash_threshold=1)
    assert 0 < index.feature_threshold < 0.5
    result = index.query(synthetic)
    assert result.feature_distance[5] < 1e-5 and result.feature_index[5] == 3
    assert result.flagged[5] and result.flagged[11]  # copy and JPEG copy are near in feature space too
    frame = result.to_frame(real_ids=list(table["image"]), synthetic_ids=[f"s{i}" for i in range(len(synthetic))])
    assert list(frame.columns) == ["synthetic", "nearest_real", "phash_real", "phash_distance",
                                   "feature_real", "feature_distance", "score", "flagged"]
    assert frame.loc[5, "nearest_real"] == table["image"][3]
    summary = result.summary()
    assert summary["n_flagged"] == int(result.flagged.sum()) and summary["phash_bits"] == 256


def test_precomputed_features_equal_feature_fn(real, clean):
    real_images, table = real
    by_fn = MemorizationIndex(real_images, feature_fn=thumbnail_features, feature_threshold=0.01).query(clean)
    by_array = MemorizationIndex(real_images, real_features=thumbnail_features(real_images),
                                 feature_threshold=0.01).query(clean, features=thumbnail_features(clean))
    assert torch.equal(by_fn.feature_index, by_array.feature_index)
    assert torch.allclose(by_fn.feature_distance, by_array.feature_distance)


def test_bad_input_is_named(real):
    real_images, _ = real
    with pytest.raises(InputError, match="uint8"):
        MemorizationIndex(real_images.float())
    with pytest.raises(InputError, match="phash_threshold"):
        MemorizationIndex(real_images, phash_threshold=0)
    index = MemorizationIndex(real_images[:10], real_features=thumbnail_features(real_images[:10]))
    with pytest.raises(InputError, match="pass the synthetic images' features"):
        index.query(real_images[:2])
    with pytest.raises(InputError, match="expected"):
        index.query(real_images[:2], features=torch.zeros(2, 3))
