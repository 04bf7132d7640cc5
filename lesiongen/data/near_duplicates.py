"""Near-duplicate images by perceptual hash: the pairs within a Hamming distance, and lesion ids joined by them.

A copy of one photo filed under two lesion ids (re-encoded, colour-shifted, listed twice in an archive) splits
as two lesions, so the same picture can train a model and test it. `data check` reports such pairs; `data index
--group-near-duplicates` joins their lesion ids so each copy lands in one split. On derm-dev the 256-bit pHash
within 24 bits finds two such pairs of different lesion ids (one train/test, one train/val), both copies of one
photo; nothing else of another lesion lies that close.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

# Of 256 bits: JPEG q=75 copies stay within 18, other derm-dev lesions lie >= 26 away (the calibration is in
# lesiongen.metrics.memorization, whose filters judge variants by the same hash and threshold).
DEFAULT_PHASH_THRESHOLD = 24
_PAIR_CHUNK = 1024


def near_duplicate_pairs(bits: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j of bool hash rows `bits` (N, B) with Hamming distance <= threshold, in chunks.

    With rows as +-1 vectors the distance is (B - dot) / 2: one matrix product per chunk, exact in float32."""
    signs = np.where(np.asarray(bits, dtype=bool), 1.0, -1.0).astype(np.float32)
    width = signs.shape[1] if signs.ndim == 2 else 0
    found_i, found_j, found_d = [], [], []
    for start in range(0, len(signs), _PAIR_CHUNK):
        block = signs[start:start + _PAIR_CHUNK]
        distances = np.rint((width - block @ signs[start:].T) / 2).astype(np.int64)
        rows, cols = np.nonzero(distances <= threshold)
        keep = cols > rows  # columns are offset by `start`, so this is j > i
        found_i.append(rows[keep] + start)
        found_j.append(cols[keep] + start)
        found_d.append(distances[rows[keep], cols[keep]])
    if not found_i:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, int)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d).astype(int)


def join_near_duplicate_groups(groups: Sequence[str], bits: np.ndarray,
                               threshold: int) -> tuple[list[str], list[list[str]]]:
    """Each image's group after joining every two groups that hold a near-duplicate pair (transitively).

    A joined set takes its smallest id, so the result depends only on the content, not on row order. Returns
    the new group of every image and the joined sets (sorted ids, each of two or more groups)."""
    first, second, _ = near_duplicate_pairs(bits, threshold)
    parent: dict[str, str] = {}

    def root(group: str) -> str:
        while parent.get(group, group) != group:
            group = parent[group]
        return group

    for a, b in zip(first.tolist(), second.tolist()):
        ra, rb = root(groups[a]), root(groups[b])
        if ra != rb:
            low, high = sorted((ra, rb))
            parent[high] = low
    members: dict[str, set[str]] = defaultdict(set)
    for group in set(groups):
        members[root(group)].add(group)
    joined = sorted(sorted(ids) for ids in members.values() if len(ids) > 1)
    return [root(group) for group in groups], joined
