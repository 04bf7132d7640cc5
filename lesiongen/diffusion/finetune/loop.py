"""The fine-tuning loop (accelerate): noise-prediction loss on cached latents, checkpoints, validation.

Per optimizer step: `grad_accum` micro-batches, each drawn class-balanced from generators seeded by
(seed, step, micro-batch, process); latents from the cache (or the VAE), text states from the cache
when nothing on the text side trains; min-SNR-weighted MSE; then the frozen token rows are restored and
the EMA updated. Losses stay on the device and are checked for NaN / inf every `log_every` steps and
before every checkpoint (one synchronisation instead of one per step), so a diverged run stops with
its last good checkpoint intact (the one that already holds the diverged weights is set aside).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lesiongen.data.prompts import PromptSet, load_prompts
from lesiongen.diffusion.captions import CaptionSampler
from lesiongen.diffusion.finetune.config import FinetuneConfig
from lesiongen.diffusion.finetune.data import (
    CachedLatents,
    EncodedLatents,
    ImageSource,
    StepRandomness,
    TrainingSet,
    draw_batch,
    flip_variants,
)
from lesiongen.diffusion.finetune.models import TrainableModels
from lesiongen.diffusion.resolution import check_resolution
from lesiongen.diffusion.text import CachedPromptEncoder, encode, tokenize
from lesiongen.errors import TrainingDivergedError
from lesiongen.utils import checkpoints
from lesiongen.utils.distributed import shared, together

logger = logging.getLogger(__name__)


# What a checkpoint holds besides accelerate's optimizer / scheduler / RNG state: only what trains (LoRA,
# learned token rows, or the UNet for `full`), not accelerate's copy of every prepared model.
TRAINABLE_FILE = "trainable.safetensors"

def resolve_precision(setting: str, *, text_side_trains: bool = False) -> tuple[str, torch.dtype]:
    """accelerate's mixed-precision name and the dtype frozen weights run in (`text_side_trains`: class
    tokens or a text-encoder LoRA learn, so fp32 embeddings meet the bf16 text encoder)."""
    from lesiongen.errors import InputError

    if not torch.cuda.is_available():
        if setting == "fp16":  # CPU fp16 convolutions fail mid-run
            raise InputError("--mixed-precision fp16 needs a CUDA GPU; use no on this device "
                             "(or bf16 with --method lora)")
        if setting == "bf16" and text_side_trains:
            # CUDA autocast runs layer_norm in fp32; CPU autocast leaves it to the bf16 weights, which then
            # meet the fp32 token embeddings at the first step ("mixed dtype (CPU)")
            raise InputError("--mixed-precision bf16 on the CPU trains only the UNet's LoRA (--method lora "
                             "without --text-encoder-lora); use --mixed-precision no to train class tokens here")
    if setting == "auto":
        if not torch.cuda.is_available():
            setting = "no"
        else:
            setting = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return setting, {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[setting]


def diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, states: torch.Tensor, rng: StepRandomness, *,
                   snr_gamma: float | None, noise_offset: float) -> torch.Tensor:
    """The denoising loss at random timesteps, min-SNR weighted (Hang et al. 2023) when `snr_gamma` is set."""
    from diffusers.training_utils import compute_snr

    batch, channels = latents.shape[:2]
    device = latents.device
    noise = torch.randn(latents.shape, generator=rng.device, device=device, dtype=latents.dtype)
    if noise_offset:  # lets the model change the mean brightness of an image (Guttenberg 2023)
        noise = noise + noise_offset * torch.randn((batch, channels, 1, 1), generator=rng.device, device=device,
                                                   dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=rng.device,
                              device=device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, states, return_dict=False)[0]
    per_sample = (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return per_sample.mean()
    snr = compute_snr(noise_scheduler, timesteps)
    weights = snr.clamp(max=snr_gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    return (per_sample * weights).mean()


@dataclass
class TrainerState:
    """What `trainer_state.json` holds in every checkpoint."""

    step: int = 0
    losses: list[dict] = field(default_factory=list)  # {"step", "loss", "lr"} per logging interval


class Trainer:
    """Set up with `setup()`, then `train()`; `run_steps(n)` runs bare steps (benchmarks)."""

    def __init__(self, config: FinetuneConfig, *, resume: str | None = None) -> None:
        self.config = config
        self.out_dir = Path(config.out)
        self.resume = resume
        self.state = TrainerState()
        self.resumed_from: int | None = None  # step of the checkpoint this run started from
        self._pending: list[tuple[int, torch.Tensor]] = []

    # ----------------------------------------------------------------------------------------- setup
    def setup(self) -> Trainer:
        from accelerate.utils import set_seed
        from diffusers import DDPMScheduler

        from lesiongen.diffusion.fingerprint import pipeline_hash
        from lesiongen.diffusion.info import native_resolution
        from lesiongen.diffusion.loading import load_pipeline
        from lesiongen.utils.distributed import stage_accelerator

        config = self.config
        set_seed(config.seed)  # LoRA initialisation and dropout draw from the global generators
        self.prompts: PromptSet = load_prompts(config.prompts)
        self.data = TrainingSet.from_manifest(config.manifest, self.prompts)  # fail fast, before the base loads
        self.captions = CaptionSampler(self.prompts, self.data.labels, self.data.rows, config.caption_dropout)
        precision, self.weight_dtype = resolve_precision(config.mixed_precision,
                                                          text_side_trains=not config.text_side_frozen)
        self.accelerator = stage_accelerator(mixed_precision=precision, gradient_accumulation_steps=config.grad_accum,
                                             log_with="tensorboard" if config.tensorboard else None,
                                             project_dir=str(self.out_dir))
        self.pipe = load_pipeline(config.base, allow_pickle=config.allow_pickle)
        self.pipe.set_progress_bar_config(disable=True)
        self.base_hash = pipeline_hash(config.base)
        self.resolution = check_resolution(self.pipe, config.resolution or native_resolution(self.pipe),
                                           where=config.base)
        self.models = TrainableModels.setup(self.pipe, config, self.prompts, weight_dtype=self.weight_dtype,
                                            where=config.base)
        device = self.accelerator.device
        self.pipe.to(device)
        if device.type == "cuda":  # tensor-core friendly layouts; same function up to rounding
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            self.pipe.unet.to(memory_format=torch.channels_last)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.variants = flip_variants(config.augment)
        self.weights = self.data.sample_weights(config.class_balance)
        self.latents = self._latent_source()
        self.cached_text = (CachedPromptEncoder(self.pipe, dtype=self.weight_dtype)
                            if config.text_side_frozen and config.cache_text else None)
        self._setup_optimization()
        if self.resume:
            self._resume()
        return self

    def _latent_source(self):
        config, device = self.config, self.accelerator.device
        if not config.cache_latents:
            images = ImageSource(self.data.paths, self.resolution, keep=True)
            return EncodedLatents(self.pipe.vae, images, self.variants)
        from safetensors.torch import load_file, save_file

        from lesiongen.utils.atomic import atomic_path

        key = self.data.fingerprint(self.resolution, self.variants, self.base_hash, str(self.weight_dtype))
        cache_file = self.out_dir / "cache" / f"latents-{key}.safetensors"  # removed when training ends
        with together(self.accelerator):  # an unreadable image stops every process
            if self.accelerator.is_main_process and not cache_file.is_file():
                logger.info("encoding %d images x %d flips into %s", len(self.data), len(self.variants), cache_file)
                source = ImageSource(self.data.paths, self.resolution, keep=False)
                cached = CachedLatents.encode(self.pipe.vae, source, self.variants, dtype=self.weight_dtype)
                with atomic_path(cache_file) as tmp:
                    save_file({k: v.contiguous().cpu() for k, v in cached.state_dict().items()}, str(tmp))
        return CachedLatents.from_state_dict(load_file(str(cache_file)), device)

    def _setup_optimization(self) -> None:
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        config, accelerator = self.config, self.accelerator
        fused = accelerator.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.models.parameter_groups, fused=fused)
        # accelerate steps a prepared scheduler once per process per optimizer step.
        self.lr_scheduler = get_scheduler(config.lr_scheduler, self.optimizer,
                                          num_warmup_steps=config.warmup_steps * accelerator.num_processes,
                                          num_training_steps=config.steps * accelerator.num_processes)
        trainable = self.models.trainable_models
        prepared = accelerator.prepare(*trainable, self.optimizer, self.lr_scheduler)
        *prepared_models, self.optimizer, self.lr_scheduler = prepared
        forward = dict(zip((id(m) for m in trainable), prepared_models, strict=True))
        self.unet_forward = forward.get(id(self.pipe.unet), self.pipe.unet)
        self.text_forward = forward.get(id(self.pipe.text_encoder), self.pipe.text_encoder)
        self.trainable_forward = prepared_models
        compile_unet = config.compile if config.compile is not None else accelerator.device.type == "cuda"
        if compile_unet:
            self.unet_forward = torch.compile(self.unet_forward)
        self.ema = None
        if config.ema:
            self.ema = EMAModel(self.models.parameters, decay=config.ema_decay, foreach=fused)
            accelerator.register_for_checkpointing(self.ema)
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)
        for model in prepared_models:
            model.train()
        if config.tensorboard:
            accelerator.init_trackers("lesiongen-finetune")

    def _save_hook(self, models, weights, output_dir) -> None:
        """Checkpoints hold only what trains, not accelerate's copy of every prepared model's weights."""
        from lesiongen.diffusion.lora_files import write_safetensors

        weights.clear()
        if self.accelerator.is_main_process:
            write_safetensors(Path(output_dir) / TRAINABLE_FILE, self.models.state_dict(), {})

    def _load_hook(self, models, input_dir) -> None:
        from lesiongen.diffusion.lora_files import read_tensors

        models.clear()
        self.models.load_state_dict(read_tensors(Path(input_dir) / TRAINABLE_FILE))

    def _resume(self) -> None:
        checkpoint = checkpoints.resolve_resume(self.out_dir, self.resume)
        if checkpoint is None:
            logger.info("no checkpoint in %s yet: starting from step 0", self.out_dir)
            return
        checkpoints.check_process_count(checkpoint, self.accelerator.num_processes)
        self.accelerator.load_state(str(checkpoint))
        self._apply_learning_rates()
        self.state = TrainerState(**checkpoints.read_state(checkpoint))
        self.resumed_from = self.state.step
        logger.info("resumed from %s (step %d)", checkpoint, self.state.step)

    def _apply_learning_rates(self) -> None:
        """A resumed run trains at the configured peak rates (a lower --lr after a divergence, say), not the
        ones the checkpoint's optimizer and schedule were saved with; the schedule keeps its position."""
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate wraps it
        peaks = [group["lr"] for group in self.models.parameter_groups]
        factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
        scheduler.base_lrs = list(peaks)
        for group, peak, factor in zip(self.optimizer.param_groups, peaks, factors, strict=True):
            group["initial_lr"], group["lr"] = peak, peak * factor
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # ------------------------------------------------------------------------------------------ steps
    def text_states(self, captions: list[str]) -> torch.Tensor:
        if self.cached_text is not None:
            return self.cached_text(captions)
        return encode(self.text_forward, tokenize(self.pipe, captions), self.accelerator.device)

    def micro_step(self, step: int, micro: int) -> torch.Tensor:
        config = self.config
        rng = StepRandomness.at(config.seed, step, micro, self.accelerator.process_index, self.accelerator.device)
        indices, variants = draw_batch(self.weights, config.batch_size, len(self.variants), rng)
        latents = self.latents(indices, variants, rng)
        captions = self.captions.batch(indices.tolist(), rng.python)
        with self.accelerator.autocast():
            states = self.text_states(captions)
            return diffusion_loss(self.unet_forward, self.noise_scheduler, latents, states, rng,
                                  snr_gamma=config.snr_gamma, noise_offset=config.noise_offset)

    def optimizer_step(self, step: int) -> torch.Tensor:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss (on the device)."""
        accelerator, losses = self.accelerator, []
        for micro in range(self.config.grad_accum):
            with accelerator.accumulate(*self.trainable_forward):
                loss = self.micro_step(step, micro)
                accelerator.backward(loss)
                if accelerator.sync_gradients and self.config.max_grad_norm:
                    accelerator.clip_grad_norm_(self.models.parameters, self.config.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        self.models.after_optimizer_step()
        if self.ema is not None:
            self.ema.step(self.models.parameters)
        return torch.stack(losses).mean()

    def run_steps(self, n: int) -> None:
        """`n` bare optimizer steps from the current one (no logging, checkpoints or validation)."""
        for _ in range(n):
            self.optimizer_step(self.state.step)
            self.state.step += 1

    # ------------------------------------------------------------------------------------------ train
    def train(self) -> TrainerState:
        config, accelerator = self.config, self.accelerator
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=self.state.step, desc="finetune", unit="step",
                   disable=not accelerator.is_main_process)
        last_checkpoint = self.resumed_from
        started, images = time.perf_counter(), 0
        while self.state.step < config.steps:
            step = self.state.step
            self._pending.append((step + 1, self.optimizer_step(step)))
            self.state.step = step + 1
            images += config.batch_size * config.grad_accum * accelerator.num_processes
            bar.update(1)
            done = self.state.step == config.steps
            if self.state.step % config.log_every == 0 or done:
                self._flush(last_checkpoint, images / (time.perf_counter() - started))
                bar.set_postfix(loss=f"{self.state.losses[-1]['loss']:.4f}")
            if self.state.step % config.checkpoint_every == 0 or done:
                self._flush(last_checkpoint)
                checkpoints.save_accelerate_checkpoint(accelerator, self.out_dir, self.state.step, vars(self.state),
                                                       config.checkpoint_limit)
                last_checkpoint = self.state.step
            if (config.validate_every and self.state.step % config.validate_every == 0) or done:
                self.validate()
        bar.close()
        # Only the trackers: `end_training()` also destroys the process group, which the export and the
        # loop's later stages still need under `accelerate launch`.
        for tracker in accelerator.trackers:
            tracker.finish()
        return self.state

    def _flush(self, last_checkpoint: int | None, images_per_second: float | None = None) -> None:
        """Check the pending losses of every process for NaN / inf (one device sync) and log their mean."""
        if not self._pending:
            return
        steps = [s for s, _ in self._pending]
        local = torch.stack([v for _, v in self._pending]).float()
        self._pending.clear()
        # Every process judges every process's losses: one that stopped alone would leave the others waiting
        # in the next gradient all-reduce until the collective's timeout.
        values = self.accelerator.gather(local).reshape(self.accelerator.num_processes, -1).cpu()
        bad = (~torch.isfinite(values)).any(0).nonzero()
        if len(bad):
            first = bad[0, 0].item()
            step, value = steps[first], values[:, first][~torch.isfinite(values[:, first])][0].item()
            good = self._set_aside_diverged_checkpoints(step)
            where = (f"{good.name} in {self.out_dir} is the last good checkpoint; resume from it with --resume "
                     "latest and a lower --lr" if good is not None else
                     "no checkpoint from before the divergence is left: start again with a lower --lr")
            raise shared(TrainingDivergedError(  # every process judged the same gathered losses: said once
                f"training diverged: the loss became {value} at step {step}; {where}. "
                f"Lower --lr (now {self.config.lr}), keep max_grad_norm set, or use bf16 instead of fp16"))
        entry = {"step": steps[-1], "loss": values.mean().item(), "lr": self.lr_scheduler.get_last_lr()[0]}
        if images_per_second is not None:
            entry["images_per_second"] = round(images_per_second, 2)
        self.state.losses.append(entry)
        if self.config.tensorboard:
            self.accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])

    def _set_aside_diverged_checkpoints(self, bad_step: int) -> Path | None:
        """`checkpoints.set_aside_diverged` on the main process; every process gets the newest one left."""
        with together(self.accelerator):  # every process reaches this at the same step (`_flush` gathers)
            if self.accelerator.is_main_process:
                checkpoints.set_aside_diverged(self.out_dir, bad_step)
        left = checkpoints.list_checkpoints(self.out_dir)
        return left[-1] if left else None

    # ------------------------------------------------------------------------------------- validation
    def validate(self) -> Path | None:
        """Save `validation/step-N.png` (EMA weights when EMA is on); other processes wait."""
        from lesiongen.diffusion.finetune.validation import render_validation_grid, save_grid

        path = self.out_dir / "validation" / f"step-{self.state.step:06d}.png"
        with together(self.accelerator):
            if self.accelerator.is_main_process:
                params = self.models.parameters
                if self.ema is not None:
                    self.ema.store(params)
                    self.ema.copy_to(params)
                for model in self.trainable_forward:
                    model.eval()
                try:
                    with self.accelerator.autocast():
                        grid = render_validation_grid(
                            self.pipe, self.prompts, images_per_class=self.config.validation_images_per_class,
                            steps=self.config.validation_steps, guidance=self.config.validation_guidance,
                            resolution=self.resolution, seed=self.config.seed)
                    save_grid(grid, path)
                finally:
                    for model in self.trainable_forward:
                        model.train()
                    if self.ema is not None:
                        self.ema.restore(params)
        return path

    def final_weights(self) -> None:
        """Put the weights to export in place (the EMA average when EMA is on)."""
        if self.ema is not None:
            self.ema.copy_to(self.models.parameters)
            self.models.after_optimizer_step()

