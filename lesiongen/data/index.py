"""`data index`: any supported layout -> one normalised manifest with a lesion-aware split.

Steps: read the source (`readers`), map its labels onto the prompt file's class keys, give images
without a lesion id their own group, decode every image once (unreadable ones are skipped and counted,
or fail the run with `strict`), optionally join the lesion ids of near-duplicate images (`near_duplicates`),
split by group (`split`), write manifest + sidecar atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from lesiongen.data.manifest import SPLITS, Manifest, meta_path_for, write_manifest
from lesiongen.data.near_duplicates import DEFAULT_PHASH_THRESHOLD, join_near_duplicate_groups
from lesiongen.data.prompts import PromptSet, load_prompts
from lesiongen.data.readers import SourceTable, read_source
from lesiongen.data.scan import OK, WIDE_PHASH_SIZE, scan_images
from lesiongen.data.split import SplitConfig, assign_splits
from lesiongen.errors import InputError, OutputExistsError
from lesiongen.utils.outdir import check_out_file


def label_aliases(prompts: PromptSet) -> dict[str, str]:
    """Spellings accepted for each class, lower-cased: its key and its human name
    (`MEL`, `mel`, `Melanoma` -> `mel`); nothing is guessed beyond what the prompt file says."""
    aliases: dict[str, str] = {}
    for key, cls in prompts.classes.items():
        aliases[cls.name.strip().lower()] = key
    for key in prompts.classes:  # keys win over names if a name happens to equal another class's key
        aliases[key.lower()] = key
    return aliases


def normalise_labels(table: SourceTable, prompts: PromptSet) -> list[str]:
    aliases = label_aliases(prompts)
    out = []
    for i, raw in enumerate(table.df["label"]):
        key = aliases.get(str(raw).strip().lower())
        if key is None:
            what = "empty label" if not str(raw).strip() else f"unknown label '{raw}'"
            raise InputError(f"{table.where(i, table.label_column)}: {what}; expected one of {prompts.class_names} "
                             f"(prompt file {prompts.source}; choose another with --prompts)")
        out.append(key)
    return out


def _reject_empty_classes(labels: pd.Series, prompts: PromptSet, table: SourceTable, skipped: int) -> None:
    present = set(labels)
    empty = [c for c in prompts.class_names if c not in present]
    if empty:
        after = f" after skipping {skipped} unreadable image(s)" if skipped else ""
        origin = table.source_file or table.root
        raise InputError(f"{origin}: class(es) {empty} of prompt file {prompts.source} have no images{after}; "
                         "every class needs images (use a prompt file listing only the classes you have)")


def index_dataset(source: str | os.PathLike, out: str | os.PathLike, fmt: str = "auto",
                  fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0,
                  strict: bool = False, overwrite: bool = False, *, prompts: str | os.PathLike | None = None,
                  metadata_csv: str | os.PathLike | None = None, workers: int | None = None,
                  group_near_duplicates: bool = False) -> Manifest:
    """Index `source` into the manifest `out` (+ `<stem>.meta.json`) and return it.

    `prompts` (a shipped dataset name or a YAML path) decides the class keys and their order; by default
    the layout's own (isic2019 for ISIC 2019, ham10000 otherwise). `group_near_duplicates` gives images
    within the near-duplicate pHash distance one lesion id (the smallest of theirs; the ids they had stay in
    `source_group_id`), so copies of one photo filed under several ids never straddle splits.
    """
    try:
        config = SplitConfig(tuple(fractions), seed)
    except ValueError as err:
        raise InputError(f"split: {err}") from err
    out = check_out_file(out, overwrite, what="manifest")
    if out.exists() and not meta_path_for(out).is_file():  # a labels.csv, someone's notes: not ours to replace
        raise OutputExistsError(f"--out {out} is not a manifest lesiongen wrote (no {meta_path_for(out).name} beside "
                                "it); --overwrite only replaces a manifest, so choose another --out")
    table = read_source(source, fmt, metadata_csv=metadata_csv)
    prompts = str(prompts or table.prompts)
    prompt_set = load_prompts(prompts)
    df = table.df.copy()
    raw_labels = df["label"].astype(str)
    df["label"] = normalise_labels(table, prompt_set)
    if table.format in ("labels", "imagefolder") and (raw_labels != df["label"]).any():
        df.insert(df.columns.get_loc("group_id") + 1, "source_label", raw_labels)
    df["group_id"] = df["group_id"].astype(str).str.strip()  # "L1 " and "L1" are one lesion, in one split
    own_group = df["group_id"] == ""
    df.loc[own_group, "group_id"] = df.loc[own_group, "image"]  # an image without a lesion id is its own lesion

    scan = scan_images([table.root / image for image in df["image"]], hashes=group_near_duplicates,
                       workers=workers)
    bad = [i for i, status in enumerate(scan.status) if status != OK]
    if bad and strict:
        i = bad[0]
        raise InputError(f"{table.where(i)}: image '{df.at[i, 'image']}' is {scan.status[i]} ({scan.errors[i]}); "
                         f"{len(bad)} image(s) unreadable in all (drop --strict to skip them)")
    skipped = [{"image": df.at[i, "image"], "error": scan.errors[i]} for i in bad]
    df = df.drop(index=bad).reset_index(drop=True)
    _reject_empty_classes(df["label"], prompt_set, table, len(bad))
    joined: list[list[str]] = []
    if group_near_duplicates:
        groups, joined = join_near_duplicate_groups(list(df["group_id"]), np.delete(scan.wide_phash, bad, axis=0),
                                                    DEFAULT_PHASH_THRESHOLD)
        if joined:
            df.insert(df.columns.get_loc("group_id") + 1, "source_group_id", df["group_id"])
            df["group_id"] = groups

    df.insert(2, "split", assign_splits(list(df["label"]), list(df["group_id"]), prompt_set.class_names, config))
    manifest = Manifest(df, table.root, prompt_set.class_names)
    write_manifest(manifest, out, dataset=table.dataset, format=table.format,
                   source=str(Path(table.source_file or table.root).resolve()), prompts=prompts,
                   fractions=dict(zip(SPLITS, config.fractions)),
                   seed=config.seed, split_unit="group_id", n_images=len(df),
                   n_groups=int(df["group_id"].nunique()), skipped_unreadable=skipped,
                   images_without_lesion_id=int(own_group.drop(index=bad).sum()),
                   **({"near_duplicates_joined": {"phash_bits": WIDE_PHASH_SIZE ** 2,
                                                  "threshold": DEFAULT_PHASH_THRESHOLD, "sets": joined}}
                      if group_near_duplicates else {}))
    return manifest
