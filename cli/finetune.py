"""`lesiongen finetune`, `generate`, `export`: adapt SD to dermoscopy, draw classes, convert adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

METHODS = ("lora", "ti", "lora+ti", "full")
SCHEDULERS = ("ddim", "dpmpp", "euler")
TARGETS = ("diffusers", "kohya", "a1111")
PRECISIONS = ("auto", "no", "fp16", "bf16")
# `finetune` flags of nested settings whose name is not `--<key>` (errors about their values name the flag).
FINETUNE_FLAGS = {"lora.dropout": "--lora-dropout", "lora.text_encoder": "--text-encoder-lora",
                  "tokens.lr": "--token-lr"}


def register(app: typer.Typer) -> None:
    """Add `finetune`, `generate` and `export` to the root app."""
    app.command("finetune")(finetune)
    app.command("generate")(generate)
    app.command("export")(export)


def _choice(value: str | None, choices: tuple[str, ...], flag: str) -> str | None:
    if value is not None and value not in choices:
        raise typer.BadParameter(f"'{value}' is not one of {', '.join(choices)}", param_hint=flag)
    return value


def _local_path(value: str | None) -> str | None:
    """Absolute path for local files (so a resumed run compares like with like); hub ids unchanged."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def finetune(
    base: Annotated[str | None, typer.Option(help="Base: diffusers folder, single .safetensors, or hub id.")] = None,
    manifest: Annotated[Path | None, typer.Option(help="Manifest CSV; only its real train rows are used.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: checkpoints/finetune-<method>).")] = None,
    method: Annotated[str | None, typer.Option(help="lora, ti, lora+ti (pivotal tuning) or full "
                                                    "(default: lora+ti).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with any finetune setting (flags win).")] = None,
    resume: Annotated[str | None, typer.Option(help="'latest' or a checkpoint-N folder to continue from.")] = None,
    prompts: Annotated[str | None, typer.Option(help="Prompt file (dataset name or YAML path) "
                                                     "(default: ham10000).")] = None,
    rank: Annotated[int | None, typer.Option(min=1, help="LoRA rank (default: 16).")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha; the scale is alpha / rank (default: rank).")] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="LoRA dropout.")] = None,
    text_encoder_lora: Annotated[bool | None, typer.Option("--text-encoder-lora/--no-text-encoder-lora",
                                                           help="Also train a LoRA on the text encoder.")] = None,
    num_vectors: Annotated[int | None, typer.Option(min=1, help="Vectors per class token (default: 1).")] = None,
    token_lr: Annotated[float | None, typer.Option(help="Learning rate of the class tokens (default: 5e-4).")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps (default: 2000).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per step per device (default: 8).")] = None,
    grad_accum: Annotated[int | None, typer.Option(min=1, help="Micro-batches per optimizer step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate of LoRA / UNet weights (default: 1e-4).")] = None,
    lr_scheduler: Annotated[str | None, typer.Option(help="constant, constant_with_warmup, cosine, linear.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(min=0, help="Learning-rate warm-up steps.")] = None,
    resolution: Annotated[int | None, typer.Option(help="Training size in px (default: the base's native).")] = None,
    mixed_precision: Annotated[str | None, typer.Option(help="auto, no, fp16 or bf16 (default: auto).")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing",
                                                                help="Trade compute for memory.")] = None,
    cache_latents: Annotated[bool | None, typer.Option("--cache-latents/--no-cache-latents",
                                                       help="Encode every image once (default: on).")] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile",
                                                 help="torch.compile the UNet (default: on with CUDA).")] = None,
    ema: Annotated[bool | None, typer.Option("--ema/--no-ema", help="Export an EMA of the trained weights.")] = None,
    snr_gamma: Annotated[float | None, typer.Option(help="Min-SNR weighting gamma (default: 5).")] = None,
    noise_offset: Annotated[float | None, typer.Option(help="Noise offset (e.g. 0.05).")] = None,
    caption_dropout: Annotated[float | None, typer.Option(help="Share of empty captions (CFG) (default: 0.1).")] = None,
    class_balance: Annotated[float | None, typer.Option(help="1: classes drawn equally often, 0: as in data.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of initialisation and every batch (default: 0).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(min=1, help="Save checkpoint-N every N steps.")] = None,
    checkpoint_limit: Annotated[int | None, typer.Option(min=1, help="Keep at most this many checkpoints.")] = None,
    validate_every: Annotated[int | None, typer.Option(min=0, help="Validation grid every N steps (0: at the "
                                                            "end).")] = None,
    log_every: Annotated[int | None, typer.Option(min=1, help="Log (and check for NaN) every N steps.")] = None,
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard/--no-tensorboard",
                                                     help="Log to TensorBoard in the output folder.")] = None,
    name: Annotated[str | None, typer.Option(help="Adapter name in file names (default: the folder's name).")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickle weights (.ckpt/.bin) in the base.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Fine-tune a base on a manifest's train split: LoRA and/or one learned token per class."""
    _choice(method, METHODS, "--method")
    _choice(mixed_precision, PRECISIONS, "--mixed-precision")
    if resume is not None and resume != "latest" and not resume.startswith("checkpoint-") and not Path(resume).exists():
        raise typer.BadParameter(f"'{resume}' is neither 'latest' nor a checkpoint-N folder", param_hint="--resume")
    from lesiongen.cli.options import echo_main, refuse_unused
    from lesiongen.config import config_path
    from lesiongen.diffusion.finetune import resolve_config, run_finetune

    overrides = {
        "base": _local_path(base), "manifest": _local_path(str(manifest) if manifest else None), "method": method,
        "prompts": prompts, "steps": steps, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
        "lr_scheduler": lr_scheduler, "warmup_steps": warmup_steps, "resolution": resolution,
        "mixed_precision": mixed_precision, "gradient_checkpointing": gradient_checkpointing,
        "cache_latents": cache_latents, "compile": compile, "ema": ema, "snr_gamma": snr_gamma,
        "noise_offset": noise_offset, "caption_dropout": caption_dropout, "class_balance": class_balance,
        "seed": seed, "checkpoint_every": checkpoint_every, "checkpoint_limit": checkpoint_limit,
        "validate_every": validate_every, "log_every": log_every, "tensorboard": tensorboard, "name": name,
        "allow_pickle": allow_pickle or None,
        "lora": {"rank": rank, "alpha": alpha, "dropout": lora_dropout, "text_encoder": text_encoder_lora},
        "tokens": {"num_vectors": num_vectors, "lr": token_lr},
    }
    overrides["out"] = str(out or Path("checkpoints") / f"finetune-{method or 'lora+ti'}")
    settings = resolve_config(overrides, config_file=str(config_path(config)) if config else None, resume=resume,
                              flag_names=FINETUNE_FLAGS)
    if not settings.trains_lora:
        refuse_unused((("--rank", rank), ("--alpha", alpha), ("--lora-dropout", lora_dropout),
                       ("--text-encoder-lora", text_encoder_lora)),
                      f"--method {settings.method} trains no LoRA; use --method lora or lora+ti, or leave them out")
    if not settings.trains_tokens:
        refuse_unused((("--num-vectors", num_vectors), ("--token-lr", token_lr)),
                      f"--method {settings.method} learns no class tokens; use --method lora+ti, ti or full, or "
                      "leave them out")
    folder = run_finetune(settings, resume=resume, overwrite=overwrite)
    echo_main(f"wrote adapter {folder} ({settings.method}, {settings.steps} steps)")


def generate(
    base: Annotated[str | None, typer.Option(help="Base model (default: the adapter's base).")] = None,
    adapter: Annotated[Path | None, typer.Option(help="Adapter folder from `lesiongen finetune`.")] = None,
    classes: Annotated[list[str] | None, typer.Option("--class", help="Class to draw, as CLASS or CLASS=N (repeatable; "
                                                      "'all' for every class); with --prompt, the label of its "
                                                      "images.")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Images per class without its own =N (or per prompt).")] = 8,
    prompt: Annotated[str | None, typer.Option(help="A free prompt instead of the class prompts.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: checkpoints/generated).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Sampling steps.")] = 30,
    guidance: Annotated[float, typer.Option(min=0.0, help="Classifier-free guidance scale.")] = 7.5,
    scheduler: Annotated[str, typer.Option(help="ddim, dpmpp (DPM-Solver++) or euler.")] = "dpmpp",
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt (default: the prompt file's).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 8,
    seed: Annotated[int, typer.Option(help="Image i of each class (or of --prompt) gets seed + i.")] = 0,
    resolution: Annotated[int | None, typer.Option(
        min=1, help="Size in px (default: the adapter's training size).")] = None,
    prompts: Annotated[str | None, typer.Option(help="Prompt file (default: the adapter's, else ham10000).")] = None,
    compile: Annotated[bool, typer.Option(help="torch.compile the UNet (pays off for hundreds of images).")] = False,
    fuse: Annotated[bool, typer.Option(help="Fold LoRA into the weights and fuse QKV projections.")] = True,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickle weights (.ckpt/.bin).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Regenerate into a folder made with other settings.")] = False,
) -> None:
    """Draw images of classes (`--class df --n 500`, `--class mel=200 --class df=50`) or of a free prompt;
    writes PNGs + a manifest."""
    _choice(scheduler, SCHEDULERS, "--scheduler")
    if prompt is None and not classes:
        raise typer.BadParameter("give --class (repeatable, or 'all') or --prompt", param_hint="--class")
    from lesiongen.cli.options import echo_main
    from lesiongen.diffusion.generate import run_generate

    manifest = run_generate(base=base, adapter=adapter, classes=classes, n=n, prompt=prompt,
                            out=out or Path("checkpoints") / "generated", steps=steps, guidance=guidance,
                            scheduler=scheduler, negative_prompt=negative_prompt, batch_size=batch_size, seed=seed,
                            resolution=resolution, prompts=prompts, compile=compile, fuse=fuse,
                            allow_pickle=allow_pickle, overwrite=overwrite)
    echo_main(f"wrote {manifest}")


def export(
    source: Annotated[Path, typer.Argument(help="Adapter folder, folder of LoRA / embedding files, or one file.")],
    to: Annotated[str, typer.Option("--to", help="diffusers, kohya (LoRA for A1111/ComfyUI) or a1111 "
                                    "(kohya LoRA + A1111 embeddings).")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <source folder>/export-<to>).")] = None,
    base: Annotated[str | None, typer.Option(help="Base model; needed to turn a kohya LoRA into diffusers.")] = None,
    token: Annotated[str | None, typer.Option(help="Token of a single A1111 embedding (default: <file stem>).")] = None,
    embedding_format: Annotated[str, typer.Option(help="A1111 embedding files: safetensors or pt.")] = "safetensors",
    allow_pickle: Annotated[bool, typer.Option(help="Allow reading pickle (.pt/.bin) embeddings.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Convert LoRA and learned-token files between diffusers and A1111 / kohya formats."""
    _choice(to, TARGETS, "--to")
    _choice(embedding_format, ("safetensors", "pt"), "--embedding-format")
    from lesiongen.diffusion.export import export as run_export

    written = run_export(source, to, out, base=_local_path(base), token=token, allow_pickle=allow_pickle,
                         overwrite=overwrite, embedding_format=embedding_format)
    for path in written:
        typer.echo(f"wrote {path}")
