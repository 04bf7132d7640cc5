"""Commands of the 'classifier' group: `train-classifier` and `evaluate` (also `evaluate --compare A B`).

Only typer and the standard library are imported here; torch, timm and accelerate load inside
the commands so `lesiongen --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from lesiongen.errors import InputError, OutputExistsError

DEFAULT_TRAIN_OUT = Path("checkpoints/classifier")
DEFAULT_EVAL_ROOT = Path("checkpoints/evaluate")
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
Split = Literal["train", "val", "test"]
TTA = Literal["none", "flip", "dihedral"]
Selection = Literal["all", "unseen", "reserved"]
RESUME_MAY_CHANGE = {"cache_dir"}  # where decoded images are cached does not change the run


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("train-classifier")(train_classifier)
    app.command("evaluate")(evaluate)


def train_classifier(
    manifest: Annotated[Optional[Path], typer.Option(
        help="Real manifest: its train split trains, its val split selects the model.")] = None,
    synthetic: Annotated[Optional[list[Path]], typer.Option(
        help="Synthetic manifest mixed into training (repeatable).")] = None,
    out: Annotated[Path, typer.Option(
        help="Output folder (model, checkpoints, history, eval-val/).")] = DEFAULT_TRAIN_OUT,
    config: Annotated[Optional[Path], typer.Option(
        help="YAML recipe: a path or a shipped name (derm-dev-classifier); flags override it.")] = None,
    arch: Annotated[Optional[str], typer.Option(help="Any timm architecture.")] = None,
    pretrained: Annotated[Optional[str], typer.Option(
        help="none | imagenet | a .safetensors file | a trained classifier folder.")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1)] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Per process.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(min=1, help="Gradient accumulation steps.")] = None,
    img_size: Annotated[Optional[int], typer.Option(min=16)] = None,
    load_size: Annotated[Optional[int], typer.Option(
        min=1, help="Decode images once at this size (default: img-size).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="One-cycle peak learning rate.")] = None,
    mixed_precision: Annotated[Optional[MixedPrecision], typer.Option(
        help="auto: bf16 on a bf16 GPU, no on CPU.")] = None,
    max_synthetic_ratio: Annotated[Optional[float], typer.Option(
        min=0.0, help="Per class: synthetic rows <= ratio x real training rows.")] = None,
    synthetic_weight: Annotated[Optional[float], typer.Option(min=0.0, help="Loss weight of a synthetic row.")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    selection: Annotated[Optional[Selection], typer.Option(
        help="Val rows that select the model: all (default); unseen: without the lesions synthetic "
             "images were made from; reserved: the selection reserve only (mine with the same "
             "--selection-reserve).")] = None,
    selection_reserve: Annotated[Optional[float], typer.Option(
        help="Share of the validation lesions, per class, in the selection reserve (default: 0.3).")] = None,
    tta: Annotated[Optional[TTA], typer.Option(
        help="Test-time augmentation of validation and later evaluations (dihedral: 8 views).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(
        help="Decoded-image and weight cache (default $LESIONGEN_CACHE or ~/.cache/lesiongen).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="'latest' or a checkpoint-N folder.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the results already in --out.")] = False,
) -> None:
    """Train a timm skin-lesion classifier (run under `accelerate launch -m lesiongen` for several GPUs)."""
    from lesiongen.classifier.train import train_classifier as run_training
    from lesiongen.config import config_path

    overrides = {
        "manifest": _absolute(manifest), "synthetic": [_absolute(s) for s in synthetic] if synthetic else None,
        "arch": arch, "pretrained": pretrained, "epochs": epochs, "batch_size": batch_size, "grad_accum": grad_accum,
        "img_size": img_size, "load_size": load_size, "lr": lr, "mixed_precision": mixed_precision,
        "max_synthetic_ratio": max_synthetic_ratio, "synthetic_weight": synthetic_weight, "seed": seed,
        "selection": selection, "selection_reserve": selection_reserve, "tta": tta, "cache_dir": _absolute(cache_dir),
    }
    if resume is not None and resume != "latest" and not Path(resume).is_dir():
        raise typer.BadParameter(f"'{resume}' is neither 'latest' nor a checkpoint folder", param_hint="--resume")
    train_config = resolve_train_config(config_path(config) if config else None, overrides, out, resume)
    if train_config.selection != "reserved":
        from lesiongen.cli.options import refuse_unused

        refuse_unused((("--selection-reserve", selection_reserve),),
                      f"only --selection reserved uses it (this run's selection is {train_config.selection})")
    result = run_training(train_config, out, resume=resume, overwrite=overwrite)
    if result.is_main_process:
        typer.echo(f"best epoch {result.best_epoch}: val balanced accuracy {result.best_val_balanced_accuracy:.4f} "
                   f"({result.epochs_run} epochs{', stopped early' if result.stopped_early else ''}) -> {out}")


def resolve_train_config(config_file: Path | None, overrides: dict, out: Path, resume: str | None):
    """YAML recipe -> flags; on resume the run's saved config is the base and flags may not change it."""
    from lesiongen.classifier.config import TrainConfig
    from lesiongen.classifier.train import CONFIG_FILE
    from lesiongen.config import from_dict, load_yaml, merge, to_dict
    from lesiongen.utils.outdir import resumed_config

    saved = resumed_config(out, "classifier", CONFIG_FILE) if resume is not None else None
    flags = {key: value for key, value in overrides.items() if value is not None}  # errors name these flags
    if saved is not None:
        base, where = load_yaml(saved), str(saved)
        if config_file is not None:
            base = merge(base, load_yaml(config_file))
        resolved = from_dict(TrainConfig, merge(base, overrides), where=where, flags=flags)
        original = to_dict(from_dict(TrainConfig, load_yaml(saved), where=where))
        changed = {k: (original[k], v) for k, v in to_dict(resolved).items()
                   if original.get(k) != v and k not in RESUME_MAY_CHANGE}
        if changed:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise InputError(f"--resume: the run in {out} was started with another config ({details}); "
                             "resume it unchanged or start a new --out")
        return resolved
    base = load_yaml(config_file) if config_file is not None else {}
    return from_dict(TrainConfig, merge(base, overrides), where=str(config_file or "train-classifier"), flags=flags)


def evaluate(
    model: Annotated[Optional[Path], typer.Option(
        help="A trained classifier folder (train-classifier's --out).")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help="Manifest whose split is scored.")] = None,
    split: Annotated[Split, typer.Option(help="Split to score (real images only).")] = "test",
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default checkpoints/evaluate/...).")] = None,
    compare: Annotated[Optional[tuple[Path, Path]], typer.Option(
        help="Paired comparison of A and B (classifier folders, scored on --manifest/--split, "
             "or evaluation folders).")] = None,
    bootstrap: Annotated[int, typer.Option(
        min=0, help="Lesion-level bootstrap resamples for the 95% intervals.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    tta: Annotated[Optional[TTA], typer.Option(help="Test-time augmentation instead of the model's own.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Decoded-image cache.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
) -> None:
    """Score a classifier on a manifest split: metrics.json (with CIs), predictions.csv, confusion and ROC plots."""
    from lesiongen.classifier.evaluate import BootstrapSettings

    settings = BootstrapSettings(n_resamples=bootstrap, seed=seed)
    if compare is not None:
        if model is not None:
            raise typer.BadParameter("give either --model or --compare A B, not both", param_hint="--model")
        _compare(compare, manifest, split, out, settings, batch_size, cache_dir, overwrite, tta=tta)
        return
    if model is None or manifest is None:
        raise typer.BadParameter("--model and --manifest are required (or --compare A B)",
                                 param_hint="--model" if model is None else "--manifest")
    out = out or DEFAULT_EVAL_ROOT / f"{model.resolve().name}-{split}"
    report = _evaluate_to(model, manifest, split, out, settings, batch_size, cache_dir, overwrite, tta=tta)
    if report is not None:
        _print_report(report)
        typer.echo(f"-> {out}")


def _evaluate_to(model: Path, manifest: Path, split: str, out: Path, settings, batch_size: int,
                 cache_dir: Path | None, overwrite: bool, *, tta: str | None = None) -> dict | None:
    """Score `model` (sharded over processes under accelerate launch); the main process writes `out`."""
    from accelerate import Accelerator

    from lesiongen.classifier.evaluate import evaluate_model, write_evaluation
    from lesiongen.utils.distributed import together
    from lesiongen.utils.outdir import check_replaceable

    check_replaceable(out, "evaluation", overwrite, what="evaluation folder")  # fail before the expensive part
    accelerator = Accelerator()
    evaluation = evaluate_model(model, manifest, split, accelerator=accelerator, batch_size=batch_size,
                                cache_dir=cache_dir, tta=tta)
    report = None
    with together(accelerator):  # a failure to write --out stops every process
        if accelerator.is_main_process:
            report = write_evaluation(evaluation, out, settings, overwrite=overwrite)
    return report


def _compare(pair: tuple[Path, Path], manifest: Path | None, split: str, out: Path | None, settings,
             batch_size: int, cache_dir: Path | None, overwrite: bool, *, tta: str | None = None) -> None:
    from lesiongen.classifier.evaluate import compare_evaluations, read_evaluation
    from lesiongen.runs import current_processes
    from lesiongen.utils.atomic import write_json
    from lesiongen.utils.outdir import OutputFolder

    out = out or DEFAULT_EVAL_ROOT / f"compare-{pair[0].resolve().name}-vs-{pair[1].resolve().name}-{split}"
    scored = [_check_compared(label, source, manifest) for label, source in zip("AB", pair)]  # before --out
    folder = OutputFolder(out, "comparison")
    if folder.existing and (out / "comparison.json").is_file() and not overwrite:
        raise OutputExistsError(f"comparison {out / 'comparison.json'} already exists; pass --overwrite to replace it")
    main = current_processes().is_main_process
    if main:
        folder.start(replace=folder.existing)  # an unfinished comparison holds nothing worth keeping
    with folder.removed_on_failure(active=main):
        evaluations = []
        for label, source, is_classifier in zip(("a", "b"), pair, scored):
            if is_classifier:  # a classifier: score it first
                if _evaluate_to(source, manifest, split, out / label, settings, batch_size, cache_dir, True,
                                tta=tta) is None:
                    return  # not the main process
                source = out / label
            evaluations.append(read_evaluation(source))
        result = compare_evaluations(evaluations[0], evaluations[1], settings)
        write_json(out / "comparison.json", result)
        folder.finish()
    _print_leakage(result)
    typer.echo(f"A = {result['a']}\nB = {result['b']}\n{result['split']} split, {result['n_images']} images, "
               f"{result['n_lesions']} lesions")
    for name, row in _headline(result["metrics"]).items():
        interval = row.get("ci95")
        ci = f"[{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else "[n/a]"
        typer.echo(f"  {name:<34} A {_fmt(row['a'])}  B {_fmt(row['b'])}  B-A {_fmt(row['difference'], '+')} {ci}")
    mc = result["mcnemar"]
    typer.echo(f"  McNemar: only A right {mc['only_a_correct']}, only B right {mc['only_b_correct']}, "
               f"p = {mc['p_value']:.4g}")
    typer.echo(f"-> {out / 'comparison.json'}")


def _check_compared(label: str, source: Path, manifest: Path | None) -> bool:
    """Cheap checks of one --compare folder before anything is written; True for a classifier to score."""
    from lesiongen.classifier.evaluate import PREDICTIONS, PREDICTIONS_META
    from lesiongen.classifier.models import INFO_FILE, MODEL_FILE, ClassifierInfo

    if (source / INFO_FILE).is_file():
        ClassifierInfo.read(source)
        if not (source / MODEL_FILE).is_file():
            raise InputError(f"--compare {label}: {source} has no {MODEL_FILE}")
        if manifest is None:
            raise typer.BadParameter(f"{source} is a classifier; --manifest is needed to score it",
                                     param_hint="--manifest")
        return True
    if not ((source / PREDICTIONS).is_file() and (source / PREDICTIONS_META).is_file()):
        raise InputError(f"--compare {label}: {source} is neither a classifier folder (with {INFO_FILE}) nor an "
                         f"evaluation folder (with {PREDICTIONS} and {PREDICTIONS_META})")
    return False


def _print_leakage(report: dict) -> None:
    for warning in report.get("leakage_warnings", []):
        typer.echo(f"WARNING: {warning}", err=True)


def _print_report(report: dict) -> None:
    _print_leakage(report)
    typer.echo(f"{report['split']} split: {report['n_images']} images, {report['n_lesions']} lesions")
    intervals = report.get("ci95", {})
    for name, value in _headline(report["metrics"]).items():
        interval = intervals.get(name)
        ci = f"  95% CI [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
        typer.echo(f"  {name:<34} {_fmt(value)}{ci}")


def _headline(metrics: dict) -> dict:
    keys = ["balanced_accuracy", "accuracy", "macro_auroc"]
    keys += [k for k in metrics if "@" in k]
    return {k: metrics[k] for k in keys if k in metrics}


def _fmt(value, sign: str = "") -> str:
    return "   n/a" if value is None else f"{value:{sign}.4f}"


def _absolute(path: Path | None) -> str | None:
    return str(path.resolve()) if path is not None else None
