"""Near-duplicates by 256-bit pHash: the pairs, and `data index --group-near-duplicates` joining lesion ids."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.data.manifest import load_manifest, meta_path_for
from lesiongen.data.near_duplicates import join_near_duplicate_groups

runner = CliRunner(env={"COLUMNS": "2000"})


def test_groups_join_transitively_into_the_smallest_id_whatever_the_row_order():
    rng = np.random.default_rng(0)
    bits = rng.random((6, 256)) < 0.5
    bits[3] = bits[0]
    bits[3, :5] ^= True  # 5 bits from row 0
    bits[5] = bits[3]
    bits[5, 100:104] ^= True  # 4 bits from row 3, 9 from row 0
    groups = ["c", "a", "b", "d", "b", "e"]
    joined_groups, joined = join_near_duplicate_groups(groups, bits, threshold=5)
    assert joined == [["c", "d", "e"]]  # 0 ~ 3 ~ 5; row 5 is 9 bits from row 0, joined through row 3
    assert joined_groups == ["c", "a", "b", "c", "b", "c"]
    order = [5, 4, 3, 2, 1, 0]
    again, joined_again = join_near_duplicate_groups([groups[i] for i in order], bits[order], threshold=5)
    assert again == [joined_groups[i] for i in order] and joined_again == joined
    assert join_near_duplicate_groups(groups, bits, threshold=4)[1] == [["d", "e"]]


def test_index_keeps_a_photo_filed_under_two_lesion_ids_in_one_split(toy_data_dir, tmp_path):
    """A re-encoded, brighter copy of one lesion's photo under another lesion's id: `data check` names the pair,
    and `data index --group-near-duplicates` gives both one lesion id (the smaller), so one split."""
    root = tmp_path / "data"
    shutil.copytree(toy_data_dir, root)
    labels = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    first = labels.groupby("group_id").head(1)
    original, copy = first[first["label"] == "mel"].iloc[0], first[first["label"] == "mel"].iloc[1]
    photo = ImageEnhance.Brightness(Image.open(root / original["image"]).convert("RGB")).enhance(1.15)
    photo.save(root / copy["image"], format="PNG")

    plain = tmp_path / "plain.csv"
    assert runner.invoke(app, ["data", "index", str(root), "--out", str(plain)]).exit_code == 0
    check = runner.invoke(app, ["data", "check", str(plain), "--json-out", str(tmp_path / "check.json")])
    report = json.loads((tmp_path / "check.json").read_text())
    pairs = [p for p in report["near_duplicates"] if not p["same_group"]]
    assert check.exit_code == 0 and report["phash_bits"] == 256
    assert [{p["a"], p["b"]} for p in pairs] == [{original["image"], copy["image"]}]

    out = tmp_path / "joined.csv"
    result = runner.invoke(app, ["data", "index", str(root), "--out", str(out), "--group-near-duplicates"])
    assert result.exit_code == 0, result.output
    ids = sorted([original["group_id"], copy["group_id"]])
    assert "joined 1 set(s) of near-duplicate images filed under different lesion ids" in result.output
    df = load_manifest(out).df.set_index("image")
    both = df.loc[[original["image"], copy["image"]]]
    assert set(both["group_id"]) == {ids[0]} and both["split"].nunique() == 1
    assert sorted(both["source_group_id"]) == ids  # what the data said stays
    moved = df[df["group_id"] != df["source_group_id"]]
    assert len(moved) == len(df[df["source_group_id"] == ids[1]])  # only the joined lesion's images
    meta = json.loads(meta_path_for(out).read_text())
    assert meta["near_duplicates_joined"] == {"phash_bits": 256, "threshold": 24, "sets": [ids]}
    assert meta["n_groups"] == len(set(labels["group_id"])) - 1
    strict = runner.invoke(app, ["data", "check", str(out), "--strict"])
    assert strict.exit_code == 0, strict.output
