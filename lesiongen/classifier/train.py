"""Train a timm classifier on a manifest with accelerate (one GPU, several, or the CPU).

The images of the train and val splits are decoded once into uint8 tensors on the device; a batch is a
set of positions drawn by `EpochSampler`, gathered from that tensor and augmented on the device, so the
data pipeline costs a few kernels per step. accelerate provides mixed precision, DDP, gradient
accumulation and checkpoint state; the model is selected (and training stopped early) on validation
balanced accuracy, computed from predictions gathered over all processes (every validation row, or with
`selection: unseen` the lesions no synthetic training image was made from, with `reserved` the selection
reserve that mining skips; the score on every row is logged beside it).

Output folder: `config.yaml`, the best model (`model.safetensors` + `classifier.json`), `history.csv`,
`checkpoint-N/` folders, and `eval-val/` (the best model's validation evaluation, as `lesiongen evaluate`
writes it).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from lesiongen.classifier.augment import DeviceAugment
from lesiongen.classifier.checkpoints import (
    TrainerState,
    check_checkpoint,
    list_checkpoints,
    resolve_resume,
    restore_best,
    save_checkpoint,
)
from lesiongen.classifier.config import TrainConfig
from lesiongen.classifier.data import (
    balance_weights,
    decode,
    load_synthetic,
    real_split,
    selection_rows,
    training_sampler,
    training_table,
)
from lesiongen.classifier.evaluate import VAL_EVALUATION
from lesiongen.classifier.models import (
    INFO_FILE,
    MODEL_FILE,
    ClassifierInfo,
    check_arch,
    create_classifier,
    data_config,
    save_classifier,
)
from lesiongen.classifier.predict import IndexDataset, evaluation_loader, predict_distributed
from lesiongen.classifier.preprocess import normalize, shades_of_gray, to_unit_float
from lesiongen.config import save_config, to_dict
from lesiongen.errors import InputError, OutputExistsError, TrainingDivergedError
from lesiongen.metrics.clinical import ClinicalSpec, clinical_metrics
from lesiongen.utils.atomic import atomic_path, write_json
from lesiongen.utils.checkpoints import check_process_count
from lesiongen.utils.distributed import shared, together
from lesiongen.utils.inputs import file_hashes, record_inputs, refuse_changed_inputs
from lesiongen.utils.outdir import OutputFolder

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.csv"
EVAL_DIR = VAL_EVALUATION
LOSS_DISPLAY_EVERY = 20  # steps between loss read-outs on the progress bar


@dataclass
class TrainResult:
    out_dir: Path
    best_epoch: int
    best_val_balanced_accuracy: float
    epochs_run: int
    stopped_early: bool
    num_processes: int
    is_main_process: bool


def resolve_mixed_precision(value: str, device: torch.device) -> str:
    if value != "auto":
        if value == "fp16" and device.type != "cuda":
            raise InputError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this device")
        return value
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _launch_device() -> torch.device:
    """The device accelerate will pick, known before it is set up (the precision must be chosen first)."""
    from accelerate.utils import parse_flag_from_env

    use_cuda = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    return torch.device("cuda" if use_cuda else "cpu")


def weighted_cross_entropy(logits: Tensor, target: Tensor, weights: Tensor, label_smoothing: float) -> Tensor:
    """Sum of w_i * CE_i over sum of w_i: class-balance and synthetic weights in one normalised loss."""
    per_image = F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing, reduction="none")
    return (per_image * weights).sum() / weights.sum().clamp_min(1e-12)


class ClassifierTrainer:
    """One training run; `run()` trains (or resumes) and writes the output folder."""

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike, *, resume: str | None = None,
                 overwrite: bool = False) -> None:
        from accelerate.utils import set_seed

        from lesiongen.utils.distributed import stage_accelerator

        if not config.manifest:
            raise InputError("--manifest is required (the real manifest with train and val splits)")
        self.config, self.out_dir = config, Path(out_dir)
        mixed_precision = resolve_mixed_precision(config.mixed_precision, _launch_device())
        self.accelerator = stage_accelerator(mixed_precision=mixed_precision,
                                             gradient_accumulation_steps=config.grad_accum)
        self.checkpoint = resolve_resume(self.out_dir, resume) if resume else None
        if self.checkpoint is not None:
            check_checkpoint(self.checkpoint, resume)
            check_process_count(self.checkpoint, self.accelerator.num_processes)
        self.output = self._check_out_dir(resume, overwrite)
        set_seed(config.seed, device_specific=True)  # different augmentation per process, same per seed
        if self.accelerator.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every batch has the same shape
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else None
        self.best_val_probs: Tensor | None = None  # gathered validation probabilities of the best epoch

    # ------------------------------------------------------------------ setup

    def _check_out_dir(self, resume: str | None, overwrite: bool) -> OutputFolder | None:
        """Refuses (on every process) a folder of other outputs, and replacing results without --overwrite."""
        if self.checkpoint is not None:
            return None
        output = OutputFolder(self.out_dir, "classifier")
        # A run resumed before its first checkpoint starts over; otherwise results need --overwrite.
        if output.existing and not (overwrite or resume):
            hint = "pass --overwrite to replace it"
            if list_checkpoints(self.out_dir):
                hint = ("it holds checkpoints: pass --resume latest to continue its training, "
                        "or --overwrite to start again")
            raise OutputExistsError(f"training output {self.out_dir} already exists; {hint}")
        return output

    def _start_out_dir(self) -> None:
        """Called once the inputs are validated, so a refused run leaves nothing behind."""
        from lesiongen.utils.atomic import remove_temporaries
        from lesiongen.utils.outdir import write_marker

        acc = self.accelerator
        with together(acc):  # a refused or unwritable --out stops every process
            if acc.is_main_process:
                if self.output is not None:
                    self.output.start(replace=True)  # a fresh start: an earlier run's results go
                    record_inputs(self.out_dir, self.inputs)
                else:  # resumed: unfinished again until training completes
                    write_marker(self.out_dir, "classifier", complete=False)
                    remove_temporaries(self.out_dir)  # e.g. the evaluation folder a kill -9 stopped writing
                # Rewritten on resume too: a copied or moved run names its inputs by their new paths.
                save_config(self.config, self.out_dir / CONFIG_FILE)

    def setup(self) -> None:
        """Validate the inputs, create the model, decode the data, and prepare everything with accelerate."""
        from lesiongen.data.manifest import load_manifest
        from lesiongen.utils.cache import cache_root

        cfg, acc = self.config, self.accelerator
        cache = self.cache_dir or cache_root()
        manifest = load_manifest(cfg.manifest)
        # Synthetic sets are keyed by position, not path: a run copied or moved elsewhere names them by other
        # paths and must still be checked against what it started from.
        self.inputs = file_hashes({"--manifest": cfg.manifest,
                                   **{f"--synthetic #{i}": s for i, s in enumerate(cfg.synthetic, start=1)}})
        if self.checkpoint is not None:
            refuse_changed_inputs(self.out_dir, self.inputs, action=f"--resume {self.checkpoint.name}",
                                  fix="resuming would continue a model trained on other data; start a new --out, "
                                      "or pass --overwrite to train again")
        self.val_rows = real_split(manifest, "val")
        real_split(manifest, "train")
        table = training_table(manifest, load_synthetic(cfg.synthetic, manifest), cfg)
        self.selection = selection_rows(self.val_rows, table, cfg.selection, cfg.selection_reserve)
        check_arch(cfg.arch)  # every process fails fast, before the slow part below
        with acc.main_process_first():  # the first process converts weights and decodes; the others read caches
            model = create_classifier(cfg.arch, len(manifest.classes), cfg.pretrained, drop_rate=cfg.drop_rate,
                                      drop_path_rate=cfg.drop_path_rate, cache_dir=cache)
            train = decode(table.rows["path"].tolist(), table.rows["label_index"].to_numpy(), cfg.decode_size,
                           table.rows["weight"].to_numpy(), cache_dir=cache / "images")
            val = decode(self.val_rows.image_paths(), self.val_rows.label_indices(), cfg.decode_size,
                         cache_dir=cache / "images")
        self.train_data, self.val_data = train.to(acc.device), val.to(acc.device)
        self.info = self._describe(model, manifest.classes, table.summary)
        self._announce_data_rules()
        self.spec = ClinicalSpec.default_for(manifest.classes)
        self.class_loss_weight = balance_weights(table.class_counts(), cfg.loss_balance).to(acc.device)
        self.augment = DeviceAugment(cfg.augment, cfg.img_size)
        self._prepare(model, training_sampler(table, cfg))

    def _describe(self, model: torch.nn.Module, classes: list[str], data_summary: dict) -> ClassifierInfo:
        cfg, acc = self.config, self.accelerator
        mean, std = data_config(model)
        return ClassifierInfo(
            arch=cfg.arch, classes=list(classes), img_size=cfg.img_size, mean=mean, std=std, load_size=cfg.load_size,
            color_constancy=cfg.color_constancy, tta=cfg.tta, num_features=model.num_features,
            pretrained=cfg.pretrained,
            training={"data": data_summary, "selection": self.selection.summary, "num_processes": acc.num_processes,
                      "effective_batch_size": cfg.batch_size * acc.num_processes * cfg.grad_accum,
                      "mixed_precision": acc.mixed_precision, "config": to_dict(cfg)})

    def _describe_restored_best(self) -> None:
        """A best model from before the resume keeps its scores, but its description names the files this run
        reads now (a copied run's new paths; their content is checked unchanged)."""
        if not (self.out_dir / INFO_FILE).is_file():
            return
        saved = ClassifierInfo.read(self.out_dir)
        current = {key: self.info.training[key] for key in ("data", "config")}
        write_json(self.out_dir / INFO_FILE, replace(saved, training={**saved.training, **current}).to_dict())

    def _announce_data_rules(self) -> None:
        """Say which synthetic rows do not train and which validation rows do not select the model."""
        left_out = self.info.training["data"]["synthetic_outside_splits"]
        if left_out:
            self.accelerator.print(f"warning: {left_out} synthetic rows belong to splits outside synthetic_splits "
                                   f"{self.config.synthetic_splits} and do not train (their sources' split)")
        for warning in self.info.training["data"]["leakage_warnings"]:
            self.accelerator.print(f"WARNING: {warning}")
        summary = self.selection.summary
        if summary.get("note"):
            self.accelerator.print(f"warning: {summary['note']}")
        elif summary["rule"] == "reserved":
            self.accelerator.print(
                f"model selection on the selection reserve: {summary['reserved_lesions']} validation lesions "
                f"({summary['rows']} of {len(self.selection.mask)} images, share {summary['reserve_share']:g}), "
                f"none of them a source of the synthetic training images")
        elif summary["source_lesions"]:
            missing = summary["classes_without_rows"]
            self.accelerator.print(
                f"{summary['source_lesions']} validation lesions ({summary['source_rows']} images) are sources of "
                f"synthetic training images; model selection on {summary['rows']} of {len(self.selection.mask)} "
                f"validation images (selection: {summary['rule']})"
                + (f"; no validation image of {', '.join(missing)} is left" if missing else ""))

    def _prepare(self, model: torch.nn.Module, sampler) -> None:
        """Loaders, optimizer and one-cycle schedule, wrapped by accelerate (DDP, mixed precision)."""
        cfg, acc = self.config, self.accelerator
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        full_batches = len(sampler) >= cfg.batch_size * acc.num_processes
        loader = DataLoader(IndexDataset(len(sampler)), batch_size=cfg.batch_size, sampler=sampler,
                            drop_last=full_batches,  # a batch of one breaks batch norm
                            pin_memory=acc.device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed))  # never touch the global RNG
        # `training_batch` moves the positions itself, without blocking: accelerate's placement copies
        # them synchronously, which would drain the GPU's queue once per step.
        self.train_loader = acc.prepare_data_loader(loader, device_placement=False)
        self.val_loader = evaluation_loader(acc, len(self.val_data), cfg.eval_batch_size)
        optimizer = self._optimizer(model)
        steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=cfg.warmup_pct)
        if cfg.compile:
            model = torch.compile(model)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)  # stepped by hand, once per optimizer step

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        from timm.optim import param_groups_weight_decay

        groups = param_groups_weight_decay(model, self.config.weight_decay)  # no decay on norms and biases
        fused = self.accelerator.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=self.config.lr, fused=fused)

    # ------------------------------------------------------------------ steps

    def training_batch(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        data, cfg = self.train_data, self.config
        index = index.to(data.images.device, non_blocking=True)
        images = to_unit_float(data.images[index])
        if cfg.color_constancy:
            images = shades_of_gray(images, cfg.color_constancy)
        images = normalize(self.augment(images), self.info.mean, self.info.std)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = data.labels[index]
        return images, labels, self.class_loss_weight[labels] * data.weights[index]

    def train_step(self, index: Tensor) -> Tensor:
        """One batch of positions: gathered and augmented on the device, then `optimize`; returns the loss."""
        return self.optimize(*self.training_batch(index))

    def optimize(self, images: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
        """Forward, backward and (at accumulation boundaries) an optimizer step on a prepared batch."""
        acc, cfg = self.accelerator, self.config
        with acc.accumulate(self.model):
            loss = weighted_cross_entropy(self.model(images), labels, weights, cfg.label_smoothing)
            acc.backward(loss)
            if cfg.grad_clip and acc.sync_gradients:
                acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def average_buffers(self) -> None:
        """Average batch-norm statistics over the processes (timm's `distribute_bn`).

        DDP keeps one copy of every buffer per process and each copy last saw its own process's batch, so
        without this every process would score its validation shard with a slightly different model from
        the one the main process saves.
        """
        if self.accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        for buffer in self.accelerator.unwrap_model(self.model).buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)  # gloo has no AVG
                buffer.div_(self.accelerator.num_processes)

    def validate(self) -> tuple[dict[str, float], Tensor]:
        """The clinical panel and loss on the selection rows of the validation split (with the balanced
        accuracy on every row and on the lesions no synthetic image came from beside it, when those differ),
        from predictions gathered over all processes; returns the probabilities of every validation row."""
        self.average_buffers()
        model = self.accelerator.unwrap_model(self.model)
        probs = predict_distributed(self.accelerator, model, self.info, self.val_data.images, loader=self.val_loader)
        model.train()
        labels = self.val_data.labels.cpu()
        every = _panel(probs, labels, self.spec)
        mask, unseen = self.selection.mask, self.selection.unseen
        unseen_differs = unseen.any() and not unseen.all()
        if mask.all() and not unseen_differs:  # no second set to score
            return every, probs
        selected = every if mask.all() else _panel(probs, labels, self.spec, torch.from_numpy(mask))
        metrics = {**selected, "all_balanced_accuracy": every["balanced_accuracy"]}
        if unseen_differs:
            clean = selected if (unseen == mask).all() else _panel(probs, labels, self.spec, torch.from_numpy(unseen))
            metrics["unseen_balanced_accuracy"] = clean["balanced_accuracy"]
        return metrics, probs

    # ------------------------------------------------------------------ loop

    def run(self) -> TrainResult:
        self.setup()
        self._start_out_dir()
        if self.output is None:
            return self._train()
        # A fresh run that fails before its first checkpoint leaves no folder to block the corrected rerun.
        with self.output.removed_on_failure(lambda path: bool(list_checkpoints(path)),
                                            active=self.accelerator.is_main_process):
            return self._train()

    def _train(self) -> TrainResult:
        from tqdm.auto import tqdm

        from lesiongen.utils.outdir import mark_complete

        acc, cfg = self.accelerator, self.config
        state = TrainerState()
        if self.checkpoint is not None:
            acc.load_state(str(self.checkpoint))
            state = TrainerState.read(self.checkpoint)
            if acc.is_main_process:
                restore_best(self.checkpoint, self.out_dir)
                self._describe_restored_best()
            acc.print(f"resumed from {self.checkpoint} (epoch {state.epoch + 1}, step {state.global_step})")
        total_steps = cfg.epochs * math.ceil(len(self.train_loader) / cfg.grad_accum)
        progress = tqdm(total=total_steps, initial=state.global_step, desc="train-classifier",
                        disable=not acc.is_local_main_process, dynamic_ncols=True)
        self.model.train()
        while not state.finished:
            train_loss = self._train_epoch(state, progress)
            self._end_epoch(state, train_loss)
            self._save_checkpoint(state)
        progress.close()
        self._final_evaluation()
        if acc.is_main_process:
            mark_complete(self.out_dir)  # the model files are final now (evaluate no longer warns)
        return TrainResult(self.out_dir, state.best_epoch + 1, state.best_score, len(state.history),
                           state.stopped_early, acc.num_processes, acc.is_main_process)

    def _train_epoch(self, state: TrainerState, progress) -> float:
        """The rest of epoch `state.epoch` (all of it unless resumed mid-epoch); returns its mean loss."""
        acc, cfg = self.accelerator, self.config
        self.train_loader.set_epoch(state.epoch)
        loader = self.train_loader
        if state.batches_done:  # resumed mid-epoch: the same sampler order, minus what was trained on
            loader = acc.skip_first_batches(self.train_loader, state.batches_done)
            loader.set_epoch(state.epoch)
        loss_sum = torch.tensor(state.epoch_loss_sum, device=acc.device)
        for index in loader:
            loss_sum += self.train_step(index)
            state.batches_done += 1
            if not acc.sync_gradients:
                continue
            self.scheduler.step()
            state.global_step += 1
            progress.update(1)
            if state.global_step % LOSS_DISPLAY_EVERY == 0:  # reading the loss waits for the GPU
                progress.set_postfix(loss=f"{float(loss_sum) / state.batches_done:.4f}", refresh=False)
            mid_epoch = state.batches_done < len(self.train_loader)
            if mid_epoch and cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0:
                self._stop_if_diverged(state, loss_sum)
                state.epoch_loss_sum = float(loss_sum)
                self._save_checkpoint(state)
        self._stop_if_diverged(state, loss_sum)  # before validation could save a NaN model as the best
        return float(acc.reduce(loss_sum / max(state.batches_done, 1), reduction="mean"))

    def _stop_if_diverged(self, state: TrainerState, loss_sum: Tensor) -> None:
        """Before anything is saved: the epoch's running loss and the weights must be finite on every process.
        The sum carries any NaN step to here; the weights catch an update that overflowed after a finite loss.
        One device sync, at checkpoints and epoch ends only; every process reaches it at the same step."""
        acc, cfg = self.accelerator, self.config
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        weights_finite = torch.stack([t.detach().isfinite().all() for t in tensors if t.is_floating_point()]).all()
        bad = acc.reduce(torch.stack([~loss_sum.isfinite(), ~weights_finite]).float(), reduction="sum").cpu()
        if not bad.any():
            return
        what = "the training loss" if bad[0] else "the weights"
        left = list_checkpoints(self.out_dir)
        # A fresh run with no checkpoint yet is removed on the way out (`run`), so needs no --overwrite.
        kept = (f"{left[-1].name} in {self.out_dir} is the last checkpoint, from before it" if left
                else "no checkpoint was saved before it")
        best = f"; {MODEL_FILE} holds the best epoch so far ({state.best_epoch + 1})" if state.best_epoch >= 0 else ""
        raise shared(TrainingDivergedError(  # every process judged the same reduced values: said once
            f"training diverged: {what} became NaN or infinite in epoch {state.epoch + 1} (by step "
            f"{state.global_step}); {kept}{best}. Start again with a lower --lr (now {cfg.lr})"
            f"{' and --overwrite' if left else ''}, or use bf16 instead of fp16"))

    def _save_checkpoint(self, state: TrainerState) -> None:
        best = [self.out_dir / MODEL_FILE, self.out_dir / INFO_FILE] if state.best_epoch >= 0 else []
        save_checkpoint(self.accelerator, self.out_dir, state, self.config.checkpoints_total_limit, best)

    def _end_epoch(self, state: TrainerState, train_loss: float) -> None:
        acc, cfg = self.accelerator, self.config
        metrics, probs = self.validate()
        score = metrics["balanced_accuracy"]  # identical on every process: computed from gathered predictions
        improved = improves(score, metrics["loss"], state)
        if improved:
            state.best_score, state.best_epoch, state.epochs_without_improvement = score, state.epoch, 0
            state.best_loss = metrics["loss"]
            self.best_val_probs = probs
            best_info = replace(self.info, training={**self.info.training, "best_epoch": state.epoch + 1,
                                                     "val_balanced_accuracy": score,
                                                     "val_unseen_balanced_accuracy": metrics.get(
                                                         "unseen_balanced_accuracy")})
        else:
            state.epochs_without_improvement += 1
        row = {"epoch": state.epoch + 1, "step": state.global_step, "lr": self.scheduler.get_last_lr()[0],
               "train_loss": train_loss, **{f"val_{k}": v for k, v in metrics.items()}}
        state.history.append(row)
        others = [f"{metrics[key]:.4f} {what}" for key, what in (
            ("unseen_balanced_accuracy", "on the lesions no synthetic image came from"),
            ("all_balanced_accuracy", "on all")) if key in metrics]
        acc.print(f"epoch {state.epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, val loss {metrics['loss']:.4f}, "
                  f"val balanced accuracy {score:.4f}"
                  f"{' on the selection reserve' if self.selection.summary['rule'] == 'reserved' else ''}"
                  f"{' (best)' if improved else ''}" + (f" ({', '.join(others)})" if others else ""))
        with together(acc):  # the best model and the history are written: a full disk stops every process
            if acc.is_main_process:
                if improved:
                    save_classifier(acc.unwrap_model(self.model, keep_torch_compile=False), best_info, self.out_dir)
                with atomic_path(self.out_dir / HISTORY_FILE) as tmp:
                    pd.DataFrame(state.history).to_csv(tmp, index=False)
        state.epoch += 1
        state.batches_done, state.epoch_loss_sum = 0, 0.0
        patience = cfg.early_stopping_patience
        state.stopped_early = patience is not None and state.epochs_without_improvement >= patience
        state.finished = state.epoch >= cfg.epochs or state.stopped_early
        if state.stopped_early:
            acc.print(f"early stop: no better val balanced accuracy for {patience} epochs")

    def _final_evaluation(self) -> None:
        """The best model on the validation split, gathered over all processes, as `evaluate` writes it."""
        from safetensors.torch import load_file

        from lesiongen.classifier.evaluate import BootstrapSettings, Evaluation, evaluation_meta, write_evaluation

        acc = self.accelerator
        acc.wait_for_everyone()
        probs = self.best_val_probs
        if probs is None:  # the best epoch was before a resume: score the saved best model again
            model = acc.unwrap_model(self.model, keep_torch_compile=False)  # the saved keys have no _orig_mod.
            model.load_state_dict(load_file(str(self.out_dir / MODEL_FILE)))  # copied onto the device
            probs = predict_distributed(acc, model, self.info, self.val_data.images, loader=self.val_loader)
        with together(acc):
            if acc.is_main_process:
                meta = evaluation_meta(self.config.manifest, "val", self.info.classes, str(self.out_dir))
                evaluation = Evaluation(self.val_rows.df, probs, self.val_data.labels.cpu(), self.info.classes, meta,
                                        selection_mask=self.selection.mask,
                                        selection_rule=self.selection.summary["rule"])
                # Validation selects the model; intervals belong to `lesiongen evaluate` on the test split.
                write_evaluation(evaluation, self.out_dir / EVAL_DIR, BootstrapSettings(n_resamples=0), overwrite=True)


def improves(score: float, loss: float, state: TrainerState) -> bool:
    """A better validation balanced accuracy; a tie (common on a small selection set) goes to the lower
    validation loss rather than to the earlier epoch."""
    return score > state.best_score or (score == state.best_score and loss < state.best_loss)


def _panel(probs: Tensor, labels: Tensor, spec: ClinicalSpec, rows: Tensor | None = None) -> dict[str, float]:
    if rows is not None:
        probs, labels = probs[rows], labels[rows]
    metrics = clinical_metrics(probs.double(), labels, spec)
    metrics["loss"] = float(-probs[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean())
    return metrics


def train_classifier(config: TrainConfig, out_dir: str | os.PathLike, *, resume: str | None = None,
                     overwrite: bool = False) -> TrainResult:
    return ClassifierTrainer(config, out_dir, resume=resume, overwrite=overwrite).run()
