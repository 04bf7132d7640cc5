"""Commands of the 'base' group: build, inspect and pretrain Stable-Diffusion-format base models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from lesiongen.cli.app import _Group

PRESET_NAMES = ("tiny", "small", "sd15")
PredictionType = Literal["epsilon", "v_prediction"]
# `base pretrain` flags whose name is not `--<key>` (errors about their values name the flag).
PRETRAIN_FLAGS = {"time_budget_minutes": "--time-budget", "vae.steps": "--vae-steps",
                  "vae.batch_size": "--vae-batch-size", "unet.steps": "--unet-steps",
                  "unet.batch_size": "--unet-batch-size"}
CONFIG_HELP = ("For a single-file checkpoint that is not SD 1.5-shaped: a diffusers folder with the same "
               "architecture's configs (needed offline).")

base_app = typer.Typer(help="Build, inspect and pretrain Stable-Diffusion-format base models.", no_args_is_help=True,
                       cls=_Group)  # its errors and its one-process rule are the root's


def _check_preset(value: str) -> str:
    if value not in PRESET_NAMES:
        raise typer.BadParameter(f"'{value}' is not a preset; choose one of {', '.join(PRESET_NAMES)}")
    return value


@base_app.command("tiny")
def tiny(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the diffusers pipeline into.")],
    preset: Annotated[str, typer.Option(help="Architecture: tiny (32 px, the demo base), small (64 px), sd15 (SD 1.5).",
                                        callback=_check_preset)] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder.")] = False,
) -> None:
    """Build a random-weight SD-format pipeline from a preset and save it (safetensors)."""
    from lesiongen.diffusion.build import build_pipeline
    from lesiongen.diffusion.info import describe_pipeline
    from lesiongen.diffusion.saving import save_pipeline

    pipe = build_pipeline(preset, seed=seed)
    provenance = {"kind": "random", "preset": preset, "seed": seed,
                  "summary": f"random weights from preset '{preset}' (seed {seed})"}
    save_pipeline(pipe, out, provenance=provenance, overwrite=overwrite)
    info = describe_pipeline(pipe)
    typer.echo(f"wrote {out} ({preset}, {info['total_parameters']:,} parameters, {info['resolution']} px)")


@base_app.command("info")
def info(
    path: Annotated[str, typer.Argument(help="A diffusers folder, a single-file .safetensors, or a hub id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Allow loading pickle weights (.ckpt/.bin).")] = False,
    config: Annotated[Path | None, typer.Option(help=CONFIG_HELP)] = None,
) -> None:
    """Components, parameter counts, resolution, prediction type and content hash of a base model."""
    import json

    from lesiongen.diffusion.info import describe_base, format_info

    described = describe_base(path, allow_pickle=allow_pickle, config=config)
    typer.echo(json.dumps(described, indent=2) if as_json else format_info(described))


@base_app.command("export")
def export(
    path: Annotated[str, typer.Argument(help="The base to export (any form `base info` accepts).")],
    out: Annotated[Path, typer.Option("--out", help="Single-file checkpoint to write (.safetensors).")],
    fp32: Annotated[bool, typer.Option("--fp32", help="Keep float32 weights (default: float16).")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Allow loading pickle weights (.ckpt/.bin).")] = False,
    config: Annotated[Path | None, typer.Option(help=CONFIG_HELP)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Write a base as one original-format .safetensors for AUTOMATIC1111 / ComfyUI / from_single_file."""
    from lesiongen.diffusion.loading import load_pipeline
    from lesiongen.diffusion.single_file import export_single_file

    if out.suffix != ".safetensors":
        raise typer.BadParameter(f"'{out}' must end in .safetensors", param_hint="--out")
    export_single_file(load_pipeline(path, allow_pickle=allow_pickle, config=config), out, half=not fp32,
                       overwrite=overwrite)
    typer.echo(f"wrote {out}")


@base_app.command("pretrain")
def pretrain(
    manifest: Annotated[Path, typer.Option(help="Manifest whose (real) training split the base learns.")],
    out: Annotated[Path, typer.Option(help="Run folder; the finished base is a diffusers pipeline at its top.")],
    preset: Annotated[Optional[str], typer.Option(help="Architecture: small (64 px) or tiny (32 px, the demo base).",
                                                  callback=_check_optional_preset)] = None,
    config: Annotated[Optional[Path], typer.Option(
        help="YAML recipe: a path or a shipped name (pretrain-toy-cpu); flags override it.")] = None,
    vae_steps: Annotated[Optional[int], typer.Option(min=0, help="VAE training steps.")] = None,
    unet_steps: Annotated[Optional[int], typer.Option(min=0, help="UNet training steps.")] = None,
    vae_batch_size: Annotated[Optional[int], typer.Option(min=1)] = None,
    unet_batch_size: Annotated[Optional[int], typer.Option(min=1)] = None,
    prediction_type: Annotated[Optional[PredictionType], typer.Option(help="UNet target.")] = None,
    resolution: Annotated[Optional[int], typer.Option(
        min=8, help="Train at this size instead of the preset's.")] = None,
    prompts: Annotated[Optional[str], typer.Option(help="Prompt file or shipped dataset name (class prompts).")] = None,
    eval_classifier: Annotated[Optional[Path], typer.Option(
        help="Classifier folder: class fidelity and domain distance of the sample grids.")] = None,
    sample_every: Annotated[Optional[int], typer.Option(
        min=0, help="UNet steps between sample grids (0: at the end only).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(min=1, help="Steps between checkpoints.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = None,
    cpu_threads: Annotated[Optional[int], typer.Option(
        min=1, help="torch threads on CPU (1 is fastest on a busy machine).")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    resume: Annotated[Optional[str], typer.Option(help="'latest' or a checkpoints/checkpoint-N folder.")] = None,
    stop_after_steps: Annotated[Optional[int], typer.Option(
        min=1, help="Checkpoint and stop after this many steps (resume later).")] = None,
    time_limit: Annotated[Optional[float], typer.Option(
        min=0.1, help="Checkpoint and stop after this many minutes.")] = None,
    time_budget: Annotated[Optional[float], typer.Option(
        min=0.1, help="Fit the run's step counts to this many minutes of training in all (over every --resume job); "
                      "the configured steps become upper bounds.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
) -> None:
    """Pretrain a small SD-format base from scratch: VAE, then the class-conditioned UNet."""
    from lesiongen.config import config_path
    from lesiongen.diffusion.pretrain import pretrain_base
    from lesiongen.diffusion.pretrain.run import resolve_config

    if resume is not None and resume != "latest" and not Path(resume).is_dir():
        raise typer.BadParameter(f"'{resume}' is neither 'latest' nor a checkpoint folder", param_hint="--resume")
    if time_limit is not None and time_limit != time_limit:  # NaN passes typer's min
        raise typer.BadParameter("must be a number of minutes, got nan", param_hint="--time-limit")
    overrides = {
        "preset": preset, "resolution": resolution, "prompts": prompts, "seed": seed, "device": device,
        "cpu_threads": cpu_threads, "sample_every": sample_every, "checkpoint_every": checkpoint_every,
        "time_budget_minutes": time_budget,
        "eval_classifier": str(eval_classifier.resolve()) if eval_classifier else None,
        "vae": {"steps": vae_steps, "batch_size": vae_batch_size},
        "unet": {"steps": unet_steps, "batch_size": unet_batch_size, "prediction_type": prediction_type},
    }
    resolved = resolve_config(config_path(config) if config else None, overrides, out, resume,
                              flag_names=PRETRAIN_FLAGS, log=typer.echo)
    result = pretrain_base(manifest, out, config=resolved, resume=resume, overwrite=overwrite,
                           stop_after_steps=stop_after_steps,
                           time_limit_s=time_limit * 60 if time_limit is not None else None, log=typer.echo)
    state = "finished" if result.finished else "paused (continue with --resume latest)"
    typer.echo(f"{state} at step {result.global_step} -> {out}")


def _check_optional_preset(value: Optional[str]) -> Optional[str]:
    return None if value is None else _check_preset(value)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.add_typer(base_app, name="base")
