"""The run's results in one file, `RUN/metrics.json`, gathered from the stage folders.

Every number in it is copied from a file a stage wrote (`eval-test/metrics.json`,
`compare-test/compare.json`, `train/classifier.json`, `train/eval-val/metrics.json`,
`quality/quality.json`); nothing is recomputed, so the report built from it matches those files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lesiongen.errors import InputError
from lesiongen.loop.config import ARM_DESCRIPTIONS, LoopConfig
from lesiongen.loop.layout import ModelKey, RunLayout
from lesiongen.loop.plan import models

SUMMARY_FILE = "metrics.json"
DEMO_STATEMENT = (
    "DEMONSTRATION ONLY: this run used the project's procedural toy data set and a tiny in-house diffusion "
    "base trained from scratch on toy images, on CPU, in minutes. Its numbers show that the pipeline runs "
    "end to end; they say nothing about dermoscopy or about Stable Diffusion.")


def _read_json(path: Path) -> dict | None:
    """A stage's JSON file (None when absent); a damaged one is an error naming it, not a traceback."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err}); restore the file, or delete its stage folder "
                         "(and its entry in state.json) and resume the run to make it again") from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def model_result(layout: RunLayout, key: ModelKey) -> dict[str, Any]:
    """Everything the report needs about one trained classifier (missing files give None entries)."""
    test = _read_json(layout.evaluation(key, "test") / "metrics.json")
    val = _read_json(layout.evaluation(key, "val") / "metrics.json")
    info = _read_json(layout.model(key) / "classifier.json") or {}
    compare = _read_json(layout.comparison(key)) if key.arm != "real" else None
    training = info.get("training", {})
    data = training.get("data", {})
    quality = _read_json(layout.path(key.stage("quality")) / "quality.json")
    return {
        "arm": key.arm, "round": key.round, "seed": key.seed,
        "test": test, "val_metrics": (val or {}).get("metrics"),
        # the score the model was selected on, and its score on the validation lesions no synthetic image came from
        "val_selection": {"balanced_accuracy": training.get("val_balanced_accuracy"),
                          "unseen_balanced_accuracy": training.get("val_unseen_balanced_accuracy"),
                          **training.get("selection", {})},
        "real_train": data.get("real"), "synthetic_used": data.get("synthetic_used"),
        "compare_to_real": compare, "quality": quality,
        "files": {
            "model": str(layout.model(key).relative_to(layout.root)),
            "test_metrics": str((layout.evaluation(key, "test") / "metrics.json").relative_to(layout.root)),
            "compare": str(layout.comparison(key).relative_to(layout.root)) if compare else None,
        },
    }


def collect(config: LoopConfig, layout: RunLayout) -> dict[str, Any]:
    from lesiongen.data.manifest import load_manifest

    manifest = load_manifest(layout.manifest)
    return {
        "name": config.name,
        "demo": config.demo,
        "demo_statement": DEMO_STATEMENT if config.demo else None,
        "leakage_warning": config.mining.leakage_warning,
        "mining_split": config.mining.split,
        "classes": list(manifest.classes),
        "split_sizes": {s: int(n) for s, n in manifest.df["split"].value_counts().items()},
        "arms": {arm: ARM_DESCRIPTIONS[arm] for arm in config.arms},
        "rounds": config.rounds,
        "seeds": list(config.seeds),
        "models": [model_result(layout, key) for seed in config.seeds for key in models(config, seed)],
    }


def write_summary(config: LoopConfig, layout: RunLayout) -> Path:
    from lesiongen.utils.atomic import write_json

    return write_json(layout.root / SUMMARY_FILE, collect(config, layout))
