"""`data check`: is a manifest safe to train and evaluate on?

Errors (the data cannot be trusted as it is): missing files, unreadable or truncated images, a lesion
(`group_id`) in more than one split, pixel-identical images in different splits.
Warnings (look before you trust the numbers): a class absent from a split, pixel-identical images of
different lesions within a split, perceptual near-duplicates (256-bit pHash within the Hamming threshold,
the memorisation filters' hash and threshold) of different lesions, a lesion whose images carry different
labels.
Near-duplicates within one lesion are expected (several photos of it) and only counted.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from lesiongen.data.manifest import SPLITS, Manifest, load_manifest
from lesiongen.data.near_duplicates import DEFAULT_PHASH_THRESHOLD, near_duplicate_pairs
from lesiongen.data.scan import MISSING, UNREADABLE, WIDE_PHASH_SIZE, bits_hex, scan_images

PHASH_BITS = WIDE_PHASH_SIZE ** 2


def check_manifest(path: str | os.PathLike, *, phash_threshold: int = DEFAULT_PHASH_THRESHOLD,
                   workers: int | None = None) -> dict:
    """Check the manifest at `path` (its rows must load; see `load_manifest`) and return the report."""
    if phash_threshold < 0 or phash_threshold > PHASH_BITS:
        raise ValueError(f"phash_threshold must be in [0, {PHASH_BITS}], got {phash_threshold}")
    started = time.perf_counter()
    manifest = load_manifest(path)
    df = manifest.df
    scan = scan_images(manifest.image_paths(), hashes=True, workers=workers)
    decoded = time.perf_counter()
    errors: list[str] = []
    warnings: list[str] = []

    class_counts = _class_counts(manifest)
    for split in SPLITS:
        if sum(class_counts[split].values()) == 0:
            warnings.append(f"split '{split}' is empty")
            continue
        absent = [c for c, n in class_counts[split].items() if n == 0]
        if absent:
            warnings.append(f"split '{split}' has no images of class(es) {absent}")

    missing = [df.at[i, "image"] for i, s in enumerate(scan.status) if s == MISSING]
    unreadable = [{"image": df.at[i, "image"], "error": scan.errors[i]}
                  for i, s in enumerate(scan.status) if s == UNREADABLE]
    if missing:
        errors.append(f"{len(missing)} image file(s) missing under {manifest.root}, e.g. {missing[:3]}")
    if unreadable:
        examples = [u["image"] for u in unreadable[:3]]
        errors.append(f"{len(unreadable)} image(s) unreadable or truncated, e.g. {examples}")

    leakage = _lesion_leakage(df)
    if leakage:
        errors.append(f"{len(leakage)} lesion(s) (group_id) appear in more than one split, "
                      f"e.g. {[item['group_id'] for item in leakage[:3]]}")
    mixed = _mixed_label_groups(df)
    if mixed:
        warnings.append(f"{len(mixed)} lesion(s) carry more than one label, e.g. {mixed[:3]}")

    ok = np.flatnonzero(scan.ok)
    exact = _exact_duplicates(df, [scan.pixel_sha256[i] for i in ok], ok)
    exact_across = [d for d in exact if len(d["splits"]) > 1]
    exact_within = [d for d in exact if len(d["splits"]) == 1 and len(d["groups"]) > 1]
    if exact_across:
        errors.append(f"{len(exact_across)} set(s) of pixel-identical images span several splits, "
                      f"e.g. {exact_across[0]['images']}")
    if exact_within:
        warnings.append(f"{len(exact_within)} set(s) of pixel-identical images belong to different lesions "
                        f"within one split, e.g. {exact_within[0]['images']}")

    near = _near_duplicates(df, scan.wide_phash, scan.pixel_sha256, ok, phash_threshold)
    near_other = [p for p in near if not p["same_group"]]
    near_across = [p for p in near_other if p["split_a"] != p["split_b"]]
    if near_across:
        warnings.append(f"{len(near_across)} near-duplicate pair(s) of different lesions (pHash distance <= "
                        f"{phash_threshold} of {PHASH_BITS} bits) across splits, e.g. {near_across[0]['a']} ~ "
                        f"{near_across[0]['b']}: if they are one photo, `data index --group-near-duplicates` keeps "
                        "each such pair in one split")
    if len(near_other) > len(near_across):
        warnings.append(f"{len(near_other) - len(near_across)} near-duplicate pair(s) of different lesions "
                        f"within a split (pHash distance <= {phash_threshold} of {PHASH_BITS} bits)")

    return {
        "manifest": str(Path(path)),
        "root": str(manifest.root),
        "n_images": len(df),
        "n_groups": int(df["group_id"].nunique()),
        "classes": list(manifest.classes),
        "class_counts": class_counts,
        "missing_files": missing,
        "unreadable": unreadable,
        "lesion_leakage": leakage,
        "mixed_label_groups": mixed,
        "exact_duplicates": exact,
        "phash_bits": PHASH_BITS,
        "phash_threshold": phash_threshold,
        "near_duplicates": near,
        "near_duplicates_within_lesion": len(near) - len(near_other),
        "errors": errors,
        "warnings": warnings,
        "ok": not errors,
        "seconds": {"decode_and_hash": round(decoded - started, 3),
                    "total": round(time.perf_counter() - started, 3)},
    }


def _class_counts(manifest: Manifest) -> dict[str, dict[str, int]]:
    counts = manifest.df.groupby(["split", "label"]).size()
    return {split: {c: int(counts.get((split, c), 0)) for c in manifest.classes} for split in SPLITS}


def _lesion_leakage(df) -> list[dict]:
    per_group = df.groupby(["group_id", "split"]).size()
    splits_of: dict[str, dict[str, int]] = defaultdict(dict)
    for (group, split), n in per_group.items():
        splits_of[group][split] = int(n)
    return [{"group_id": g, "splits": s} for g, s in splits_of.items() if len(s) > 1]


def _mixed_label_groups(df) -> list[str]:
    labels_per_group = df.groupby("group_id")["label"].nunique()
    return list(labels_per_group[labels_per_group > 1].index)


def _exact_duplicates(df, digests: list[str], rows: np.ndarray) -> list[dict]:
    by_digest: dict[str, list[int]] = defaultdict(list)
    for digest, i in zip(digests, rows):
        by_digest[digest].append(int(i))
    out = []
    for digest, members in by_digest.items():
        if len(members) > 1:
            out.append({"pixel_sha256": digest,
                        "images": [df.at[i, "image"] for i in members],
                        "splits": sorted(set(df.loc[members, "split"])),
                        "groups": sorted(set(df.loc[members, "group_id"])),
                        "labels": sorted(set(df.loc[members, "label"]))})
    return out


def _near_duplicates(df, phash: np.ndarray, digests: list[str], rows: np.ndarray, threshold: int) -> list[dict]:
    """Pairs of pHash bit rows within the threshold, leaving out pairs already reported as pixel-identical."""
    first, second, distance = near_duplicate_pairs(phash[rows], threshold)
    pairs = []
    images, splits, groups = df["image"].to_numpy(), df["split"].to_numpy(), df["group_id"].to_numpy()
    for a, b, d in zip(rows[first], rows[second], distance):
        if digests[a] == digests[b]:
            continue
        pairs.append({"a": images[a], "b": images[b], "distance": int(d),
                      "phash_a": bits_hex(phash[a]), "phash_b": bits_hex(phash[b]),
                      "split_a": splits[a], "split_b": splits[b], "same_group": bool(groups[a] == groups[b])})
    return pairs


def format_report(report: dict, *, examples: int = 5) -> str:
    """A plain-text summary: class counts per split, then each error and warning with examples."""
    classes, counts = report["classes"], report["class_counts"]
    width = max(len("class"), *(len(c) for c in classes), len("total"))
    header = f"{'class':<{width}}" + "".join(f"{s:>8}" for s in SPLITS) + f"{'total':>8}"
    lines = [f"manifest {report['manifest']}: {report['n_images']} images, {report['n_groups']} lesions",
             "", header, "-" * len(header)]
    for c in classes:
        row = [counts[s][c] for s in SPLITS]
        lines.append(f"{c:<{width}}" + "".join(f"{n:>8}" for n in row) + f"{sum(row):>8}")
    totals = [sum(counts[s].values()) for s in SPLITS]
    lines += ["-" * len(header), f"{'total':<{width}}" + "".join(f"{n:>8}" for n in totals) + f"{sum(totals):>8}", ""]
    checks = [
        ("missing files", len(report["missing_files"]), True),
        ("unreadable / truncated images", len(report["unreadable"]), True),
        ("lesions in several splits", len(report["lesion_leakage"]), True),
        ("pixel-identical sets across splits", sum(len(d["splits"]) > 1 for d in report["exact_duplicates"]), True),
        ("pixel-identical sets, other lesions, same split",
         sum(len(d["splits"]) == 1 and len(d["groups"]) > 1 for d in report["exact_duplicates"]), False),
        (f"near-duplicate pairs of other lesions (pHash <= {report['phash_threshold']} of "
         f"{report['phash_bits']} bits)",
         sum(not p["same_group"] for p in report["near_duplicates"]), False),
        ("lesions with mixed labels", len(report["mixed_label_groups"]), False),
    ]
    for name, n, is_error in checks:
        verdict = "ok" if n == 0 else ("ERROR" if is_error else "warn")
        lines.append(f"  {verdict:<6}{name}: {n}")
    lines.append(f"  info  near-duplicate pairs within one lesion: {report['near_duplicates_within_lesion']}")
    for title, items in (("errors", report["errors"]), ("warnings", report["warnings"])):
        if items:
            lines += ["", f"{title}:"] + [f"  - {item}" for item in items[:examples]]
            if len(items) > examples:
                lines.append(f"  ... and {len(items) - examples} more")
    lines += ["", f"{'FAILED' if report['errors'] else 'PASSED'} in {report['seconds']['total']:.1f} s "
              f"({len(report['errors'])} error(s), {len(report['warnings'])} warning(s))"]
    return "\n".join(lines)
