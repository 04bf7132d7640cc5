"""`lesiongen mine` and `lesiongen mine-and-generate`: hard cases -> DDIM inversion -> filtered variants.

Only typer and the standard library are imported here; torch and diffusers load inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

Method = Literal["img2img", "embedding"]
Split = Literal["train", "val", "test"]
DType = Literal["auto", "fp32", "fp16", "bf16"]
Depth = Literal["strength", "full"]
DEFAULT_OUT = Path("checkpoints/mine-and-generate")
DEFAULT_MINE_OUT = Path("checkpoints/mine")
# Flags whose name is not `--<key>` (errors about their values name the flag); `mine` uses the mining ones
# without the `mining.` prefix.
MINING_FLAGS = {"confusion_weights": "--confusion"}
SYNTHESIS_FLAGS = {**{f"mining.{key}": flag for key, flag in MINING_FLAGS.items()},
                   "inversion.steps": "--inversion-steps", "inversion.guidance": "--inversion-guidance",
                   "inversion.depth": "--inversion-depth", "variants.per_image": "--variants-per-image",
                   "variants.embedding_lambda": "--lambda", "filters.memorization": "--memorization-filter"}


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("mine")(mine)
    app.command("mine-and-generate")(mine_and_generate)


# -- shared options ---------------------------------------------------------------------------------

PredictionsOpt = Annotated[Path, typer.Option(
    help="predictions.csv written by `lesiongen evaluate` on the mining split.")]
ManifestOpt = Annotated[Path, typer.Option(help="The manifest those predictions were made on (checked by hash).")]
SplitOpt = Annotated[Optional[Split], typer.Option(help="Mining split (default: val); test needs --allow-test-mining.")]
QuotaOpt = Annotated[Optional[str], typer.Option(help="Most cases per class: N, or per class 'mel=40,df=10'.")]
MaxCasesOpt = Annotated[Optional[int], typer.Option(
    min=1, help="Keep only the hardest N cases overall (default: all).")]
LesionOpt = Annotated[Optional[int], typer.Option(min=1, help="Most images of one lesion (group_id) (default: 1).")]
MarginOpt = Annotated[Optional[float], typer.Option(
    help="Correct cases with p(true) - max p(other) below this are hard (default: 0.2).")]
ConfusionOpt = Annotated[Optional[list[str]], typer.Option(
    help="Confusion weight, e.g. 'mel<->nv=2' or 'mel->nv=3' "
         "(repeatable; replaces the defaults mel<->nv=2, bkl<->mel=1.5).")]
ReserveOpt = Annotated[Optional[float], typer.Option(
    help="Never mine this share of the validation lesions (per class, fixed by lesion id): the share that "
         "`train-classifier --selection reserved --selection-reserve` selects on (default: mine every lesion).")]
TestMiningOpt = Annotated[bool, typer.Option(
    "--allow-test-mining", help="Allow mining the test split (leaks; every output says so).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the results already in --out.")]


def parse_quota(text: str | None) -> int | dict[str, int] | None:
    """'20' -> 20; 'mel=40,df=10' -> {'mel': 40, 'df': 10}."""
    if text is None:
        return None
    try:
        if "=" not in text:
            return int(text)
        quota = {}
        for part in text.split(","):
            key, value = part.split("=")
            quota[key.strip()] = int(value)
        return quota
    except ValueError:
        raise typer.BadParameter(f"'{text}' is neither a number nor 'class=N,class=N'", param_hint="--per-class-quota")


def parse_confusion(items: list[str] | None) -> dict[str, float] | None:
    """['mel<->nv=2'] -> {'mel<->nv': 2.0}."""
    if not items:
        return None
    weights = {}
    for item in items:
        pair, _, value = item.rpartition("=")
        try:
            weights[pair.strip()] = float(value)
        except ValueError:
            raise typer.BadParameter(f"'{item}' must look like 'mel<->nv=2'", param_hint="--confusion")
    return weights


def mining_overrides(split, quota, max_per_lesion, max_cases, margin, confusion, allow_test_mining,
                     selection_reserve) -> dict:
    return {"split": split, "per_class_quota": parse_quota(quota), "max_per_lesion": max_per_lesion,
            "max_cases": max_cases, "selection_reserve": selection_reserve,
            "margin_threshold": margin, "confusion_weights": parse_confusion(confusion),
            "allow_test_mining": allow_test_mining or None}


def _given(overrides: dict) -> dict:
    """The flags actually given: None (not given) dropped at every level, empty sections too."""
    out = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            value = _given(value) or None
        if value is not None:
            out[key] = value
    return out


def _absolute(path: Path | None) -> str | None:
    return str(path.expanduser().resolve()) if path is not None else None


def _local_or_id(value: str | None) -> str | None:
    """Absolute path for a local base (so a resumed run compares like with like); hub ids unchanged."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


# -- commands ---------------------------------------------------------------------------------------


def mine(
    predictions: PredictionsOpt,
    manifest: ManifestOpt,
    out: Annotated[Path, typer.Option(help="Folder for hard_cases.csv and mining.json.")] = DEFAULT_MINE_OUT,
    split: SplitOpt = None,
    per_class_quota: QuotaOpt = None,
    max_per_lesion: LesionOpt = None,
    max_cases: MaxCasesOpt = None,
    margin_threshold: MarginOpt = None,
    confusion: ConfusionOpt = None,
    selection_reserve: ReserveOpt = None,
    allow_test_mining: TestMiningOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Mine the hard cases (misclassified, low-margin, high-loss) from evaluate's predictions."""
    from lesiongen.config import from_dict, to_dict
    from lesiongen.data.manifest import load_manifest
    from lesiongen.errors import OutputExistsError
    from lesiongen.synthesis.mining import MiningConfig, load_predictions, mine_hard_cases
    from lesiongen.utils.atomic import atomic_path, write_json
    from lesiongen.utils.outdir import OutputFolder

    overrides = mining_overrides(split, per_class_quota, max_per_lesion, max_cases, margin_threshold, confusion,
                                 allow_test_mining, selection_reserve)
    config = from_dict(MiningConfig, _given(overrides), where="mine", flags=_given(overrides), flag_names=MINING_FLAGS)
    folder = OutputFolder(out, "mining")
    if folder.existing and (out / "hard_cases.csv").exists() and not overwrite:
        raise OutputExistsError(f"mining result {out / 'hard_cases.csv'} already exists; pass --overwrite to "
                                "replace it")
    classes = load_manifest(manifest).classes
    result = mine_hard_cases(load_predictions(predictions, manifest, split=config.split, classes=classes), config)
    folder.start(replace=overwrite, complete=True)
    with folder.removed_on_failure():
        with atomic_path(out / "hard_cases.csv") as tmp:
            result.cases.to_csv(tmp, index=False)
        write_json(out / "mining.json", {**({"leakage_warning": result.leakage_warning}
                                            if result.leakage_warning else {}),
                                         "predictions": _absolute(predictions), "manifest": _absolute(manifest),
                                         "config": to_dict(config), "stats": result.stats})
    if result.leakage_warning:
        typer.echo(f"WARNING: {result.leakage_warning}", err=True)
    reserved = result.stats["reserved_for_selection"]
    typer.echo(f"mined {result.stats['mined']} hard cases of {result.stats['predictions']} "
               + (f"({reserved} of the selection reserve left out) " if reserved else "")
               + f"({result.stats['per_class']}) -> {out / 'hard_cases.csv'}")


def mine_and_generate(
    predictions: Annotated[Optional[Path], typer.Option(
        help="predictions.csv written by `lesiongen evaluate` on the mining split.")] = None,
    manifest: Annotated[Optional[Path], typer.Option(
        help="The manifest those predictions were made on (checked by hash).")] = None,
    base: Annotated[Optional[str], typer.Option(
        help="SD base: diffusers folder, single .safetensors, or hub id (default: the adapter's base).")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="`finetune` output folder (LoRA + class tokens).")] = None,
    classifier: Annotated[Optional[Path], typer.Option(
        help="The classifier being improved: classifier guidance, "
             "and the filter's judge unless --reference-classifier.")] = None,
    reference_classifier: Annotated[Optional[Path], typer.Option(
        help="Judge for the off-class filter and the memorisation features (default: --classifier).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder (images, manifest.csv, candidates.csv, ...).")] = DEFAULT_OUT,
    config: Annotated[Optional[Path], typer.Option(
        help="YAML with any setting (sections mining/inversion/variants/filters); flags win.")] = None,
    method: Annotated[Optional[Method], typer.Option(help="img2img or embedding (default: img2img).")] = None,
    variants_per_image: Annotated[Optional[int], typer.Option(
        min=1, help="Variants per hard case (default: 4).")] = None,
    strength: Annotated[Optional[float], typer.Option(
        help="Share of the sampling steps re-run, in (0, 1] (default: 0.6).")] = None,
    renoise: Annotated[Optional[float], typer.Option(
        help="Share of the inversion noise replaced by fresh noise, [0, 1] (default: 0.5).")] = None,
    lambda_: Annotated[Optional[float], typer.Option(
        "--lambda",
        help="Embedding method: weight of the class prompt vs the image's own embedding (default: 0.5).")] = None,
    embedding_steps: Annotated[Optional[int], typer.Option(
        min=1, help="Optimisation steps of the per-image embedding (default: 25).")] = None,
    inversion_steps: Annotated[Optional[int], typer.Option(
        help="DDIM steps for inversion and sampling (default: 50).")] = None,
    inversion_guidance: Annotated[Optional[float], typer.Option(help="CFG while inverting (default: 1).")] = None,
    inversion_depth: Annotated[Optional[Depth], typer.Option(
        help="strength: invert only as far as the variants start, and measure the round trip from there; "
             "full: to pure noise (default: strength).")] = None,
    guidance: Annotated[Optional[float], typer.Option(
        help="CFG while sampling variants (and the round trip when null-text is on) (default: 5).")] = None,
    fixed_point_iterations: Annotated[Optional[int], typer.Option(
        min=0, help="Refinements per inversion step (default: 0).")] = None,
    null_text_steps: Annotated[Optional[int], typer.Option(
        min=0, help="Null-text optimisation iterations per step; 0 = off.")] = None,
    classifier_guidance: Annotated[Optional[float], typer.Option(
        min=0.0, help="Push samples toward the classifier's doubt; 0 = off.")] = None,
    split: SplitOpt = None,
    per_class_quota: QuotaOpt = None,
    max_per_lesion: LesionOpt = None,
    max_cases: MaxCasesOpt = None,
    margin_threshold: MarginOpt = None,
    confusion: ConfusionOpt = None,
    selection_reserve: ReserveOpt = None,
    allow_test_mining: TestMiningOpt = False,
    min_label_prob: Annotated[Optional[float], typer.Option(
        help="Drop variants the judge gives p(label) below this (default: 0.1).")] = None,
    min_inversion_psnr: Annotated[Optional[float], typer.Option(
        help="Failed reconstruction: dB of the round trip against the VAE's own reconstruction (default: 20).")] = None,
    min_recon_psnr: Annotated[Optional[float], typer.Option(
        help="Failed reconstruction: dB of the round trip against the input (default: off).")] = None,
    memorization_filter: Annotated[Optional[bool], typer.Option(
        "--memorization-filter/--no-memorization-filter",
        help="Drop near-copies of training images (default: on).")] = None,
    prompts: Annotated[Optional[str], typer.Option(help="Prompt file (default: the adapter's, else ham10000).")] = None,
    seed: Annotated[Optional[int], typer.Option(
        help="Base seed; each variant's seed derives from it, its source and index.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Source images per batch (default: 8).")] = None,
    dtype: Annotated[Optional[DType], typer.Option(help="auto: fp16 on CUDA, fp32 on CPU.")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the UNet.")] = None,
    feature_cache: Annotated[Optional[int], typer.Option(
        min=1, help="Recompute the UNet's deep features every N DDIM steps (DeepCache): "
                    "1 = exact (default), 2-3 faster at some round-trip PSNR.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle weights (.ckpt/.bin).")] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Decoded-image cache for the training-set index.")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Mine hard cases, invert them with DDIM, make labelled variants and filter them (resumable; shards
    over `accelerate launch -m lesiongen mine-and-generate ...` processes)."""
    from lesiongen.cli.options import echo_main, refuse_unused
    from lesiongen.config import from_dict, load_yaml, merge
    from lesiongen.synthesis.pipeline import SynthesisConfig, run_mine_and_generate

    if strength is not None and not 0.0 < strength <= 1.0:
        raise typer.BadParameter(f"{strength} is outside (0, 1]: strength is the share of the sampling steps "
                                 "re-run from the inverted latent (1 = all of them)", param_hint="--strength")
    overrides = {
        "predictions": _absolute(predictions), "manifest": _absolute(manifest), "base": _local_or_id(base),
        "adapter": _absolute(adapter), "classifier": _absolute(classifier),
        "reference_classifier": _absolute(reference_classifier), "out": _absolute(out),
        "prompts": prompts, "seed": seed, "batch_size": batch_size, "dtype": dtype, "compile": compile,
        "feature_cache": feature_cache,
        "allow_pickle": allow_pickle or None, "cache_dir": _absolute(cache_dir),
        "mining": mining_overrides(split, per_class_quota, max_per_lesion, max_cases, margin_threshold, confusion,
                                   allow_test_mining, selection_reserve),
        "inversion": {"steps": inversion_steps, "guidance": inversion_guidance, "depth": inversion_depth,
                      "fixed_point_iterations": fixed_point_iterations, "null_text_steps": null_text_steps},
        "variants": {"method": method, "per_image": variants_per_image, "strength": strength, "renoise": renoise,
                     "guidance": guidance, "embedding_lambda": lambda_, "embedding_steps": embedding_steps,
                     "classifier_guidance": classifier_guidance},
        "filters": {"min_label_prob": min_label_prob, "min_inversion_psnr": min_inversion_psnr,
                    "min_recon_psnr": min_recon_psnr, "memorization": memorization_filter},
    }
    defaults = load_yaml(config) if config is not None else {}
    flags = _given(overrides)
    run_config = from_dict(SynthesisConfig, merge(defaults, flags), where=str(config or "mine-and-generate"),
                           flags=flags, flag_names=SYNTHESIS_FLAGS)
    if run_config.variants.method != "embedding":
        refuse_unused((("--lambda", lambda_), ("--embedding-steps", embedding_steps)),
                      f"only --method embedding uses them (this run's method is {run_config.variants.method})")
    summary = run_mine_and_generate(run_config, overwrite=overwrite)
    if summary.get("leakage_warning"):
        echo_main(f"WARNING: {summary['leakage_warning']}", err=True)
    psnr = summary.get("recon_psnr_mean")
    echo_main(f"{summary['sources']} hard cases inverted (mean round-trip PSNR "
               f"{'n/a' if psnr is None else f'{psnr:.1f} dB'}, {summary['failed_reconstructions']} failed); "
               f"{summary['kept']} of {summary['variants']} variants kept -> {Path(run_config.out) / 'manifest.csv'}")
    if summary["variants"] and not summary["kept"]:
        echo_main("WARNING: every variant was filtered out; see candidates.csv for the reasons", err=True)
