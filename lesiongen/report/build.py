"""Assemble the report of a loop run from its summary and stage folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from lesiongen.data.manifest import load_manifest
from lesiongen.errors import InputError
from lesiongen.loop.config import LoopConfig, load_resolved
from lesiongen.loop.layout import ModelKey, RunLayout
from lesiongen.loop.summary import SUMMARY_FILE, collect
from lesiongen.report import figures, gallery, tables
from lesiongen.report.document import Callout, Document, Figure, Heading, Paragraph, Table
from lesiongen.runs import CONFIG_FILE, STATE_FILE

# What `collect` always writes and the report reads without a default.
_SUMMARY_KEYS = {"name", "classes", "arms", "rounds", "seeds", "mining_split", "models"}


def load_summary(run_dir: Path, config: LoopConfig) -> dict:
    """The run's metrics.json; a run still in progress is summarised from what has finished so far, and so is
    a run whose metrics.json cannot be read (it is a copy of the stage folders' numbers)."""
    path = run_dir / SUMMARY_FILE
    if path.is_file():
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(summary, dict) and _SUMMARY_KEYS <= set(summary):
                return summary
            problem = "not a run summary"
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            problem = f"not valid JSON: {err}"
        print(f"WARNING: {path} is unreadable ({problem}); reporting from the stage folders instead "
              f"(delete it and `lesiongen loop --resume {run_dir}` writes it again)", file=sys.stderr)
    return collect(config, RunLayout(run_dir))


# Folders of other commands that `report` may be pointed at by mistake: a file that marks each.
_OTHER_FOLDERS = (("classifier.json", "a classifier folder from `lesiongen train-classifier`"),
                  ("adapter.json", "an adapter folder from `lesiongen finetune`"),
                  ("model_index.json", "a base model folder"),
                  ("metrics.json", "an evaluation folder from `lesiongen evaluate`"))


def build_document(run_dir: str | Path) -> Document:
    run_dir = Path(run_dir)
    missing = [name for name in (CONFIG_FILE, STATE_FILE) if not (run_dir / name).is_file()]
    if missing:  # e.g. a classifier or fine-tuning folder, which has a config.yaml of its own
        hint = next((f"; it looks like {what}" for marker, what in _OTHER_FOLDERS if (run_dir / marker).is_file()), "")
        raise InputError(f"{run_dir} is not a loop run folder (no {' or '.join(missing)}; expected the folder "
                         f"`lesiongen loop` writes){hint}")
    config = load_resolved(run_dir / CONFIG_FILE)
    layout = RunLayout(run_dir)
    if not layout.manifest.is_file():
        raise InputError(f"{run_dir}: the run has not finished its data stage, so there is nothing to report yet; "
                         f"continue it with `lesiongen loop --resume {run_dir}`")
    summary = load_summary(run_dir, config)
    results = tables.Results(summary)
    classes = summary["classes"]
    real = load_manifest(layout.manifest)

    doc = Document(f"lesiongen report: {summary['name']}")
    if summary.get("leakage_warning"):
        doc.add(Callout(summary["leakage_warning"], "warning"))
    if summary.get("demo_statement"):
        doc.add(Callout(summary["demo_statement"], "warning"))
    if not results.models:
        doc.add(Callout("No classifier of this run has been evaluated on the test split yet; "
                        "resume the run to finish it.", "warning"))
    doc.add(*_overview(summary, config, tables.budget_gaps(results, classes)))

    doc.add(Heading("Before and after"), tables.headline_table(results))
    if results.n_seeds > 1:
        doc.add(tables.per_seed_table(results))
    paired = tables.paired_table(results)
    if paired.rows:
        doc.add(Heading("Paired tests against the real-only classifier", 3), paired)
    doc.add(Heading("Per class", 3), tables.per_class_table(results, classes))

    doc.add(Heading("Rounds"), *_curves(results, config.classifier.selection))
    selection = tables.selection_table(results)
    if selection is not None:
        doc.add(Heading("Model selection", 3), selection)
    confusion = _confusion(results, classes)
    if confusion is not None:
        doc.add(Heading("Confusion matrices"), confusion)

    doc.add(Heading("Synthetic data"), tables.ratio_table(results, classes))
    doc.add(*_pictures(layout, config, real))
    quality = _quality_table(results)
    if quality is not None:
        doc.add(Heading("Generation quality", 3), quality)
    return doc


def _overview(summary: dict, config: LoopConfig, gaps: dict[str, dict[str, tuple[float, float]]]) -> list:
    sizes = summary.get("split_sizes", {})
    base = config.base.description
    if config.classifier.epoch_length == "real":
        steps_line = ("Every arm trains for the same number of epochs of as many draws as there are real training "
                      "images (`epoch_length: real`), so all arms take the same optimizer steps and synthetic images "
                      "replace real draws")
    else:
        steps_line = ("Every arm trains for the same number of epochs, so an arm with synthetic images also takes "
                      "more optimizer steps than the real-only classifier (`epoch_length: all`)")
    lines = [
        f"Data: {sum(sizes.values())} real images (train {sizes.get('train', 0)}, val {sizes.get('val', 0)}, "
        f"test {sizes.get('test', 0)}), {len(summary['classes'])} classes; lesion-aware split.",
        f"Diffusion base: {base}; adaptation: {config.finetune.method}, "
        f"{config.finetune.steps} steps at {config.finetune.resolution or 'native'} px.",
        f"Classifier: {config.classifier.arch} ({config.classifier.pretrained} init), {config.classifier.img_size} px, "
        f"{config.classifier.epochs} epochs, chosen on validation balanced accuracy"
        + (" over the validation lesions that none of its synthetic training images were made from "
           "(`selection: unseen`)." if config.classifier.selection == "unseen" else
           f" over the selection reserve: {config.classifier.selection_reserve:g} of the validation lesions per "
           "class, never mined, the same images for every arm (`selection: reserved`)."
           if config.classifier.selection == "reserved" else
           " over every validation row (`selection: all`), including the mined hard cases whose variants the "
           "mined and classical arms train on; the model-selection table gives the score without them."),
        f"{summary['rounds']} round(s), seeds {summary['seeds']}; hard cases mined on the "
        f"{summary['mining_split']} split; " + (
            "the test split was used only for the numbers below." if summary["mining_split"] != "test" else
            "the test split was mined, so the numbers below are NOT held out (see the warning above)."),
        steps_line
        + "; the classical and random arms are given as many "
        "images per class as the mined arm, so comparing the arms with each other isolates the generator "
        "(mined vs classical) and the mining (mined vs random)" + ("." if not gaps else ", except where noted:"),
    ]
    for arm, found in gaps.items():
        shown = ", ".join(f"{c} {tables.fmt(have, 1)} vs {tables.fmt(want, 1)}" for c, (have, want) in found.items())
        why = (" The filters the variants pass rejected most of its class-prompted images of these classes "
               "(how many were drawn: `generate/stage.json` of each random round)." if arm == "random" else "")
        lines.append(f"The {arm} arm did not get the mined arm's counts ({shown} images; means over seeds).{why} "
                     f"Its comparison with the mined arm mixes the effect of the method with that of set size.")
    arms = Table(["arm", "training data"], [[arm, text] for arm, text in summary["arms"].items()])
    return [Heading("Run"), *[Paragraph(line) for line in lines], arms]


def _curves(results: tables.Results, rule: str) -> list:
    out = []
    last = max((r for _, r, _ in results.groups()), default=0)
    for key, title in results.metric_keys()[1:3]:
        series: dict[str, list[tuple[int, float, float, float]]] = {}
        for arm, r, models in results.groups():
            values = np.array([m["test"]["metrics"].get(key) for m in models], dtype=float)
            point = _band(values, models[0]["test"].get("ci95", {}).get(key) if len(models) == 1 else None)
            rounds = range(0, last + 1) if arm == "real" else [r]  # the real-only model is every round's reference
            for round_ in rounds:
                series.setdefault(arm, []).append((round_, *point))
        for arm in [a for a in series if a != "real"]:  # every arm starts from the real model at round 0
            series[arm].append((0, *series["real"][0][1:]))
        out.append(Figure(f"curve-{key.replace('@', '-at-').replace('=', '')}", figures.round_curves(series, title),
                          f"Test {title} per round (band: 95 % CI with one seed, ± 1 sd over seeds)."))
    val_series: dict[str, list[tuple[int, float, float, float]]] = {}
    for arm, r, models in results.groups():
        values = np.array([_selection_score(m) for m in models], dtype=float)
        val_series.setdefault(arm, []).append((r, *_band(values, None)))
    out.append(Figure("curve-val-balanced-accuracy", figures.round_curves(val_series, "validation balanced accuracy"),
                      "Validation balanced accuracy each round's model was selected on (its best epoch; which rows: "
                      "the model-selection table). Selected on, so not held out"
                      + (", though no arm trained on variants of these never-mined images (`selection: reserved`)"
                         if rule == "reserved" else
                         ", and the mined and classical arms train on variants of some of these images")
                      + ": the test curves above compare arms."))
    return out


def _selection_score(model: dict) -> float:
    """Runs made before the selection rule recorded their score on every validation row."""
    score = (model.get("val_selection") or {}).get("balanced_accuracy")
    if score is None:
        score = (model.get("val_metrics") or {}).get("balanced_accuracy")
    return np.nan if score is None else float(score)


def _band(values: np.ndarray, ci) -> tuple[float, float, float]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return (np.nan, np.nan, np.nan)
    mean = float(finite.mean())
    if ci and all(v is not None for v in ci):
        return mean, float(ci[0]), float(ci[1])
    spread = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return mean, mean - spread, mean + spread


def _confusion(results: tables.Results, classes: list[str]) -> Figure | None:
    last = max((r for _, r, _ in results.groups()), default=0)
    matrices = {}
    for arm, r, models in results.groups():
        if r in (0, last):
            counts = [np.asarray(m["test"]["confusion_matrix"]["counts"]) for m in models]
            matrices[f"{arm} r{r}"] = np.sum(counts, axis=0)
    if not matrices:
        return None
    seeds = ", counts summed over seeds" if results.n_seeds > 1 else ""
    return Figure("confusion", figures.confusion_matrices(matrices, classes),
                  f"Test confusion matrices (rows: true class, colour: row share{seeds}).")


def _pictures(layout: RunLayout, config: LoopConfig, real) -> list:
    out = []
    seed = config.seeds[0]
    for r in range(1, config.rounds + 1):
        png = gallery.hard_case_gallery(layout, ModelKey("mined", r, seed), real)
        if png is not None:
            out += [Heading(f"Hard cases of round {r}", 3),
                    Figure(f"hard-cases-r{r}", png, f"Round {r}, seed {seed}: the hardest mined cases (true → "
                                                     "predicted class), their DDIM reconstruction (inverted as deep "
                                                     "as the run's inversion depth, then sampled back), and the "
                                                     "variants that passed the filters.")]
    for arm in config.arms:
        if arm == "real":
            continue
        png = gallery.class_sample_grid(layout, ModelKey(arm, config.rounds, seed), real)
        if png is not None:
            out += [Figure(f"samples-{arm}", png, f"Synthetic images of the {arm} arm (round {config.rounds}, seed "
                                                  f"{seed}) per class, beside a real training image.")]
    return out


def _quality_table(results: tables.Results) -> Table | None:
    """One row per synthetic set: distances, manifold estimates, class fidelity, memorisation flags."""
    from lesiongen.metrics.frechet_unbiased import min_images

    fmt = tables.fmt
    rows, notes = [], []
    for model in results.summary["models"]:
        quality = model.get("quality")
        if not quality or "overall" not in quality:
            continue
        overall, fidelity = quality["overall"], quality.get("class_fidelity", {})
        inception, domain = overall.get("inception") or {}, overall.get("domain") or {}
        prdc = domain.get("prdc") or (inception.get("prdc") or {})
        memorization = quality.get("memorization") or {}
        rows.append([model["arm"], str(model["round"]), str(model["seed"]),
                     str(quality.get("images", {}).get("synthetic", {}).get("n_images", "n/a")),
                     fmt(inception.get("fid"), 2), fmt(domain.get("fid"), 2), fmt(domain.get("fd_inf"), 2),
                     fmt(domain.get("kid_mean"), 4),
                     " / ".join(fmt(prdc.get(k), 2) for k in ("precision", "recall", "density", "coverage")),
                     f"{fmt((fidelity.get('synthetic') or {}).get('overall'), 2)} / "
                     f"{fmt((fidelity.get('real_reference') or {}).get('overall'), 2)}",
                     f"{memorization.get('n_flagged', 'n/a')}"])
        notes += [w for w in quality.get("warnings", []) if w not in notes]
    if not rows:
        return None
    caption = ("Synthetic images added in each round against the real training images. FID: standard "
               "Inception features (comparable only at equal image count and resolution); domain: the same "
               "seed's real-only classifier's features; FD∞: the domain Fréchet distance corrected for its "
               f"small-sample bias (near 0 for two samples of the same data; needs >= {min_images()} images per "
               "set at the default 64 directions). Class fidelity: share the real-only classifier assigns "
               "to the intended class, synthetic / real reference. Details: quality/quality.json.")
    if notes:
        caption += " Notes: " + " ".join(notes[:3])
    return Table(["arm", "round", "seed", "images", "FID (Inception)", "FD (domain)", "FD∞ (domain)", "KID (domain)",
                  "precision / recall / density / coverage", "class fidelity", "near-copies flagged"], rows,
                 caption=caption)
