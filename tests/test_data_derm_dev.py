"""`data index` + `data check` on the real derm-dev set (12,753 images; slow, opt-in with -m slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.data.manifest import load_manifest
from lesiongen.data.scan import phash_hex, scan_images

pytestmark = pytest.mark.slow
runner = CliRunner(env={"COLUMNS": "2000"})


def test_derm_dev_index_and_check(derm_dev_dir, tmp_path):
    out = tmp_path / "manifest.csv"
    result = runner.invoke(app, ["data", "index", derm_dev_dir, "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    df = manifest.df
    assert len(df) == 12753 and manifest.classes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert (df.groupby("group_id")["split"].nunique() == 1).all()  # no lesion in two splits
    counts = df.groupby(["split", "label"]).size()
    for split in ("train", "val", "test"):
        for label in manifest.classes:
            assert counts.get((split, label), 0) > 0, (split, label)
    assert {"lesion_id", "localization", "isic2019_label"} <= set(df.columns)

    report_path = tmp_path / "report.json"
    result = runner.invoke(app, ["data", "check", str(out), "--json-out", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["lesion_leakage"] == [] and report["missing_files"] == [] and report["unreadable"] == []
    assert not [d for d in report["exact_duplicates"] if len(d["splits"]) > 1]
    # Two photos are each filed under two lesion ids, across splits; at 256 bits nothing else under another id
    # comes within the threshold (at 64 bits and distance 2, 23 cross-split pairs did, 21 of them not copies).
    copies = [{p["a"], p["b"]} for p in report["near_duplicates"] if not p["same_group"]]
    assert copies == [{"images/ISIC_0025226.jpg", "images/ISIC_0030074.jpg"},
                      {"images/ISIC_0000174.jpg", "images/ISIC_0015071.jpg"}]

    joined = tmp_path / "joined.csv"
    result = runner.invoke(app, ["data", "index", derm_dev_dir, "--out", str(joined), "--group-near-duplicates"])
    assert result.exit_code == 0, result.output
    assert load_manifest(joined).meta["near_duplicates_joined"]["sets"] == [["HAM_0000140", "HAM_0004919"],
                                                                           ["ISIC_0000174", "ISIC_0015071"]]
    result = runner.invoke(app, ["data", "check", str(joined), "--strict"])
    assert result.exit_code == 0, result.output


def test_scan_hashes_match_the_published_columns(derm_dev_dir):
    """labels.csv ships sha256_pixels and pHash per image; the scan must compute the same values."""
    rows = pd.read_csv(Path(derm_dev_dir) / "labels.csv", dtype=str, keep_default_na=False).sample(300, random_state=0)
    scan = scan_images([Path(derm_dev_dir) / p for p in rows["image"]])
    assert scan.pixel_sha256 == list(rows["sha256_pixels"])
    assert [phash_hex(h) for h in scan.phash] == list(rows["phash"])
