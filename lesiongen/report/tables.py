"""The report's tables, built from the run summary (`RUN/metrics.json`) without recomputing anything.

One seed: each cell is the test value with its lesion-level bootstrap 95 % CI. Several seeds: the mean
± the standard deviation over seeds (the spread the seed changes), with the per-seed table beside it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from lesiongen.report.document import Table

HEADLINE_METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    # the test ROC's own best point (a curve summary, like AUROC) ...
    ("{positive}_sensitivity@specificity=0.90", "{positive} sensitivity @ 0.90 specificity (test ROC)"),
    # ... and the threshold validation chose for 0.90 specificity, applied unchanged: what a clinic would get
    ("{positive}_sensitivity@val_threshold(specificity=0.90)", "{positive} sensitivity at val's 0.90-spec. threshold"),
    ("{positive}_specificity@val_threshold(specificity=0.90)", "{positive} specificity there"),
    ("macro_auroc", "macro AUROC"),
)


def fmt(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_ci(value: float | None, ci: Iterable[float] | None, signed: bool = False) -> str:
    text = fmt(value, signed=signed)
    if ci and value is not None and all(v is not None for v in ci):
        low, high = ci
        text += f" [{fmt(low, signed=signed)}, {fmt(high, signed=signed)}]"
    return text


def fmt_spread(values: list[float | None], signed: bool = False) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "n/a"
    if len(finite) == 1:
        return fmt(finite[0], signed=signed)
    return f"{fmt(float(np.mean(finite)), signed=signed)} ± {float(np.std(finite, ddof=1)):.3f}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


@dataclass
class Results:
    """The summary's models, indexed by (arm, round)."""

    summary: dict

    @property
    def models(self) -> list[dict]:
        return [m for m in self.summary["models"] if m.get("test")]

    @property
    def positive(self) -> str | None:
        for model in self.models:
            return model["test"].get("positive_class")
        return None

    def metric_keys(self) -> list[tuple[str, str]]:
        positive = self.positive
        keys = []
        for key, title in HEADLINE_METRICS:
            if "{positive}" in key:
                if positive is None:
                    continue
                key, title = key.format(positive=positive), title.format(positive=positive)
            keys.append((key, title))
        return keys

    def groups(self) -> list[tuple[str, int, list[dict]]]:
        """(arm, round, models over seeds) in the summary's order."""
        out: dict[tuple[str, int], list[dict]] = {}
        for model in self.models:
            out.setdefault((model["arm"], model["round"]), []).append(model)
        return [(arm, r, models) for (arm, r), models in out.items()]

    @property
    def n_seeds(self) -> int:
        return len(self.summary["seeds"])


def headline_table(results: Results) -> Table:
    keys = results.metric_keys()
    several = results.n_seeds > 1
    header = ["arm", "round", "seeds", *[title for _, title in keys], "Δ balanced accuracy vs real"]
    rows = []
    for arm, r, models in results.groups():
        cells = [arm, str(r), str(len(models))]
        for key, _ in keys:
            values = [m["test"]["metrics"].get(key) for m in models]
            if several:
                cells.append(fmt_spread(values))
            else:
                cells.append(fmt_ci(values[0], models[0]["test"].get("ci95", {}).get(key)))
        cells.append(_difference_cell(models, "balanced_accuracy", several))
        rows.append(cells)
    how = ("mean ± standard deviation over seeds" if several
           else "value [95 % lesion-level bootstrap CI]")
    return Table(header, rows, caption=f"Test split, every arm after every round: {how}. Round 0 is the "
                                       "real-only classifier every arm starts from.")


def _difference_cell(models: list[dict], key: str, several: bool) -> str:
    comparisons = [m.get("compare_to_real") for m in models]
    if not any(comparisons):
        return "—"
    differences = [c["metrics"][key]["difference"] if c else None for c in comparisons]
    if several:
        return fmt_spread(differences, signed=True)
    c = comparisons[0]
    return fmt_ci(c["metrics"][key]["difference"], c["metrics"][key].get("ci95"), signed=True)


def per_seed_table(results: Results) -> Table:
    keys = results.metric_keys()
    header = ["arm", "round", "seed", *[title for _, title in keys]]
    rows = []
    for model in results.models:
        ci = model["test"].get("ci95", {})
        rows.append([model["arm"], str(model["round"]), str(model["seed"]),
                     *[fmt_ci(model["test"]["metrics"].get(key), ci.get(key)) for key, _ in keys]])
    return Table(header, rows, caption="Test split per seed: value [95 % lesion-level bootstrap CI].")


def paired_table(results: Results) -> Table:
    positive = results.positive
    keys = [("balanced_accuracy", "Δ balanced accuracy")]
    if positive:
        keys.append((f"{positive}_sensitivity@specificity=0.90", f"Δ {positive} sensitivity @ 0.90 spec."))
    header = ["arm", "round", "seed", *[t for _, t in keys], "McNemar p (only real right / only arm right)",
              "bootstrap P(arm not better), bal. acc."]
    rows = []
    for model in results.models:
        c = model.get("compare_to_real")
        if not c:
            continue
        m = c["mcnemar"]
        differences = [fmt_ci(c["metrics"][k]["difference"], c["metrics"][k].get("ci95"), signed=True)
                       for k, _ in keys]
        rows.append([model["arm"], str(model["round"]), str(model["seed"]), *differences,
                     f"{fmt_p(m['p_value'])} ({m['only_a_correct']} / {m['only_b_correct']})",
                     fmt(c["metrics"]["balanced_accuracy"].get("p_b_not_better"))])
    return Table(header, rows, caption="Paired comparison with the same seed's real-only classifier on the same "
                                       "test images: difference (arm - real) [95 % lesion-level bootstrap CI], "
                                       "exact McNemar test on the images only one of the two gets right.")


def per_class_table(results: Results, classes: list[str]) -> Table:
    """Sensitivity / specificity per class for the real model and every arm's last round (mean over seeds)."""
    last = max((r for _, r, _ in results.groups()), default=0)
    header = ["class", *[f"{arm} r{r} sens / spec" for arm, r, _ in results.groups() if r in (0, last)]]
    rows = []
    for c in classes:
        cells = [c]
        for _, r, models in results.groups():
            if r not in (0, last):
                continue
            sens = _mean([m["test"]["metrics"].get(f"sensitivity/{c}") for m in models])
            spec = _mean([m["test"]["metrics"].get(f"specificity/{c}") for m in models])
            cells.append(f"{fmt(sens)} / {fmt(spec)}")
        rows.append(cells)
    seeds = " (mean over seeds)" if results.n_seeds > 1 else ""
    return Table(header, rows, caption=f"Per-class sensitivity / specificity on the test split{seeds}.")


def ratio_table(results: Results, classes: list[str]) -> Table:
    """Synthetic images the trainer actually used per real training image, per class (after its cap)."""
    last = max((r for _, r, _ in results.groups()), default=0)
    groups = [(arm, r, models) for arm, r, models in results.groups() if arm != "real" and r == last]
    header = ["class", "real train images", *[f"{arm} r{r} synthetic (ratio)" for arm, r, _ in groups]]
    rows = []
    for c in classes:
        real = _first([m.get("real_train") or {} for m in results.models], c)
        cells = [c, str(real) if real is not None else "n/a"]
        for _, _, models in groups:
            used = _mean([(m.get("synthetic_used") or {}).get(c) for m in models])
            ratio = used / real if used is not None and real else None
            cells.append(f"{fmt(used, 1)} ({fmt(ratio, 2)})" if used is not None else "n/a")
        rows.append(cells)
    return Table(header, rows, caption="Synthetic images in the last round's training set per class (all rounds "
                                       "so far, after the trainer's per-class cap), and synthetic:real ratio.")


def selection_table(results: Results) -> Table | None:
    """What each model was selected on, and its best-epoch validation balanced accuracy on every image and on
    the lesions none of its synthetic images came from (mined hard cases keep their lesion id). None for runs
    made before this was recorded."""
    rows = []
    for arm, r, models in results.groups():
        chosen = [m.get("val_selection") or {} for m in models]
        if not any("rows" in c for c in chosen):
            continue
        every = _mean([(m.get("val_metrics") or {}).get("balanced_accuracy") for m in models])
        unseen = _mean([c.get("unseen_balanced_accuracy") for c in chosen])
        missing = sorted({name for c in chosen for name in c.get("classes_without_rows", [])})
        mean = {key: _mean([c.get(key) for c in chosen]) for key in ("rows", "source_lesions", "balanced_accuracy")}
        rows.append([f"{arm} r{r}", "/".join(sorted({c.get("rule", "?") for c in chosen})),
                     fmt(mean["rows"], 0), fmt(mean["source_lesions"], 0), fmt(mean["balanced_accuracy"]), fmt(every),
                     fmt(unseen) if unseen is not None else "= all", ", ".join(missing) or "none"])
    if not rows:
        return None
    return Table(["model", "selected on", "val images selecting it", "val lesions that synthetic images came from",
                  "val bal. acc. (selection)", "val bal. acc. (all val images)",
                  "val bal. acc. (lesions no synthetic image came from)", "classes with no selecting image"], rows,
                 caption="Model selection (means over seeds; `classifier.selection`). Mined hard cases are validation "
                         "images and their variants keep the lesion id, so with `all` the mined and classical arms "
                         "are selected partly on lesions they trained on; the last score leaves those out. Each arm "
                         "leaves out its own lesions, the hardest ones, so that column does not compare arms; "
                         "`reserved` selects every arm on the same never-mined lesions.")


def budget_gaps(results: Results, classes: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """The comparison arms' classes whose synthetic count in the last round differs from the mined arm's:
    {arm: {class: (its count, mined count)}}, means over seeds (as in `ratio_table`)."""
    last = max((r for _, r, _ in results.groups()), default=0)
    used = {arm: {c: _mean([(m.get("synthetic_used") or {}).get(c) for m in models]) or 0.0 for c in classes}
            for arm, r, models in results.groups() if arm != "real" and r == last}
    mined = used.get("mined")
    if mined is None:
        return {}
    gaps = {arm: {c: (counts[c], mined[c]) for c in classes if abs(counts[c] - mined[c]) >= 0.5}
            for arm, counts in used.items() if arm != "mined"}
    return {arm: found for arm, found in gaps.items() if found}


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _first(mappings: list[dict], key: str):
    for mapping in mappings:
        if key in mapping:
            return mapping[key]
    return None
