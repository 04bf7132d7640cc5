"""Classifier quality on derm-dev: the shipped recipe beside the ANCHORS.md quick baseline, in one run.

Both are trained by `lesiongen.classifier.train` on the same lesion-disjoint 70/15/15 split (seed 0),
selected on validation balanced accuracy, then scored on the test split with lesion-level bootstrap
intervals and compared pairwise (B = recipe minus A = baseline, McNemar's test).

- baseline: our re-creation of the ANCHORS.md recipe (tf_efficientnet_lite0 ImageNet, 128 -> 224 px,
  20 epochs, flips / rot90 / brightness, square-root class weights in the loss, label smoothing 0.1,
  one-cycle AdamW, no test-time augmentation). ANCHORS.md reports 0.684 test balanced accuracy.
- recipe: configs/derm-dev-classifier.yaml (the TrainConfig defaults).

    python bench/classifier_quality.py                 # needs a GPU: two trainings of 20-30 epochs
    python bench/classifier_quality.py --smoke         # toy data, tiny model, 1 epoch, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DERM_DEV = ROOT / ".." / "shared" / "data" / "derm-dev"

BASELINE = {  # differences from the recipe file
    "epochs": 20, "tta": "none", "sampler_balance": 0.0, "loss_balance": 0.5, "drop_rate": 0.2,
    "drop_path_rate": 0.0, "early_stopping_patience": None,
    "augment": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "dihedral": True, "brightness": 0.2, "contrast": 0.0,
                "saturation": 0.0, "hue": 0.0, "jitter_prob": 1.0},
}
SMOKE = {"arch": "test_efficientnet", "pretrained": "none", "img_size": 32, "load_size": 32, "epochs": 1,
         "batch_size": 16, "mixed_precision": "no"}
HEADLINE = ("balanced_accuracy", "accuracy", "macro_auroc", "sensitivity/mel", "specificity/mel",
            "mel_sensitivity@specificity=0.90", "mel_specificity@sensitivity=0.90")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DERM_DEV)
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "bench-classifier-quality")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--only", choices=["baseline", "recipe"], default=None, help="train one of the two")
    parser.add_argument("--smoke", action="store_true")
    return parser.parse_args()


def main() -> None:
    from lesiongen.classifier.config import TrainConfig
    from lesiongen.classifier.evaluate import (
        BootstrapSettings,
        compare_evaluations,
        evaluate_model,
        read_evaluation,
        write_evaluation,
    )
    from lesiongen.classifier.train import train_classifier
    from lesiongen.config import from_dict, load_yaml
    from lesiongen.data.index import index_dataset
    from lesiongen.data.toy import make_toy_dataset
    from lesiongen.utils.atomic import write_json

    args = parse_args()
    out = args.out / ("smoke" if args.smoke else "derm-dev")
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    if not manifest.is_file():
        data = (make_toy_dataset(out / "toy", n_per_class=16, size=64, seed=0, overwrite=True) if args.smoke
                else args.data)
        index_dataset(data, out=manifest, seed=0)
    recipe = load_yaml(ROOT / "configs" / "derm-dev-classifier.yaml")
    recipes = {"baseline": {**recipe, **BASELINE}, "recipe": recipe}  # plain update: None values count here
    if args.smoke:
        recipes = {name: {**values, **SMOKE} for name, values in recipes.items()}
    settings = BootstrapSettings(n_resamples=args.bootstrap)
    for name, values in recipes.items():
        if args.only not in (None, name):
            continue
        config = from_dict(TrainConfig, {**values, "manifest": str(manifest)}, where=name)
        start = time.perf_counter()
        result = train_classifier(config, out / name, resume="latest", overwrite=True)
        if not result.is_main_process:
            return
        evaluation = evaluate_model(out / name, manifest, "test")
        write_evaluation(evaluation, out / name / "eval-test", settings, overwrite=True)
        print(f"{name}: best epoch {result.best_epoch}, val balanced accuracy {result.best_val_balanced_accuracy:.4f}, "
              f"{time.perf_counter() - start:.0f} s")
    if args.only:
        return
    a, b = read_evaluation(out / "baseline" / "eval-test"), read_evaluation(out / "recipe" / "eval-test")
    comparison = compare_evaluations(a, b, settings)
    write_json(out / "comparison.json", comparison)
    print(f"\ntest split: {comparison['n_images']} images, {comparison['n_lesions']} lesions; "
          f"95 % CIs from {args.bootstrap} lesion-level bootstrap resamples\n")
    print("| metric | baseline (A) | recipe (B) | B - A [95 % CI] |")
    print("| --- | --- | --- | --- |")
    reports = {n: json.loads((out / n / "eval-test" / "metrics.json").read_text()) for n in recipes}
    for metric in HEADLINE:
        cells = []
        for n in recipes:
            value, interval = reports[n]["metrics"][metric], reports[n]["ci95"].get(metric)
            cells.append(f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else f"{value:.3f}")
        row = comparison["metrics"][metric]
        ci = row["ci95"]
        cells.append(f"{row['difference']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else f"{row['difference']:+.3f}")
        print(f"| {metric} | " + " | ".join(cells) + " |")
    mc = comparison["mcnemar"]
    print(f"\nMcNemar (accuracy): only baseline right {mc['only_a_correct']}, only recipe right "
          f"{mc['only_b_correct']}, p = {mc['p_value']:.3g}")


if __name__ == "__main__":
    main()
