"""`data check`: class counts, unreadable/missing images, duplicates, near-duplicates, lesion leakage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.data.check import check_manifest
from lesiongen.data.manifest import load_manifest, write_manifest
from lesiongen.data.near_duplicates import near_duplicate_pairs
from lesiongen.data.scan import bits_hex, phash_hex, scan_images

runner = CliRunner(env={"COLUMNS": "2000"})


@pytest.fixture
def broken_copy(toy_data_dir, toy_manifest, tmp_path):
    """A private copy of the toy images + manifest that a test may damage."""
    data = tmp_path / "data"
    shutil.copytree(toy_data_dir, data)
    manifest = load_manifest(toy_manifest, root=data)
    manifest.meta = {}
    path = tmp_path / "manifest.csv"
    write_manifest(manifest, path)
    return path


def edit_manifest(path: Path, edit) -> pd.DataFrame:
    manifest = load_manifest(path)
    edit(manifest.df)
    write_manifest(manifest, path)
    return manifest.df


def test_clean_toy_manifest_passes_with_a_table(toy_manifest, tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["data", "check", str(toy_manifest), "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output
    for label in ("akiec", "mel", "vasc"):
        assert any(line.split()[:1] == [label] for line in result.output.splitlines())
    report = json.loads(out.read_text())
    assert report["ok"] and report["errors"] == [] and report["n_images"] == 112
    assert sum(report["class_counts"]["train"].values()) + sum(report["class_counts"]["val"].values()) \
        + sum(report["class_counts"]["test"].values()) == 112
    again = runner.invoke(app, ["data", "check", str(toy_manifest), "--json-out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_lesion_leakage_is_an_error(broken_copy):
    def leak(df):
        group = df["group_id"].value_counts().index[0]  # a lesion with several photos
        rows = df.index[df["group_id"] == group]
        df.loc[rows[0], "split"] = "test" if df.loc[rows[1], "split"] != "test" else "val"

    edit_manifest(broken_copy, leak)
    report = check_manifest(broken_copy)
    assert not report["ok"] and len(report["lesion_leakage"]) == 1
    assert len(report["lesion_leakage"][0]["splits"]) == 2
    result = runner.invoke(app, ["data", "check", str(broken_copy)])
    assert result.exit_code == 1 and "lesion(s) (group_id) appear in more than one split" in result.output


def test_missing_and_truncated_images_are_errors(broken_copy):
    df = load_manifest(broken_copy).df
    root = load_manifest(broken_copy).root
    (root / df["image"][0]).unlink()
    whole = (root / df["image"][1]).read_bytes()
    (root / df["image"][1]).write_bytes(whole[: len(whole) // 2])
    report = check_manifest(broken_copy)
    assert report["missing_files"] == [df["image"][0]]
    assert [u["image"] for u in report["unreadable"]] == [df["image"][1]]
    assert "truncated" in report["unreadable"][0]["error"]
    assert len(report["errors"]) == 2


def test_exact_and_near_duplicates_across_splits(broken_copy):
    manifest = load_manifest(broken_copy)
    df, root = manifest.df, manifest.root
    source = df.index[df["split"] == "train"][0]
    other_split = df.index[df["split"] == "test"]
    exact, near = other_split[0], other_split[1]
    # The exact copy is saved as PNG under a new name: same pixels, different file.
    shutil.copy(root / df["image"][source], root / df["image"][exact])
    pixels = np.asarray(Image.open(root / df["image"][source])).astype(int)
    pixels[0, 0] = (pixels[0, 0] + 40) % 256  # one pixel changed: same pHash, different pixel hash
    Image.fromarray(pixels.astype(np.uint8)).save(root / df["image"][near])
    report = check_manifest(broken_copy, phash_threshold=2)
    across = [d for d in report["exact_duplicates"] if len(d["splits"]) > 1]
    assert len(across) == 1 and set(across[0]["images"]) == {df["image"][source], df["image"][exact]}
    pairs = {frozenset((p["a"], p["b"])) for p in report["near_duplicates"]}
    assert frozenset((df["image"][source], df["image"][near])) in pairs
    assert frozenset((df["image"][source], df["image"][exact])) not in pairs  # reported once, as exact
    assert any("pixel-identical" in e for e in report["errors"])
    assert any("near-duplicate" in w for w in report["warnings"])


def test_strict_fails_on_warnings_alone(broken_copy):
    """A near-duplicate across splits is a warning (a re-encoded copy may be a new photo of the same lesion): the
    check passes, unless --strict asks warnings to fail it too."""
    manifest = load_manifest(broken_copy)
    df, root = manifest.df, manifest.root
    source, near = df.index[df["split"] == "train"][0], df.index[df["split"] == "test"][0]
    pixels = np.asarray(Image.open(root / df["image"][source])).astype(int)
    pixels[0, 0] = (pixels[0, 0] + 40) % 256
    Image.fromarray(pixels.astype(np.uint8)).save(root / df["image"][near])
    lenient = runner.invoke(app, ["data", "check", str(broken_copy)])
    assert lenient.exit_code == 0 and "near-duplicate" in lenient.output
    strict = runner.invoke(app, ["data", "check", str(broken_copy), "--strict"])
    assert strict.exit_code == 1 and "--strict: 1 warning(s) fail the check" in strict.output


def test_class_missing_from_a_split_is_a_warning(broken_copy):
    edit_manifest(broken_copy, lambda df: df.__setitem__("split", df["split"].where(df["label"] != "df", "train")))
    report = check_manifest(broken_copy)
    assert report["ok"]
    assert any("no images of class(es) ['df']" in w for w in report["warnings"])


def test_near_duplicate_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    bits = rng.random((300, 256)) < 0.5
    bits[50] = bits[10]
    bits[50, [3, 200]] ^= True  # distance 2
    bits[200] = bits[10]  # distance 0
    first, second, distance = near_duplicate_pairs(bits, 2)
    hamming = {(i, j): int((bits[i] != bits[j]).sum()) for i in range(300) for j in range(i + 1, 300)}
    expected = {pair for pair, d in hamming.items() if d <= 2}
    assert set(zip(first.tolist(), second.tolist())) == expected and len(expected) >= 3
    assert sorted(distance.tolist()) == sorted(hamming[pair] for pair in expected)


def test_scan_phashes_equal_imagehash(toy_manifest):
    """64 bits as published (derm-dev's labels.csv), 256 bits for judging near-duplicates."""
    paths = load_manifest(toy_manifest).image_paths()[:20]
    scan = scan_images(paths)
    images = [Image.open(p).convert("RGB") for p in paths]
    assert [phash_hex(h) for h in scan.phash] == [str(imagehash.phash(img)) for img in images]
    assert [bits_hex(bits) for bits in scan.wide_phash] == [str(imagehash.phash(img, hash_size=16)) for img in images]


def test_json_out_that_is_a_folder_is_named(toy_manifest, tmp_path):
    result = runner.invoke(app, ["data", "check", str(toy_manifest), "--json-out", str(tmp_path), "--overwrite"])
    assert result.exit_code == 2 and f"--json-out {tmp_path} is a folder; expected a file" in result.output
