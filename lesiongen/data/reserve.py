"""The selection reserve: a fixed, class-stratified share of the validation lesions that is never mined.

Mined hard cases are validation images, and their variants keep the lesion id, so an arm that trains on them is
selected (best epoch, early stopping) partly on its own training material. `selection: unseen` leaves each arm's
own source lesions out, which gives every arm a different, shrinking selection set. The reserve instead sets
aside the same lesions for every arm and round: mining skips them (`--selection-reserve`) and the classifier
selects on them alone (`--selection reserved`), so all arms are chosen on identical held-out images.

Which lesions are reserved depends only on the validation rows' (group_id, label) and the share: per class,
the lesions whose salted SHA-256 ranks lowest, so mining and training agree without sharing a file, in any
process and whatever the row order.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd

SALT = "lesiongen-selection-reserve"


def check_share(share: object, name: str = "selection_reserve") -> float:
    """A share of lesions in (0, 1), else a ValueError naming `name`."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share < 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1), got {share!r}")
    return float(share)


def _rank_key(group_id: str) -> str:
    return hashlib.sha256(f"{SALT}:{group_id}".encode()).hexdigest()


def reserved_groups(val: pd.DataFrame, share: float) -> set[str]:
    """The reserved lesion ids among the validation rows `val` (columns group_id, label).

    Each lesion counts for its most frequent label; per class, round(share x lesions) of them are reserved,
    at least one, so every class present in validation keeps an image to select on.
    """
    share = check_share(share)
    groups = val.assign(group_id=val["group_id"].astype(str))
    # A lesion imaged under two labels counts for its most frequent one (ties: the first name) whatever the row order.
    label_of = groups.groupby("group_id")["label"].agg(lambda labels: labels.value_counts().sort_index().idxmax())
    reserved: set[str] = set()
    for _, members in label_of.groupby(label_of, sort=True):
        ranked = sorted(members.index, key=_rank_key)
        count = min(len(ranked), max(1, math.floor(share * len(ranked) + 0.5)))
        reserved.update(ranked[:count])
    return reserved


def reserved_mask(val: pd.DataFrame, share: float) -> np.ndarray:
    """One bool per row of `val`: its lesion is in the reserve."""
    return val["group_id"].astype(str).isin(reserved_groups(val, share)).to_numpy()
