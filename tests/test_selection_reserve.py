"""The selection reserve: which validation lesions it holds, that mining never picks them, and that the
loop drives mining and selection from one setting."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_synthesis_mining import write_predictions

from lesiongen.data.manifest import load_manifest
from lesiongen.data.reserve import reserved_groups, reserved_mask
from lesiongen.errors import InputError
from lesiongen.loop.config import load_loop_config
from lesiongen.synthesis.mining import MiningConfig, load_predictions, mine_hard_cases


def lesions(counts: dict[str, int], images_per_lesion: int = 2) -> pd.DataFrame:
    rows = [{"group_id": f"{label}-{i}", "label": label, "image": f"{label}-{i}-{k}.png"}
            for label, n in counts.items() for i in range(n) for k in range(images_per_lesion)]
    return pd.DataFrame(rows)


def test_the_reserve_is_stratified_by_class_and_keeps_one_lesion_of_every_class():
    val = lesions({"nv": 40, "mel": 10, "df": 1})
    reserve = reserved_groups(val, 0.3)
    per_class = pd.Series(sorted(reserve)).str.split("-").str[0].value_counts().to_dict()
    assert per_class == {"nv": 12, "mel": 3, "df": 1}
    mask = reserved_mask(val, 0.3)
    assert mask.sum() == 2 * len(reserve)  # every image of a reserved lesion
    assert set(val.loc[mask, "group_id"]) == reserve


def test_the_reserve_depends_on_the_lesions_not_on_row_order_or_ids_elsewhere():
    val = lesions({"nv": 30, "mel": 9})
    shuffled = val.sample(frac=1.0, random_state=3).reset_index(drop=True)
    assert reserved_groups(val, 0.25) == reserved_groups(shuffled, 0.25)
    smaller = reserved_groups(val, 0.1)
    assert smaller < reserved_groups(val, 0.5)  # a larger share only adds lesions: ranks are fixed per lesion
    numeric = val.assign(group_id=np.arange(len(val)) // 2)  # integer ids hash as their text
    assert reserved_groups(numeric, 0.3) == reserved_groups(numeric.assign(group_id=numeric["group_id"].astype(str)),
                                                            0.3)


def test_a_lesion_with_two_labels_counts_for_its_most_frequent_one():
    val = pd.DataFrame({"group_id": ["a", "a", "a", "b"], "label": ["mel", "nv", "mel", "nv"]})
    assert reserved_groups(val, 0.5) == {"a", "b"}  # one lesion per class, each class keeps one


@pytest.mark.parametrize("share", [0, 1, 1.5, -0.1, True, "0.3"])
def test_the_share_must_be_a_fraction(share):
    with pytest.raises(ValueError, match="selection_reserve must be a fraction in"):
        reserved_groups(lesions({"nv": 3}), share)
    with pytest.raises(ValueError, match="selection_reserve must be a fraction in"):
        MiningConfig(selection_reserve=share)


def test_mining_never_picks_a_reserved_lesion(tmp_path, toy_manifest):
    """Every validation image is misclassified, so without the reserve every lesion is a candidate."""
    manifest = load_manifest(toy_manifest)
    val = manifest.split("val").df
    path = tmp_path / "predictions.csv"
    write_predictions(path, toy_manifest, "val",
                      lambda row: {row["label"]: 0.1, ("nv" if row["label"] != "nv" else "mel"): 0.8})
    predictions = load_predictions(path, toy_manifest, split="val", classes=manifest.classes)
    every = mine_hard_cases(predictions, MiningConfig(max_per_lesion=None))
    kept = mine_hard_cases(predictions, MiningConfig(max_per_lesion=None, selection_reserve=0.3))
    reserve = reserved_groups(val, 0.3)
    assert len(every.cases) == len(val) and set(every.cases["group_id"].astype(str)) & reserve
    assert not set(kept.cases["group_id"].astype(str)) & reserve
    assert len(kept.cases) == len(val) - kept.stats["reserved_for_selection"]
    assert kept.stats["reserved_for_selection"] == int(reserved_mask(val, 0.3).sum()) > 0
    assert kept.stats["predictions"] == len(val)


def test_the_reserve_is_taken_from_the_whole_split_not_the_rows_predicted(tmp_path, toy_manifest):
    """Predictions of a subset of the split still leave out exactly the lesions training reserves."""
    manifest = load_manifest(toy_manifest)
    val = manifest.split("val").df
    path = tmp_path / "predictions.csv"
    full = write_predictions(path, toy_manifest, "val", lambda row: {row["label"]: 0.1, "bcc": 0.05})
    full.iloc[::2].to_csv(path, index=False)
    predictions = load_predictions(path, toy_manifest, split="val", classes=manifest.classes)
    result = mine_hard_cases(predictions, MiningConfig(max_per_lesion=None, selection_reserve=0.3))
    assert not set(result.cases["group_id"].astype(str)) & reserved_groups(val, 0.3)
    assert result.stats["reserved_for_selection"] == int(
        predictions.df["group_id"].astype(str).isin(reserved_groups(val, 0.3)).sum())


def test_the_reserve_is_of_validation_lesions_only():
    with pytest.raises(ValueError, match="selection_reserve is a share of the validation lesions"):
        MiningConfig(split="train", selection_reserve=0.3)


def test_the_loop_mines_around_the_reserve_its_classifier_selects_on():
    config = load_loop_config(None, {"classifier": {"selection": "reserved", "selection_reserve": 0.2}})
    assert config.mining.selection_reserve == 0.2
    assert load_loop_config(None, {}).mining.selection_reserve is None
    again = load_loop_config(None, {"classifier": {"selection": "reserved", "selection_reserve": 0.2},
                                    "mining": {"selection_reserve": 0.2}})  # a resumed run's saved config
    assert again.mining == config.mining
    for overrides, message in [
        ({"mining": {"selection_reserve": 0.2}}, "mining.selection_reserve is set by the loop"),
        ({"classifier": {"selection": "reserved"}, "mining": {"selection_reserve": 0.5}},
         "got 0.5 with classifier.selection 'reserved'"),
        ({"classifier": {"selection": "reserved", "synthetic_splits": ["train", "val", "test"]},
          "mining": {"split": "test", "allow_test_mining": True}}, "but mining.split is 'test'"),
    ]:
        with pytest.raises(InputError, match=message):
            load_loop_config(None, overrides)
