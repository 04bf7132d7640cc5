"""The loop's stage functions: thin calls into the library modules that do the work.

Each function fills the folder it is given (the stage's `.partial` folder; `lesiongen.runs` renames it
into place when the function returns) and returns a small summary for `state.json` and the progress
display. Distributed stages run on every process (the library shards the work and gathers); only the
main process writes files other than the library's own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from lesiongen.config import to_dict
from lesiongen.loop.config import LoopConfig
from lesiongen.loop.layout import MANIFEST_NAME, ModelKey, RunLayout
from lesiongen.utils.atomic import atomic_path, write_json

HARD_CASES = "hard_cases.csv"
BASE_RECORD = "base.json"
PRETRAINED_BASE = "pipeline"


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed per (run seed, round, arm, purpose): arms and rounds never share random streams."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def is_main_process() -> bool:
    from lesiongen.runs import current_processes

    return current_processes().is_main_process


@dataclass
class StageContext:
    config: LoopConfig
    layout: RunLayout
    _manifest: Any = field(default=None, repr=False)

    def real_manifest(self):
        from lesiongen.data.manifest import load_manifest

        if self._manifest is None:
            self._manifest = load_manifest(self.layout.manifest)
        return self._manifest

    def base_path(self) -> str:
        """The base checkpoint: a path recorded by the base stage (relative ones are inside that stage)."""
        location = json.loads(self.layout.base_record.read_text(encoding="utf-8"))["path"]
        path = self.layout.path(self.layout.BASE) / location
        return str(path) if path.exists() else location  # absolute paths (and hub ids) pass through

    def predictions_for_mining(self, key: ModelKey) -> Path:
        """`predictions.csv` of `key`'s model on the mining split."""
        return self.layout.evaluation(key, self.config.mining.split) / "predictions.csv"


# ----------------------------------------------------------------------------- shared stages


def prepare_data(ctx: StageContext, folder: Path) -> dict:
    """The real manifest of the run: the toy set made here, a data set indexed here, or a given manifest."""
    from lesiongen.data.index import index_dataset
    from lesiongen.data.manifest import load_manifest, write_manifest

    data = ctx.config.data
    out = folder / MANIFEST_NAME
    if data.manifest is not None:
        manifest = load_manifest(data.manifest)
        write_manifest(manifest, out, copied_from=str(Path(data.manifest).resolve()))
    else:
        source = data.source
        if data.toy is not None:
            from lesiongen.data.toy import make_toy_dataset

            source = folder / "toy"
            make_toy_dataset(source, n_per_class=data.toy.n_per_class, size=data.toy.size, seed=data.toy.seed)
        manifest = index_dataset(source, out, data.format, data.fractions, data.split_seed, prompts=data.prompts,
                                 group_near_duplicates=data.group_near_duplicates)
    counts = manifest.df.groupby("split").size().to_dict()
    return {"images": len(manifest), **{f"{split}_images": int(n) for split, n in counts.items()}}


def prepare_base(ctx: StageContext, folder: Path) -> dict:
    """Record a local base checkpoint (loaded once as a check, hashed), or pretrain the in-house base on
    the run's training split; `base.json` says where the base is and its content hash."""
    from lesiongen.diffusion.fingerprint import pipeline_hash

    base = ctx.config.base
    if base.pretrain is not None:
        pretrain_base(ctx, folder / PRETRAINED_BASE)
        location, where = PRETRAINED_BASE, folder / PRETRAINED_BASE  # relative: the run folder may move
    else:
        from lesiongen.diffusion.loading import load_pipeline
        from lesiongen.loop.config import asset_path

        location = where = base.path or str(asset_path(base.asset))
        if is_main_process():
            load_pipeline(where, allow_pickle=base.allow_pickle)  # fails here, with its message, not mid-run
    if not is_main_process():
        return {}
    digest = pipeline_hash(where)
    write_json(folder / BASE_RECORD, {"path": str(location), "hash": digest,
                                      "pretrained_in_run": base.pretrain is not None})
    return {"hash": digest[:12], "pretrained": base.pretrain is not None}


def pretrain_base(ctx: StageContext, out: Path) -> Path:
    """`lesiongen base pretrain` on the run's train split (resumes its checkpoints after a kill)."""
    from lesiongen.diffusion.pretrain.checkpoints import checkpoints_in
    from lesiongen.diffusion.pretrain.run import pretrain_base as pretrain

    config = replace(ctx.config.base.pretrain, prompts=ctx.config.data.prompts)
    pretrain(ctx.layout.manifest, out, config=config, resume="latest")
    for checkpoint in checkpoints_in(out):  # a finished stage is never resumed
        shutil.rmtree(checkpoint, ignore_errors=True)
    return out


def finetune(ctx: StageContext, folder: Path) -> dict:
    """Adapt the base to the run's training split (`lesiongen finetune`), resuming its checkpoints."""
    from lesiongen.diffusion.finetune.run import run_finetune
    from lesiongen.utils.checkpoints import list_checkpoints

    config = replace(ctx.config.finetune, base=ctx.base_path(), manifest=str(ctx.layout.manifest),
                     out=str(folder / ctx.layout.adapter.name), prompts=ctx.config.data.prompts)
    run_finetune(config, resume="latest")
    if is_main_process():  # a finished stage is never resumed: its checkpoints are dead weight
        for checkpoint in list_checkpoints(config.out):
            shutil.rmtree(checkpoint, ignore_errors=True)
    return {"method": config.method, "steps": config.steps}


# ----------------------------------------------------------------------------- classifier stages


def train(ctx: StageContext, key: ModelKey, folder: Path) -> dict:
    """Train `key`'s classifier on the real train split plus every synthetic set of its arm so far."""
    from lesiongen.classifier.train import train_classifier
    from lesiongen.loop.plan import history
    from lesiongen.utils.checkpoints import list_checkpoints

    synthetic = [str(p) for k in history(key) for p in ctx.layout.synthetic_manifests(k)] if key.arm != "real" else []
    config = replace(ctx.config.classifier, manifest=str(ctx.layout.manifest), synthetic=synthetic, seed=key.seed)
    result = train_classifier(config, folder, resume="latest", overwrite=True)
    if is_main_process():  # a finished stage is never resumed: its checkpoints are dead weight
        for checkpoint in list_checkpoints(folder):
            shutil.rmtree(checkpoint, ignore_errors=True)
    return {"val_balanced_accuracy": result.best_val_balanced_accuracy, "best_epoch": result.best_epoch,
            "synthetic_manifests": len(synthetic)}


def evaluate(ctx: StageContext, key: ModelKey, split: str, folder: Path) -> dict:
    """`lesiongen evaluate` of `key`'s model on one split, with lesion-level bootstrap intervals."""
    from lesiongen.classifier.evaluate import BootstrapSettings, evaluate_model, write_evaluation

    evaluation = evaluate_model(ctx.layout.model(key), ctx.layout.manifest, split,
                                batch_size=ctx.config.evaluate.batch_size)
    from lesiongen.runs import current_processes
    from lesiongen.utils.distributed import together

    with together(current_processes()):  # a failure to write the evaluation stops every process
        if not is_main_process():
            return {}
        report = write_evaluation(evaluation, folder, BootstrapSettings(ctx.config.evaluate.bootstrap),
                                  overwrite=True)
    metrics = report["metrics"]
    return {"balanced_accuracy": metrics["balanced_accuracy"], "accuracy": metrics["accuracy"]}


def compare_to_real(ctx: StageContext, key: ModelKey, folder: Path) -> dict:
    """Paired comparison on the test split: this model (B) against the same seed's real-only model (A)."""
    from lesiongen.classifier.evaluate import BootstrapSettings, compare_evaluations, read_evaluation

    real = read_evaluation(ctx.layout.evaluation(ModelKey("real", 0, key.seed), "test"))
    this = read_evaluation(ctx.layout.evaluation(key, "test"))
    result = compare_evaluations(real, this, BootstrapSettings(ctx.config.evaluate.bootstrap))
    write_json(folder / "compare.json", result)
    difference = result["metrics"]["balanced_accuracy"]["difference"]
    return {"balanced_accuracy_difference": difference, "mcnemar_p": result["mcnemar"]["p_value"]}


# ----------------------------------------------------------------------------- synthetic stages


def mine(ctx: StageContext, key: ModelKey, folder: Path) -> dict:
    """Hard cases of the previous model on the mining split (an empty list when there are none)."""
    from lesiongen.loop.plan import previous
    from lesiongen.synthesis.mining import NoHardCasesError, load_predictions, mine_hard_cases

    manifest = ctx.real_manifest()
    predictions = load_predictions(ctx.predictions_for_mining(previous(key)), ctx.layout.manifest,
                                   split=ctx.config.mining.split, classes=manifest.classes)
    try:
        result = mine_hard_cases(predictions, ctx.config.mining)
        cases, stats = result.cases, result.stats
    except NoHardCasesError as err:  # a classifier with nothing left to mine: the round adds no images
        cases = pd.DataFrame(columns=["rank", "image", "label", "split", "group_id"])
        stats = {"mined": 0, "note": str(err)}
    with atomic_path(folder / HARD_CASES) as tmp:
        cases.to_csv(tmp, index=False)
    write_json(folder / "mining.json", {**stats, "leakage_warning": ctx.config.mining.leakage_warning})
    return {"mined": int(stats.get("mined", len(cases)))}


def vary(ctx: StageContext, key: ModelKey, folder: Path) -> dict:
    """`mine-and-generate` on the previous model's predictions: invert every hard case, make variants,
    filter them (the previous model judges the label), keep the survivors with their provenance."""
    from lesiongen.config import from_dict
    from lesiongen.loop.plan import previous
    from lesiongen.synthesis.pipeline import SynthesisConfig, run_mine_and_generate

    mined = json.loads((ctx.layout.path(key.stage("mine")) / "mining.json").read_text(encoding="utf-8"))
    if not mined.get("mined"):
        return {"kept": 0, "note": "no hard cases"}
    judge = previous(key)
    config = from_dict(SynthesisConfig, {
        **ctx.config.synthesis, "predictions": str(ctx.predictions_for_mining(judge)),
        "manifest": str(ctx.layout.manifest), "base": ctx.base_path(), "adapter": str(ctx.layout.adapter),
        "classifier": str(ctx.layout.model(judge)), "out": str(folder), "prompts": ctx.config.data.prompts,
        "seed": derive_seed(key.seed, key.round, "mined"), "mining": to_dict(ctx.config.mining),
        "allow_pickle": ctx.config.base.allow_pickle}, where="synthesis")
    summary = run_mine_and_generate(config)
    return {"sources": summary.get("sources"), "variants": summary.get("variants"), "kept": summary.get("kept")}


def prompted_rare(ctx: StageContext, key: ModelKey, folder: Path) -> dict:
    """Class-prompted samples of the configured rare classes, added to the mined arm's round."""
    from lesiongen.loop.plan import previous
    from lesiongen.loop.prompted import make_prompted_set

    return make_prompted_set(ctx, dict(ctx.config.rare_classes), folder, ctx.layout.model(previous(key)),
                             seed=derive_seed(key.seed, key.round, "rare"))


def random_synthetic(ctx: StageContext, key: ModelKey, folder: Path) -> dict:
    """Class-prompted samples that were not mined, with the per-class counts the mined arm added."""
    from lesiongen.data.manifest import load_manifest
    from lesiongen.loop.plan import previous
    from lesiongen.loop.prompted import make_prompted_set

    counts: dict[str, int] = {}
    for path in ctx.layout.synthetic_manifests(ModelKey("mined", key.round, key.seed)):
        for label, n in load_manifest(path).df["label"].value_counts().items():
            counts[label] = counts.get(label, 0) + int(n)
    return make_prompted_set(ctx, counts, folder, ctx.layout.model(previous(key)),
                             seed=derive_seed(key.seed, key.round, "random"))


def classical_augment(ctx: StageContext, key: ModelKey, folder: Path) -> dict:
    """Classical copies of the mined arm's hard cases of this round, matching its per-source counts."""
    from lesiongen.data.manifest import load_manifest
    from lesiongen.loop.classical import make_classical_set, matched_sources

    real = ctx.real_manifest()
    mined = [load_manifest(p) for p in ctx.layout.synthetic_manifests(ModelKey("mined", key.round, key.seed))]
    plan = matched_sources(mined, real, derive_seed(key.seed, key.round, "classical", "sources"))
    manifest = make_classical_set(plan, real, ctx.config.classical, derive_seed(key.seed, key.round, "classical"),
                                  folder)
    return {"images": len(manifest)}


def synthetic_quality(ctx: StageContext, key: ModelKey, folder: Path) -> dict:
    """Quality of the images this arm added in this round against the real training images, in the
    feature space of the same seed's real-only classifier (its class fidelity included)."""
    from lesiongen.data.manifest import concat_manifests, load_manifest
    from lesiongen.metrics.quality import evaluate_synthetic

    added = [load_manifest(p) for p in ctx.layout.synthetic_manifests(key)]
    if not added:
        write_json(folder / "quality.json", {"note": "no synthetic images were added in this round"})
        return {"images": 0}
    synthetic = concat_manifests(added, folder)
    report = evaluate_synthetic(ctx.real_manifest(), synthetic, ctx.layout.model(ModelKey("real", 0, key.seed)),
                                config=ctx.config.quality, out_dir=folder, overwrite=True)
    fidelity = (report.get("class_fidelity") or {}).get("synthetic") or {}
    flagged = (report.get("memorization") or {}).get("n_flagged")
    return {"images": len(synthetic), "class_fidelity": fidelity.get("overall"), "near_copies": flagged}
