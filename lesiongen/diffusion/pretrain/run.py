"""The run folder of `base pretrain`: recipe resolution, resume checks, and the finished pipeline.

Layout: `config.yaml` (resolved recipe), `metrics.jsonl`, `checkpoints/checkpoint-N/`, `cache/`
(latents), `samples/` (per-class grids) and, once finished, the diffusers pipeline itself at the top
(`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, `lesiongen_base.json`),
so the run folder is the base every other command loads.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

from lesiongen.diffusion.pretrain import checkpoints as ckpt
from lesiongen.diffusion.pretrain.config import PretrainConfig
from lesiongen.diffusion.pretrain.trainer import CACHE_DIR, CONFIG_FILE, Pretrainer, PretrainResult
from lesiongen.errors import InputError, OutputExistsError
from lesiongen.utils.atomic import readable_by_umask, write_json
from lesiongen.utils.device import resolve_device
from lesiongen.utils.inputs import record_inputs, refuse_changed_inputs, training_data_hashes
from lesiongen.utils.outdir import OutputFolder, is_unfinished, resumed_config

# Config fields a resumed run may change; anything else would make the checkpoint mean something else.
RESUMABLE_CHANGES = {"vae.steps", "unet.steps", "log_every", "sample_every", "samples_per_class", "sample_steps",
                     "guidance_scale", "eval_classifier", "checkpoint_every", "checkpoints_total_limit",
                     "save_optimizer", "save_dtype", "device", "cpu_threads", "compile", "cache_dir", "max_shards",
                     "max_shard_mib", "checkpoint_dtype", "time_budget_minutes", "vae_budget_share",
                     # what a run that diverged resumes with, from its last good checkpoint
                     "vae.learning_rate", "unet.learning_rate", "grad_clip", "mixed_precision"}


def write_pipeline_into(pipe, out: Path, provenance: dict) -> None:
    """Put the pipeline's components at the top of the run folder (beside checkpoints/ and samples/).

    Each component folder is swapped in whole and model_index.json goes last, so a folder without it is
    recognisably unfinished (the loader says so) and `--resume latest` finishes it.
    """
    from lesiongen.diffusion.saving import PROVENANCE_FILE

    (out / "model_index.json").unlink(missing_ok=True)
    staging = out / ".pipeline.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(str(staging), safe_serialization=True)
    readable_by_umask(staging)
    for component in sorted(p for p in staging.iterdir() if p.is_dir()):
        target = out / component.name
        shutil.rmtree(target, ignore_errors=True)
        component.replace(target)
    write_json(out / PROVENANCE_FILE, provenance)
    (staging / "model_index.json").replace(out / "model_index.json")
    shutil.rmtree(staging, ignore_errors=True)


def pretrain_base(manifest: str | Path, out: str | Path, *, preset: str = "small",
                  config: PretrainConfig | None = None, vae_steps: int | None = None, unet_steps: int | None = None,
                  resume: str | None = None, overwrite: bool = False, stop_after_steps: int | None = None,
                  time_limit_s: float | None = None, log: Callable[[str], None] = print) -> PretrainResult:
    """Pretrain an SD-format base on a manifest's images and save it as a diffusers folder at `out`.

    `preset` only picks the architecture when no `config` is given (a config carries its own preset).
    `resume='latest'` continues the run in `out` (or starts it when it has no checkpoint yet);
    `stop_after_steps` / `time_limit_s` pause the run after a checkpoint so a long pretraining can be a
    chain of short jobs.
    """
    from lesiongen.config import save_config

    config = config or PretrainConfig(preset=preset)
    if vae_steps is not None or unet_steps is not None:
        config = dataclasses.replace(
            config,
            vae=dataclasses.replace(config.vae, steps=config.vae.steps if vae_steps is None else vae_steps),
            unet=dataclasses.replace(config.unet, steps=config.unet.steps if unet_steps is None else unet_steps))
    resolve_device(config.device)  # a bad --device fails before anything is written
    out = Path(out)
    if config.eval_classifier:  # checked now, not after all the training
        _check_eval_classifier(config.eval_classifier)
    checkpoint, folder = _prepare_out(out, config, resume, overwrite, training_data_hashes(manifest, config.prompts))
    # A run this call started that fails before its first checkpoint leaves no folder behind.
    with folder.removed_on_failure(lambda path: bool(ckpt.checkpoints_in(path))):
        trainer = Pretrainer(config, Path(manifest), out, log=log)
        save_config(config, out / CONFIG_FILE)
        if checkpoint is not None:
            trainer.restore(checkpoint)
        result = trainer.run(stop_after_steps=stop_after_steps, time_limit_s=time_limit_s)
    if result.finished:
        # the latent cache only serves a resume of the UNet stage, and a finished base is not resumed:
        # on derm-dev it would be hundreds of MB of dead weight in the base folder
        shutil.rmtree(out / CACHE_DIR, ignore_errors=True)
        folder.finish()
    return result


def _check_eval_classifier(folder: str) -> None:
    from lesiongen.classifier.models import MODEL_FILE, ClassifierInfo

    try:
        ClassifierInfo.read(folder)
    except InputError as err:
        raise InputError(f"--eval-classifier: {err}") from err
    if not (Path(folder) / MODEL_FILE).is_file():
        raise InputError(f"--eval-classifier: {folder} has no {MODEL_FILE}")


def _prepare_out(out: Path, config: PretrainConfig, resume: str | None, overwrite: bool,
                 inputs: dict[str, str | None]) -> tuple[Path | None, OutputFolder]:
    """The checkpoint to resume from (None: start fresh) and the folder, after checking it may be used."""
    checkpoint = ckpt.find_checkpoint(out, resume) if resume is not None else None
    if checkpoint is not None:
        saved = out / CONFIG_FILE
        if saved.is_file():
            check_resumable(saved, config, ckpt.TrainerState.read(checkpoint).planned_steps)
        refuse_changed_inputs(out, inputs, action="--resume",
                              fix="resuming would continue a base trained on other images; start a new --out, or "
                                  "pass --overwrite to train again")
        folder = OutputFolder(out, "pretrain")
        folder.start()  # unfinished (again) until the run completes
        return checkpoint, folder
    folder = OutputFolder(out, "pretrain")
    if folder.existing and resume is None and not overwrite:
        if (out / "model_index.json").is_file() and not is_unfinished(out):
            hint = "it holds a finished base: pass --overwrite to train it again, or choose another --out"
        elif ckpt.checkpoints_in(out):
            hint = "it holds checkpoints: pass --resume latest to continue its training, or --overwrite to start again"
        else:
            hint = "pass --overwrite to replace it"
        raise OutputExistsError(f"pretraining output folder {out} already exists; {hint}")
    folder.start(replace=overwrite)  # `--resume latest` without a checkpoint yet starts in the folder
    record_inputs(out, inputs)
    return None, folder


def check_resumable(saved_config: Path, config: PretrainConfig, planned: dict[str, int] | None = None) -> None:
    """Refuse changes that would make the checkpoint mean something else, and changes that could no longer take
    effect: a stage whose step count was fitted to the time budget keeps that plan (its schedule was built
    for it), so its `steps` are fixed from then on, the VAE's share once the VAE is planned, and the budget
    once both stages are (a new budget still plans a stage that is not planned yet)."""
    from lesiongen.config import flatten, from_dict, load_yaml, to_dict

    before = flatten(to_dict(from_dict(PretrainConfig, load_yaml(saved_config), where=str(saved_config))))
    after = flatten(to_dict(config))
    changed = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v and k not in RESUMABLE_CHANGES}
    if changed:
        details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise InputError(f"--resume: the run in {saved_config.parent} was started with another config ({details}); "
                         "only step counts and progress settings may change when resuming")
    planned = planned or {}
    fixed = {f"{stage}.steps" for stage in planned}
    fixed |= {"vae_budget_share"} if "vae" in planned else set()
    fixed |= {"time_budget_minutes"} if {"vae", "unet"} <= set(planned) else set()
    moot = {k: (before.get(k), after[k]) for k in sorted(fixed) if before.get(k) != after.get(k)}
    if moot:
        details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in moot.items())
        plans = ", ".join(f"{stage} {steps} steps" for stage, steps in sorted(planned.items()))
        raise InputError(f"--resume: the run in {saved_config.parent} already fitted its steps to the time budget "
                         f"({plans}), which a resumed run keeps; {details} would not take effect. Resume without "
                         "changing them, or start a new --out with the new budget")


def resolve_config(config_file: str | Path | None, overrides: dict, out: Path, resume: str | None,
                   flag_names: dict[str, str] | None = None,
                   log: Callable[[str], None] = print) -> PretrainConfig:
    """YAML recipe -> CLI flags -> PretrainConfig; a resumed run starts from the config it was started with.
    A bad value from a flag is reported under the flag (`flag_names`: dotted key -> flag, where not `--key`).

    A resume may change step counts and progress settings, and a `--config` given again applies all of its
    values: a first job's `--unet-steps 6` is replaced by the YAML's 2500 unless the flag is repeated. Every
    value that changes on a resume is therefore said, with where it came from."""
    from lesiongen.config import flatten, from_dict, load_yaml, merge, to_dict

    overrides = _drop_none(overrides)
    saved = resumed_config(out, "pretrain", CONFIG_FILE) if resume is not None else None
    if saved is not None:
        base, where = load_yaml(saved), str(saved)
        if config_file is not None:
            base = merge(base, load_yaml(config_file))
    else:
        base = load_yaml(config_file) if config_file is not None else {}
        where = str(config_file or "base pretrain")
    config = from_dict(PretrainConfig, merge(base, overrides), where=where, flags=overrides, flag_names=flag_names)
    if saved is not None:
        before = flatten(to_dict(from_dict(PretrainConfig, load_yaml(saved), where=str(saved))))
        flagged = set(flatten(overrides))
        for key, value in sorted(flatten(to_dict(config)).items()):
            if before.get(key) != value:
                source = ("a flag" if key in flagged
                          else f"--config {config_file}; repeat the first job's flag to keep it")
                log(f"resume: {key} changes from {before.get(key)!r} (in {saved}) to {value!r} (from {source})")
    return config


def _drop_none(data: dict) -> dict:
    """Flags not given are None; nested groups of them must vanish too, not override YAML with None."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if not value:
                continue
        if value is not None:
            out[key] = value
    return out
