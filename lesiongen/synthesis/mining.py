"""Mining: pick the images a classifier gets wrong, or only just right, from `evaluate`'s predictions.

Input is `predictions.csv` + `predictions.meta.json` written by `lesiongen evaluate` (one row per image:
label, pred, loss, margin = p(true) - max p(other), prob_<class>...). A case is *hard* when it is
misclassified, or correct with a low margin or a loss in the top quantile of the correct cases. Cases are
ranked by `loss x confusion weight`, where the weight favours clinically costly confusions (a melanoma
called a nevus matters more than a nevus called a benign keratosis). Then a cap per lesion (`group_id`)
keeps one lesion photographed many times from taking the whole budget, and a quota per class bounds how
many cases each class gets.

Mining is done on the validation split. The test split is refused unless the caller opts in
(`allow_test_mining`), because images made from test cases and trained on make the test numbers
optimistic; such a result carries `LEAKAGE_WARNING`, which every output of the run repeats. With
`selection_reserve`, the reserved validation lesions (lesiongen.data.reserve) are never candidates.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lesiongen.data.manifest import SPLITS, check_rows, load_manifest, numeric_column, read_csv_text
from lesiongen.data.reserve import check_share, reserved_groups
from lesiongen.errors import InputError, LesiongenError
from lesiongen.utils.hashing import sha256_file

PREDICTION_COLUMNS: tuple[str, ...] = ("image", "label", "split", "group_id", "pred", "loss", "margin")

# Clinically costly confusions, used for the classes a data set has (HAM10000 keys). "a<->b" weighs both
# directions, "a->b" only true class a predicted (or nearly predicted) as b.
DEFAULT_CONFUSION_WEIGHTS: dict[str, float] = {"mel<->nv": 2.0, "bkl<->mel": 1.5}

LEAKAGE_WARNING = (
    "LEAKAGE: hard cases were mined from the TEST split (allow_test_mining). Synthetic images derived "
    "from test images make any test-set metric of a classifier trained on them optimistic; report them "
    "only as the seed protocol's numbers, never as a held-out result."
)


class NoHardCasesError(LesiongenError):
    """Mining found nothing to work on (e.g. the classifier is right, with margin, on every image)."""


@dataclass
class MiningConfig:
    """How hard cases are chosen. Validated here so a bad value fails before any model is loaded."""

    split: str = "val"
    margin_threshold: float = 0.2  # correct cases with p(true) - max p(other) below this are hard
    loss_quantile: float | None = 0.9  # correct cases with a loss above this quantile are hard (None: off)
    include_correct: bool = True  # False: misclassified cases only
    per_class_quota: int | dict[str, int] | None = None  # at most this many cases per class
    max_per_lesion: int | None = 1  # at most this many images of one group_id
    max_cases: int | None = None  # overall budget: the hardest this many after the caps (None: all)
    confusion_weights: dict[str, float] | None = None  # None: DEFAULT_CONFUSION_WEIGHTS for present classes
    allow_test_mining: bool = False
    # Leave this share of the validation lesions out (lesiongen.data.reserve): the classifier's `selection:
    # reserved` selects on them, so they must never become variants. None: mine every lesion.
    selection_reserve: float | None = None

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"mining split '{self.split}' is not one of {list(SPLITS)}")
        if self.split == "test" and not self.allow_test_mining:
            raise ValueError("mining the test split leaks test images into training; pass --allow-test-mining "
                             "(in a loop config: mining.allow_test_mining: true, or --set mining.allow_test_mining"
                             "=true) to do it anyway (every output then carries a leakage warning)")
        if not 0.0 <= self.margin_threshold <= 1.0:
            raise ValueError(f"margin_threshold must be in [0, 1], got {self.margin_threshold}")
        if self.loss_quantile is not None and not 0.0 < self.loss_quantile < 1.0:
            raise ValueError(f"loss_quantile must be in (0, 1) or null, got {self.loss_quantile}")
        quotas = self.per_class_quota.values() if isinstance(self.per_class_quota, dict) else [self.per_class_quota]
        if any(q is not None and (not isinstance(q, int) or q < 1) for q in quotas):
            raise ValueError("per_class_quota must be a positive integer (or class -> integer), "
                             f"got {self.per_class_quota}")
        if self.max_per_lesion is not None and self.max_per_lesion < 1:
            raise ValueError(f"max_per_lesion must be >= 1 or null, got {self.max_per_lesion}")
        if self.max_cases is not None and self.max_cases < 1:
            raise ValueError(f"max_cases must be >= 1 or null, got {self.max_cases}")
        if self.selection_reserve is not None:
            if self.split != "val":
                raise ValueError(f"selection_reserve is a share of the validation lesions, but the mining split is "
                                 f"'{self.split}'; mine split 'val' or leave selection_reserve unset")
            self.selection_reserve = check_share(self.selection_reserve, "selection_reserve")
        for key, weight in (self.confusion_weights or {}).items():
            parse_confusion_key(key)
            if not (isinstance(weight, (int, float)) and weight > 0):
                raise ValueError(f"confusion weight for '{key}' must be a positive number, got {weight}")

    @property
    def leakage_warning(self) -> str | None:
        return LEAKAGE_WARNING if self.split == "test" else None


def parse_confusion_key(key: str) -> list[tuple[str, str]]:
    """'mel<->nv' -> [(mel, nv), (nv, mel)]; 'mel->nv' -> [(mel, nv)]."""
    for arrow, both in (("<->", True), ("->", False)):
        if arrow in key:
            a, b = (part.strip() for part in key.split(arrow, 1))
            if a and b and a != b:
                return [(a, b), (b, a)] if both else [(a, b)]
    raise ValueError(f"confusion pair '{key}' must look like 'mel<->nv' or 'mel->nv' (two different classes)")


def confusion_weight_table(weights: dict[str, float] | None, classes: list[str]) -> dict[tuple[str, str], float]:
    """(true, confused-with) -> weight. User pairs must name real classes; defaults apply where they can."""
    table: dict[tuple[str, str], float] = {}
    if weights is None:
        for key, weight in DEFAULT_CONFUSION_WEIGHTS.items():
            table.update({pair: weight for pair in parse_confusion_key(key) if set(pair) <= set(classes)})
        return table
    for key, weight in weights.items():
        for pair in parse_confusion_key(key):
            unknown = sorted(set(pair) - set(classes))
            if unknown:
                raise InputError(f"--confusion (mining.confusion_weights): pair '{key}' names unknown class(es) "
                                 f"{unknown}; classes are {classes}")
            table[pair] = float(weight)
    return table


@dataclass
class Predictions:
    """`evaluate`'s per-image predictions for one split, checked against the manifest they came from."""

    df: pd.DataFrame
    classes: list[str]
    path: Path
    meta: dict = field(default_factory=dict)
    split_rows: pd.DataFrame | None = None  # the manifest's rows of the split (the selection reserve's base)

    @property
    def probabilities(self) -> np.ndarray:
        return self.df[[f"prob_{c}" for c in self.classes]].to_numpy(dtype=np.float64)


def load_predictions(path: str | os.PathLike, manifest_path: str | os.PathLike, *, split: str,
                     classes: list[str]) -> Predictions:
    """Read predictions.csv (+ its meta) and refuse predictions made on another manifest or split.

    The manifest check compares `manifest_sha256` in predictions.meta.json with the manifest file's own
    hash: mining predictions of another manifest would silently pick the wrong images. The rows are checked
    too (the CSV may have been edited after the meta was written): every image must be a row of the
    manifest's `split` with the same label and group_id, listed once.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such predictions file (`lesiongen evaluate --out DIR` writes "
                         "DIR/predictions.csv)")
    meta_file = path.with_name(path.stem + ".meta.json")
    if not meta_file.is_file():
        raise InputError(f"{path}: no {meta_file.name} beside it; mining needs the predictions' provenance "
                         "(written by `lesiongen evaluate`) to check they belong to the manifest")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{meta_file}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or "manifest_sha256" not in meta:
        raise InputError(f"{path} is not a predictions file from `lesiongen evaluate` ({meta_file.name} has no "
                         "manifest_sha256); pass the predictions.csv that `lesiongen evaluate --out` wrote")
    expected = sha256_file(manifest_path)
    if meta.get("manifest_sha256") != expected:
        raise InputError(
            f"{path} was made from another manifest: {meta_file.name} has manifest_sha256 "
            f"{str(meta.get('manifest_sha256'))[:12]}... ({meta.get('manifest', '?')}), but {manifest_path} hashes "
            f"to {expected[:12]}...; run `lesiongen evaluate` on this manifest first")
    if meta.get("classes") is not None and list(meta["classes"]) != list(classes):
        raise InputError(f"{meta_file}: classes {meta['classes']} differ from the manifest's {classes}")
    df = read_csv_text(path)
    prob_columns = [f"prob_{c}" for c in classes]
    missing = [c for c in (*PREDICTION_COLUMNS, *prob_columns) if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; expected evaluate's predictions.csv")
    df = df[df["split"] == split].copy()  # the index keeps the file's row numbers (row = index + 2) for messages
    if df.empty:
        raise InputError(f"{path} has no predictions on split '{split}' (its meta says split "
                         f"'{meta.get('split', '?')}'); evaluate the classifier on --split {split}")
    for column in ("loss", "margin"):
        df[column] = numeric_column(df, column, path)
    for column in prob_columns:
        df[column] = numeric_column(df, column, path, low=0.0, high=1.0)
    check_rows(df, df["label"].isin(classes) & df["pred"].isin(classes), path,
               lambda row: f": label/pred '{row['label']}'/'{row['pred']}' not in {classes}")
    split_rows = _check_rows_against_manifest(df, path, manifest_path, split)
    return Predictions(df.reset_index(drop=True), list(classes), path, meta, split_rows)


def _check_rows_against_manifest(df: pd.DataFrame, path: Path, manifest_path: str | os.PathLike,
                                 split: str) -> pd.DataFrame:
    """Each prediction row (index = file row - 2) must be a distinct image of the manifest's `split`, with the
    manifest's label and group_id: a mismatch would mine an image under the wrong class or lesion."""
    duplicated = df.index[df["image"].duplicated()]
    if len(duplicated):
        i = duplicated[0]
        first = df.index[df["image"] == df.at[i, "image"]][0]
        raise InputError(f"{path} row {i + 2}: image '{df.at[i, 'image']}' is listed twice (also row {first + 2})")
    manifest = load_manifest(manifest_path)
    part = manifest.split(split, allow_empty=True)
    rows = part.df.set_index("image")
    for i, image, label, group in zip(df.index, df["image"], df["label"], df["group_id"]):
        if image not in rows.index:
            raise InputError(f"{path} row {i + 2}: image '{image}' is not in split '{split}' of {manifest_path}")
        expected_label, expected_group = rows.at[image, "label"], rows.at[image, "group_id"]
        if label != expected_label:
            raise InputError(f"{path} row {i + 2}: image '{image}' has label '{label}', but {manifest_path} "
                             f"labels it '{expected_label}'")
        if str(group) != str(expected_group):
            raise InputError(f"{path} row {i + 2}: image '{image}' has group_id '{group}', but {manifest_path} "
                             f"gives '{expected_group}'")
    return part.subset(~part.is_synthetic).df  # the classifier's validation rows when split is val


@dataclass
class MiningResult:
    cases: pd.DataFrame  # one row per mined image, ranked hardest first
    stats: dict
    leakage_warning: str | None = None


def mine_hard_cases(predictions: Predictions, config: MiningConfig) -> MiningResult:
    """Select, score and cap the hard cases; raises NoHardCasesError when nothing qualifies."""
    df = predictions.df.copy()
    reserved = 0
    if config.selection_reserve is not None:
        base = predictions.split_rows if predictions.split_rows is not None else df
        keep = ~df["group_id"].astype(str).isin(reserved_groups(base, config.selection_reserve)).to_numpy()
        df, reserved = df[keep].reset_index(drop=True), int((~keep).sum())
        if df.empty:
            raise NoHardCasesError(
                f"every one of the {reserved} predictions in {predictions.path} is of a lesion in the selection "
                f"reserve (--selection-reserve {config.selection_reserve:g}, at least one lesion of every class); "
                "nothing is left to mine. Lower the share, use a larger validation split, or select with "
                "--selection all / unseen and mine without the reserve")
    classes = predictions.classes
    probs = df[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64)
    label_idx = np.array([classes.index(c) for c in df["label"]], dtype=np.int64)
    others = probs.copy()
    others[np.arange(len(df)), label_idx] = -np.inf
    # The class a case is confused with: the prediction when wrong, the runner-up when right.
    df["confused_with"] = [classes[i] for i in others.argmax(axis=1)]
    df["p_label"] = probs[np.arange(len(df)), label_idx]
    correct = df["pred"] == df["label"]
    df["correct"] = correct.astype(int)

    reason = pd.Series("", index=df.index)
    reason[~correct] = "misclassified"
    if config.include_correct:
        reason[correct & (df["margin"] < config.margin_threshold)] = "low-margin"
        if config.loss_quantile is not None and correct.any():
            cutoff = float(np.quantile(df.loc[correct, "loss"], config.loss_quantile))
            reason[correct & (reason == "") & (df["loss"] > cutoff)] = "high-loss"
    df["reason"] = reason

    if isinstance(config.per_class_quota, dict) and set(config.per_class_quota) - set(classes):
        raise InputError("--per-class-quota (mining.per_class_quota) names unknown class(es) "
                         f"{sorted(set(config.per_class_quota) - set(classes))}; "
                         f"classes are {classes}")
    weights = confusion_weight_table(config.confusion_weights, classes)
    df["confusion_weight"] = [weights.get(pair, 1.0) for pair in zip(df["label"], df["confused_with"])]
    df["hardness"] = df["loss"] * df["confusion_weight"]

    stats = {
        "split": config.split,
        "predictions": len(df) + reserved,
        "reserved_for_selection": reserved,  # rows of the selection reserve's lesions, never mined
        "misclassified": int((~correct).sum()),
        "candidates": int((reason != "").sum()),
    }
    hard = df[reason != ""].sort_values(["hardness", "image"], ascending=[False, True], kind="mergesort")
    if config.max_per_lesion is not None:
        hard = hard.groupby("group_id", sort=False).head(config.max_per_lesion)
    stats["after_lesion_cap"] = len(hard)
    position_in_class = hard.groupby("label", sort=False).cumcount()
    quota = hard["label"].map(lambda label: _quota(config.per_class_quota, label))
    hard = hard[position_in_class < quota].reset_index(drop=True)
    if config.max_cases is not None:
        hard = hard.head(config.max_cases)
    stats["mined"] = len(hard)
    stats["per_class"] = {c: int((hard["label"] == c).sum()) for c in classes}
    stats["per_reason"] = {r: int((hard["reason"] == r).sum()) for r in ("misclassified", "low-margin", "high-loss")}
    if hard.empty:
        raise NoHardCasesError(
            f"no hard cases in {predictions.path} (split '{config.split}'): {stats['predictions']} predictions, "
            f"{stats['misclassified']} misclassified, none correct with margin < {config.margin_threshold}"
            + (f" or loss above the {config.loss_quantile:.2f} quantile" if config.loss_quantile else "")
            + "; nothing to generate. Raise --margin-threshold, or mine a classifier that still makes mistakes")
    hard.insert(0, "rank", np.arange(len(hard)))
    columns = ["rank", "image", "label", "split", "group_id", "pred", "confused_with", "correct", "reason",
               "p_label", "margin", "loss", "confusion_weight", "hardness"]
    leakage = config.leakage_warning
    result = hard[columns].copy()
    if leakage:
        result["leakage_warning"] = leakage
    return MiningResult(result, stats, leakage)


def _quota(quota: int | dict[str, int] | None, label: str) -> float:
    """The class's quota; a class missing from a quota mapping is not capped."""
    if isinstance(quota, dict):
        return quota.get(label, math.inf)
    return math.inf if quota is None else quota
