"""One fine-tuning run end to end: output folder rules, resolved config, training, adapter export."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from pathlib import Path

from lesiongen.config import changed_settings, from_dict, load_yaml, save_config, to_dict
from lesiongen.diffusion.finetune.config import RESUME_LOCKED, FinetuneConfig
from lesiongen.errors import InputError, OutputExistsError
from lesiongen.utils.atomic import write_json
from lesiongen.utils.inputs import record_inputs, refuse_changed_inputs, training_data_hashes
from lesiongen.utils.outdir import OutputFolder, mark_complete, resumed_config, write_marker

CONFIG_FILE = "config.yaml"
TRAIN_LOG_FILE = "train_log.json"
CACHE_DIR = "cache"


def resolve_config(overrides: dict, *, config_file: str | None = None, resume: str | None = None,
                   flag_names: dict[str, str] | None = None) -> FinetuneConfig:
    """Dataclass defaults -> `--config` YAML -> CLI flags; a resumed run starts from its saved config. A bad
    value from a flag is reported under the flag (`flag_names`: dotted key -> flag, where not `--key`)."""
    overrides = _given(overrides)
    base: dict = {}
    out = overrides.get("out")
    saved = resumed_config(out, "finetune", CONFIG_FILE) if resume and out else None
    if saved is not None:
        base = load_yaml(saved)
    if config_file:
        base = _overlay(base, load_yaml(config_file))
    config = from_dict(FinetuneConfig, _overlay(base, overrides), where=str(config_file or "finetune settings"),
                       flags=overrides, flag_names=flag_names)
    for name in ("base", "manifest", "out"):
        if not getattr(config, name):
            raise InputError(f"--{name} is required (or set '{name}' in the --config file)")
    return config


def _overlay(base: dict, top: dict) -> dict:
    """`top` over `base`, nested groups merged key by key; an explicit null in YAML stays null."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _given(values: dict) -> dict:
    """Drop flags that were not given (None), nested groups included, so they cannot mask the YAML."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _given(value)
        if value is not None and value != {}:
            out[key] = value
    return out


def prepare_out_dir(config: FinetuneConfig, *, resume: str | None, overwrite: bool,
                    num_processes: int = 1) -> OutputFolder | None:
    """A fresh run needs an empty folder (or --overwrite of an earlier finetune output); a resumed one must
    keep its locked settings and process count. Returns the folder when this call starts it (None: a resumed
    run)."""
    from lesiongen.utils.checkpoints import check_process_count, resolve_resume

    out = Path(config.out)
    saved = out / CONFIG_FILE
    folder = None
    if resume and saved.is_file():
        before, now = to_dict(from_dict(FinetuneConfig, load_yaml(saved), where=str(saved))), to_dict(config)
        changed = changed_settings({k: before[k] for k in RESUME_LOCKED}, {k: now[k] for k in RESUME_LOCKED})
        if changed:
            raise InputError(f"--resume {resume}: {out} was trained with other settings ({'; '.join(changed)}); "
                             f"a run keeps {', '.join(RESUME_LOCKED)}; steps, the learning rate and its schedule, "
                             "logging, checkpoint and validation settings may change on resume")
        refuse_changed_inputs(out, training_data_hashes(config.manifest, config.prompts), action=f"--resume {resume}",
                              fix="resuming would continue an adapter trained on other images (the base is "
                                  "checked by its own hash); start a new --out, or pass --overwrite to train again")
        if (checkpoint := resolve_resume(out, resume)) is not None:  # before the slow set-up writes caches
            check_process_count(checkpoint, num_processes)
        write_marker(out, "finetune", complete=False)  # unfinished (again) until the adapter is written
    elif (folder := OutputFolder(out, "finetune")).existing:
        if overwrite:
            pass  # replaced by `start` below
        elif resume:
            raise OutputExistsError(f"--resume {resume}: {out} is not a finetune run (no {CONFIG_FILE}); "
                                    "choose another --out, or pass --overwrite to replace it")
        else:
            raise OutputExistsError(f"{out} already exists; pass --resume latest to continue its training, "
                                    "or --overwrite to start again")
    if folder is not None:
        folder.start(replace=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if not (resume and saved.is_file()):  # a fresh run records what it trains on
        record_inputs(out, training_data_hashes(config.manifest, config.prompts))
    save_config(config, saved)
    return folder


def _resumable(out: Path) -> bool:
    from lesiongen.utils.checkpoints import list_checkpoints

    return bool(list_checkpoints(out)) or (out / "adapter.json").is_file()


def run_finetune(config: FinetuneConfig, *, resume: str | None = None, overwrite: bool = False) -> Path:
    """Train, then write the adapter in every format with its model card; returns the output folder."""
    from lesiongen.diffusion.finetune.loop import Trainer, resolve_precision
    from lesiongen.utils.distributed import process_state, together

    # fp16 without a GPU fails here, not after the training
    resolve_precision(config.mixed_precision, text_side_trains=not config.text_side_frozen)
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise InputError("--tensorboard needs the tensorboard package, which is not installed "
                         "(pip install tensorboard), or leave the flag out")
    state = process_state()
    with together(state):  # a refused --out stops every process, not only the main one
        folder = prepare_out_dir(config, resume=resume, overwrite=overwrite,
                                 num_processes=state.num_processes) if state.is_main_process else None
    # A run this call started that fails before its first checkpoint (a bad --base, say) leaves no folder
    # behind, so the corrected rerun needs no --resume or --overwrite.
    guard = folder.removed_on_failure(_resumable) if folder is not None else contextlib.nullcontext()
    with guard:
        trainer = Trainer(config, resume=resume).setup()
        trainer.train()
        trainer.final_weights()
        with together(trainer.accelerator):
            if trainer.accelerator.is_main_process:
                export_adapter(trainer)
                # latents only serve unfinished training
                shutil.rmtree(Path(config.out) / CACHE_DIR, ignore_errors=True)
                mark_complete(config.out)
    return Path(config.out)


def export_adapter(trainer) -> Path:
    """The trained weights as an adapter folder (every format), `train_log.json` and the model card."""
    import torch

    from lesiongen.diffusion.adapters import AdapterInfo, save_adapter

    config, models = trainer.config, trainer.models
    out = Path(config.out)
    lora = models.lora_weights()
    info = AdapterInfo(
        method=config.method, base=config.base, base_hash=trainer.base_hash, classes=dict(models.tokens.class_tokens),
        num_vectors=config.tokens.num_vectors, resolution=trainer.resolution, prompt_file=trainer.prompts.source,
        name=config.name or out.name, steps=trainer.state.step,
        lora={"rank": config.lora.rank, "alpha": config.lora.lora_alpha, "target_modules": config.lora.target_modules,
              "text_encoder": config.lora.text_encoder} if lora is not None else {},
        training={"lr": config.lr, "token_lr": config.tokens.lr, "batch_size": config.batch_size,
                  "grad_accum": config.grad_accum, "num_processes": trainer.accelerator.num_processes,
                  "num_train_images": len(trainer.data),
                  "final_loss": trainer.state.losses[-1]["loss"] if trainer.state.losses else None},
    )
    pipeline = None
    if config.method == "full":
        pipeline = trainer.pipe.to(torch.float32)
    grids = sorted((out / "validation").glob("step-*.png"))
    write_json(out / TRAIN_LOG_FILE, trainer.state.losses)
    return save_adapter(out, info, lora=lora, embeddings=models.embeddings(), pipeline=pipeline,
                        card_extras={"losses": trainer.state.losses, "class_counts": trainer.data.class_counts(),
                                     "validation_grid": grids[-1].relative_to(out).as_posix() if grids else None})
