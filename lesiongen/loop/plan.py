"""The ordered stages of a loop run, derived from its config alone (so a resumed run plans the same).

Per seed, round 0 trains and evaluates the real-only classifier. Each round r >= 1 then, for the mined
arm: mine the previous model's validation mistakes -> invert them -> make and filter variants
(-> class-prompted samples for rare classes) -> retrain on real + every synthetic set so far ->
evaluate on validation. The baselines follow in the same round with the same seed and the same
synthetic counts: classical augmentations of the same hard cases, and class-prompted images that were
not mined. The test split is evaluated only after all rounds, once per model, with paired comparisons
against the real-only model.
"""

from __future__ import annotations

from functools import partial

from lesiongen.loop import stages
from lesiongen.loop.config import LoopConfig
from lesiongen.loop.layout import ModelKey, RunLayout
from lesiongen.runs import Stage


def models(config: LoopConfig, seed: int) -> list[ModelKey]:
    """Every classifier a seed trains, in training order (real r0, then each round's arms)."""
    keys = [ModelKey("real", 0, seed)]
    for r in range(1, config.rounds + 1):
        keys += [ModelKey(arm, r, seed) for arm in ("mined", "classical", "random") if arm in config.arms]
    return keys


def previous(key: ModelKey) -> ModelKey:
    """The model whose mistakes this arm's round mines (the real model for round 1)."""
    return ModelKey("real", 0, key.seed) if key.round == 1 else ModelKey(key.arm, key.round - 1, key.seed)


def history(key: ModelKey) -> list[ModelKey]:
    """This arm's rounds up to and including `key`: their synthetic sets all train `key`'s model."""
    return [ModelKey(key.arm, r, key.seed) for r in range(1, key.round + 1)]


def build_plan(config: LoopConfig, layout: RunLayout) -> list[Stage]:
    ctx = stages.StageContext(config, layout)
    plan = [
        Stage(layout.DATA, "prepare the data set (manifest, lesion-aware split)", partial(stages.prepare_data, ctx)),
        Stage(layout.BASE, f"diffusion base: {config.base.description}",
              partial(stages.prepare_base, ctx), resumable=True),
        Stage(layout.FINETUNE, "adapt the base to the data (LoRA + class tokens)", partial(stages.finetune, ctx),
              distributed=True, resumable=True),
    ]
    for seed in config.seeds:
        for key in models(config, seed):
            plan += _round_stages(ctx, key)
    for seed in config.seeds:
        for key in models(config, seed):
            if config.mining.split != "test":  # else the round already evaluated it on test
                plan.append(_evaluation(ctx, key, "test"))
            if key.arm != "real":
                plan.append(Stage(key.stage("compare-test"), f"paired test: {key.label} vs real only",
                                  partial(stages.compare_to_real, ctx, key)))
    return plan


def _evaluation(ctx: stages.StageContext, key: ModelKey, split: str) -> Stage:
    return Stage(key.stage(f"eval-{split}"), f"evaluate {key.label} on the {split} split",
                 partial(stages.evaluate, ctx, key, split), distributed=True)


def _round_stages(ctx: stages.StageContext, key: ModelKey) -> list[Stage]:
    out: list[Stage] = []
    label = key.label
    if key.arm == "mined":
        out += [
            Stage(key.stage("mine"), f"mine hard cases of {previous(key).label} on {ctx.config.mining.split}",
                  partial(stages.mine, ctx, key)),
            Stage(key.stage("vary"), f"invert the hard cases, make and filter variants ({label})",
                  partial(stages.vary, ctx, key), distributed=True, resumable=True),
        ]
        if ctx.config.rare_classes:
            out.append(Stage(key.stage("prompted"), f"class-prompted samples of rare classes ({label})",
                             partial(stages.prompted_rare, ctx, key), distributed=True, resumable=True))
    elif key.arm == "classical":
        out.append(Stage(key.stage("augment"), f"classical augmentations of the same hard cases ({label})",
                         partial(stages.classical_augment, ctx, key)))
    elif key.arm == "random":
        out.append(Stage(key.stage("generate"), f"class-prompted samples, not mined, same counts ({label})",
                         partial(stages.random_synthetic, ctx, key), distributed=True, resumable=True))
    synthetic = "real only" if key.arm == "real" else "real + synthetic so far"
    out += [
        Stage(key.stage("train"), f"train the classifier on {synthetic} ({label})",
              partial(stages.train, ctx, key), distributed=True, resumable=True),
    ]
    if ctx.config.mining.split != "val":  # the trainer already evaluates its selected model on val
        out.append(_evaluation(ctx, key, ctx.config.mining.split))
    if key.arm in ("mined", "random") and ctx.config.quality is not None:
        out.append(Stage(key.stage("quality"), f"quality of the synthetic images ({label})",
                         partial(stages.synthetic_quality, ctx, key)))
    return out
