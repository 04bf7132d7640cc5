"""`base pretrain`: train the VAE, then the class-conditioned UNet, of an SD-format base from scratch.

Stage 1 fits the AutoencoderKL on the training images (L1 + KL, optional perceptual term). Its latents
are then cached once (every flip / rotation of every image, posterior mean and std) and the latent
scale factor is set from the data (1 / std, SD's convention) in the VAE config. Stage 2 trains the UNet
on those latents, conditioned on each class's prompt from the prompt file through the frozen CLIP text
encoder, with caption dropout (so classifier-free guidance works), Min-SNR weighting and an EMA copy.
The EMA UNet is what gets saved. The output folder is an ordinary diffusers pipeline, so `finetune`,
`generate` and inversion load it like any SD checkpoint.

Every random draw of a step comes from a generator seeded by (seed, stage, step), so a resumed run
draws what an uninterrupted one would have, without saving RNG states.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lesiongen.diffusion.pretrain import checkpoints as ckpt
from lesiongen.diffusion.pretrain.budget import StageFitter
from lesiongen.diffusion.pretrain.config import NOISE_SCHEDULES, PretrainConfig
from lesiongen.diffusion.pretrain.data import ClassImages, dihedral_by_position, load_class_images, to_model_range
from lesiongen.diffusion.pretrain.latents import LatentSet, cached_latents
from lesiongen.diffusion.pretrain.objectives import diffusion_target, loss_weights, lr_at
from lesiongen.errors import InputError, TrainingDivergedError
from lesiongen.utils.checkpoints import set_aside_diverged
from lesiongen.utils.device import resolve_device

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
CACHE_DIR = "cache"
_STAGE_IDS = {"vae": 1, "unet": 2}
_NO_BAD_STEP = 1 << 62  # `first_bad_step` while every loss so far was finite


@dataclasses.dataclass
class PretrainResult:
    out: Path
    finished: bool  # False when a time or step limit paused the run (resume with --resume latest)
    global_step: int
    metrics: dict


def step_generators(seed: int, stage: str, step: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(host, device) generators of one step: tensors are drawn where they are used (no host-to-GPU copy
    that would wait for the GPU), the few Python numbers (crop offsets) on the host."""
    base = seed * 1_000_003 + _STAGE_IDS[stage] * 100_000_007 + step
    return torch.Generator().manual_seed(base), torch.Generator(device=device).manual_seed(base ^ 0x5DEECE66D)


class Pretrainer:
    def __init__(self, config: PretrainConfig, manifest: Path, out: Path, log: Callable[[str], None] = print):
        from lesiongen.diffusion.build import build_components
        from lesiongen.diffusion.presets import get_preset

        self.config, self.manifest, self.out, self.log = config, Path(manifest), Path(out), log
        preset = get_preset(config.preset)
        if config.resolution is not None and config.resolution != preset.resolution:
            preset = dataclasses.replace(preset, resolution=config.resolution)
        self.preset = preset
        self.device = resolve_device(config.device)
        if self.device.type == "cpu" and config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        self.autocast_dtype = torch.bfloat16 if _use_bf16(config.mixed_precision, self.device) else None
        self.checkpoint_dtype = getattr(torch, config.checkpoint_dtype)
        components = build_components(preset, seed=config.seed)
        self.unet, self.vae, self.text_encoder = components["unet"], components["vae"], components["text_encoder"]
        self.tokenizer = components["tokenizer"]
        self.scheduler = type(components["scheduler"])(**{
            **preset.scheduler, **NOISE_SCHEDULES[config.unet.noise_schedule],
            "prediction_type": config.unet.prediction_type})
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(self.device)
        self.text_encoder.requires_grad_(False)
        ckpt.check_checkpoint_size(self._num_checkpoint_weights(), self.checkpoint_dtype, config.max_shard_mib,
                                   config.max_shards)
        self.data: ClassImages = load_class_images(self.manifest, config.split, preset.resolution,
                                                   cache_dir=config.cache_dir)
        self.class_prompts = self._class_prompts()
        if self.leakage_warning:
            self.log(f"WARNING: {self.leakage_warning}")
        self.images = self.data.images.to(self.device)
        self.labels = self.data.labels.to(self.device)
        self.state = ckpt.TrainerState()
        self.ema = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._resume_optimizer: dict | None = None
        self._resume_tensors: dict[str, torch.Tensor] = {}
        self.judge = None
        self._saved_at: int | None = None  # global step of the newest checkpoint on disk
        # Global step of the first NaN / infinite loss, kept on the device (no sync per step), read at log
        # steps and before every save.
        self._first_bad_step: torch.Tensor | None = None
        self._clock = time.monotonic()  # training seconds since this mark are not yet in state.elapsed_s

    # ----------------------------------------------------------------------------------------------- setup
    def _num_checkpoint_weights(self) -> int:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        ema = count(self.unet) if self.config.unet.ema_decay > 0 else 0
        return count(self.unet) + ema + count(self.vae) + count(self.text_encoder)

    def _class_prompts(self) -> list[str]:
        from lesiongen.data.prompts import load_prompts

        prompts = load_prompts(self.config.prompts)
        missing = [c for c in self.data.classes if c not in prompts.classes]
        if missing:
            raise InputError(f"{self.manifest}: classes {missing} have no entry in the prompt file {prompts.source}")
        return [prompts.class_prompt(c) for c in self.data.classes]

    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0].float()

    def restore(self, folder: Path) -> None:
        self.state = ckpt.TrainerState.read(folder)
        tensors = ckpt.load_checkpoint_tensors(folder)
        for name, module in (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder)):
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        if self.state.scaling_factor is not None:
            self.vae.register_to_config(scaling_factor=self.state.scaling_factor)
        self._resume_tensors = tensors
        self._saved_at = self.state.global_step
        self._resume_optimizer = ckpt.load_optimizer_state(folder, self.state) if self.config.save_optimizer else None
        note = "" if self._resume_optimizer is not None else " (no optimizer state: Adam moments restart)"
        self.log(f"resumed from {folder} at {self.state.stage} step {self.state.step}{note}")

    # ------------------------------------------------------------------------------------------- training
    def run(self, *, stop_after_steps: int | None = None, time_limit_s: float | None = None) -> PretrainResult:
        if self.is_finished():
            self.log(f"{self.out} is already a finished base ({self.state.global_step} steps); nothing to do")
            return PretrainResult(self.out, True, self.state.global_step, self.state.metrics)
        started, first_step = time.monotonic(), self.state.global_step
        self._clock = started

        def should_pause() -> bool:
            steps_run = self.state.global_step - first_step
            return ((stop_after_steps is not None and steps_run >= stop_after_steps)
                    or (time_limit_s is not None and time.monotonic() - started >= time_limit_s))

        if self.state.stage == "vae":
            if self._train_vae(should_pause):
                return self._pause()
            self._stop_if_diverged()  # before the latents of a broken VAE set the scale and fill the cache
            self.state.scaling_factor = self._latent_scaling_factor()
            self.vae.register_to_config(scaling_factor=self.state.scaling_factor)
            self.state.stage, self.state.step = "unet", 0
            self.log(f"VAE done; latent scaling factor {self.state.scaling_factor:.5f} (1 / std of the latents)")
            if self.config.eval_classifier:
                self.evaluate_vae()
            self._save()
        self._train_unet(should_pause)
        if self.state.step < self.stage_steps("unet"):
            return self._pause()
        return self._finish()

    def is_finished(self) -> bool:
        """Trained to the planned steps and written out (model_index.json is written last)."""
        return (self.state.stage == "unet" and self.state.step >= self.stage_steps("unet")
                and (self.out / "model_index.json").is_file())

    def stage_steps(self, stage: str) -> int:
        """The stage's step count: the one fitted to the time budget once planned, else the config's."""
        return self.state.planned_steps.get(stage, getattr(self.config, stage).steps)

    def _elapsed(self) -> float:
        """Training wall seconds of the whole run so far, earlier jobs included."""
        return self.state.elapsed_s + time.monotonic() - self._clock

    def _fitter(self, stage: str) -> StageFitter | None:
        """None without a time budget or once the stage is planned. The VAE gets `vae_budget_share` of
        the budget; the UNet what is left after the VAE and the latent cache."""
        budget = self.config.time_budget_minutes
        if budget is None or stage in self.state.planned_steps:
            return None
        share = self.config.vae_budget_share if stage == "vae" else 1.0
        return StageFitter(max_steps=getattr(self.config, stage).steps,
                           seconds_left=budget * 60 * share - self._elapsed(), device=self.device)

    def _plan(self, stage: str, fitter: StageFitter | None) -> StageFitter | None:
        """Feed the fitter the step just done; once it has a plan, store it and drop the fitter."""
        if fitter is None:
            return None
        planned = fitter.observe(self.state.step)
        if planned is None:
            return fitter
        self.state.planned_steps[stage] = planned
        self.log(f"time budget: {stage} planned at {planned} steps (config {getattr(self.config, stage).steps}), "
                 f"{self._elapsed() / 60:.1f} of {self.config.time_budget_minutes} min spent")
        return None

    def _train_vae(self, should_pause) -> bool:
        """Train until the stage's step count; True when paused before it."""
        cfg = self.config.vae
        self.vae.train()
        params = [p for p in self.vae.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        self._load_optimizer()
        perceptual = self._perceptual_features() if cfg.perceptual_weight > 0 else None
        fitter = self._fitter("vae")
        while self.state.step < self.stage_steps("vae"):
            if should_pause():
                return True
            host, gen = step_generators(self.config.seed, "vae", self.state.step, self.device)
            x = to_model_range(self._batch(host, gen, cfg.batch_size, crop=cfg.crop_size))
            _set_lr(self.optimizer, lr_at(self.state.step, self.stage_steps("vae"), cfg.learning_rate,
                                          cfg.warmup_steps))
            with self._autocast():
                posterior = self.vae.encode(x).latent_dist
                recon = self.vae.decode(posterior.sample(generator=gen)).sample.float()
            rec_loss = (recon - x).abs().mean()
            kl = posterior.kl().mean() / x[0].numel()
            loss = rec_loss + cfg.kl_weight * kl
            if perceptual is not None:
                loss = loss + cfg.perceptual_weight * F.mse_loss(perceptual(recon), perceptual(x))
            self._optimize(loss, params)
            self._after_step("vae", {"loss": loss.detach(), "l1": rec_loss.detach(), "kl": kl.detach()})
            fitter = self._plan("vae", fitter)
        self.vae.eval()
        return False

    def _train_unet(self, should_pause) -> None:
        from diffusers.training_utils import EMAModel

        cfg = self.config.unet
        self.vae.eval().requires_grad_(False)
        latent_set = self._latent_cache()
        row_weights = latent_set.row_weights(cfg.class_balance)
        text = self._encode_prompts(self.class_prompts)  # (C, 77, D)
        empty = self._encode_prompts([""])
        alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        params = [p for p in self.unet.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self._load_optimizer()
        if cfg.ema_decay > 0:
            self.ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
            self.ema.optimization_step = self.state.ema_step
            if any(k.startswith("ema_unet.") for k in self._resume_tensors):
                names = [n for n, _ in self.unet.named_parameters()]
                self.ema.shadow_params = [self._resume_tensors[f"ema_unet.{n}"].to(self.device, torch.float32)
                                          for n in names]
        model = torch.compile(self.unet) if self.config.compile else self.unet
        self.unet.train()
        scale = self.vae.config.scaling_factor
        fitter = self._fitter("unet")  # made after the latent cache, whose time the budget has paid
        self._evaluate_missed_step()
        while self.state.step < self.stage_steps("unet"):
            if should_pause():
                break
            _, gen = step_generators(self.config.seed, "unet", self.state.step, self.device)
            draw = {"generator": gen, "device": self.device}
            index = latent_set.draw(cfg.batch_size, row_weights, gen)
            eps = torch.randn((cfg.batch_size, *latent_set.mean.shape[1:]), **draw)
            latents = latent_set.sample(index, eps) * scale
            noise = torch.randn(latents.shape, **draw)
            timesteps = torch.randint(self.scheduler.config.num_train_timesteps, (cfg.batch_size,), **draw)
            drop = torch.rand(cfg.batch_size, **draw) < cfg.caption_dropout
            cond = torch.where(drop[:, None, None], empty, text[latent_set.label[index]])
            noisy = self.scheduler.add_noise(latents, noise, timesteps)
            target = diffusion_target(self.scheduler, latents, noise, timesteps, cfg.prediction_type)
            _set_lr(self.optimizer, lr_at(self.state.step, self.stage_steps("unet"), cfg.learning_rate,
                                          cfg.warmup_steps))
            with self._autocast():
                pred = model(noisy, timesteps, encoder_hidden_states=cond).sample.float()
            per_sample = (pred - target).square().mean(dim=(1, 2, 3))
            loss = (per_sample * loss_weights(alphas_cumprod, timesteps, cfg.prediction_type, cfg.min_snr_gamma)).mean()
            self._optimize(loss, params)
            if self.ema is not None:
                self.ema.step(params)
                self.state.ema_step = self.ema.optimization_step
            self._after_step("unet", {"loss": loss.detach()})
            fitter = self._plan("unet", fitter)
            if self.config.sample_every and self.state.step % self.config.sample_every == 0:
                self.evaluate(tag=f"step-{self.state.global_step:06d}")

    # -------------------------------------------------------------------------------------------- helpers
    def _batch(self, host: torch.Generator, gen: torch.Generator, batch_size: int,
               crop: int | None = None) -> torch.Tensor:
        index = torch.randint(len(self.images), (batch_size,), generator=gen, device=self.device)
        images = self.images[index]
        if self.config.augment:
            images = dihedral_by_position(images)
        if crop is not None and crop < images.shape[-1]:
            top, left = torch.randint(images.shape[-1] - crop + 1, (2,), generator=host).tolist()
            images = images[..., top:top + crop, left:left + crop]
        return images

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _optimize(self, loss: torch.Tensor, params: list) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.optimizer.step()

    def _load_optimizer(self) -> None:
        if self._resume_optimizer is not None and self.state.step > 0:
            self.optimizer.load_state_dict(self._resume_optimizer)
        self._resume_optimizer = None

    def _after_step(self, stage: str, losses: dict[str, torch.Tensor]) -> None:
        """Count the step; read the losses back from the device only when logging (a sync per step
        would cost small-model GPU runs a large share of their throughput)."""
        self.state.step += 1
        self.state.global_step += 1
        finite = torch.stack([v.float() for v in losses.values()]).isfinite().all()
        here = torch.where(finite, _NO_BAD_STEP, self.state.global_step)
        self._first_bad_step = here if self._first_bad_step is None else torch.minimum(self._first_bad_step, here)
        if self.state.step % self.config.log_every == 0 or self.state.step == 1:
            values = {k: v.item() for k, v in losses.items()}
            if not all(map(math.isfinite, values.values())):
                self._stop_if_diverged(check_weights=False)
            total = self.stage_steps(stage)
            shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
            self.log(f"{stage} step {self.state.step}/{total} {shown} lr {self.optimizer.param_groups[0]['lr']:.3g}")
            self._append_metrics({"stage": stage, "step": self.state.step, "global_step": self.state.global_step,
                                  **values})
        if self.state.global_step % self.config.checkpoint_every == 0:
            self._save()

    def _append_metrics(self, record: dict) -> None:
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, module in (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder)):
            tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        if self.ema is not None:
            names = [n for n, _ in self.unet.named_parameters()]
            tensors.update({f"ema_unet.{n}": p for n, p in zip(names, self.ema.shadow_params)})
        return tensors

    def _stop_if_diverged(self, *, check_weights: bool = True) -> None:
        """Nothing NaN or infinite reaches a checkpoint or the saved base: every loss since the start of this
        job, and (before a save) the weights, the EMA copy included, must be finite. On a divergence the
        checkpoints from the step before the first bad loss on are set aside (`checkpoint-N.diverged`)."""
        first_bad = int(self._first_bad_step.item()) if self._first_bad_step is not None else _NO_BAD_STEP
        weights_finite = not check_weights or self._weights_finite()
        if first_bad == _NO_BAD_STEP and weights_finite:
            return
        stage = self.state.stage
        if first_bad != _NO_BAD_STEP:
            what = f"the {stage} loss became NaN or infinite at step {first_bad}"
            kept = set_aside_diverged(self.out / ckpt.CHECKPOINTS_DIR, first_bad)
        else:  # a finite loss, then an update that overflowed: every checkpoint so far passed this check
            what = f"the {stage} weights became NaN or infinite by step {self.state.global_step}"
            left = ckpt.checkpoints_in(self.out)
            kept = left[-1] if left else None
        rate = getattr(self.config, stage).learning_rate
        fix = (f"Lower {stage}.learning_rate (now {rate:g}) in a YAML recipe, keep grad_clip set, or set "
               "mixed_precision: no")
        if kept is not None:
            where = (f"{kept.name} in {kept.parent} is the last good checkpoint. {fix}, and pass the recipe with "
                     "--config and --resume latest to continue from it")
        else:
            where = f"no checkpoint from before it is left. {fix}, and start again"
        raise TrainingDivergedError(f"training diverged: {what}; {where}")

    def _weights_finite(self) -> bool:
        tensors = [*self.unet.parameters(), *self.vae.parameters(), *(self.ema.shadow_params if self.ema else [])]
        return bool(torch.stack([t.detach().isfinite().all() for t in tensors]).all())

    def _save(self) -> Path | None:
        now = time.monotonic()
        self.state.elapsed_s += now - self._clock
        self._clock = now
        if self._saved_at == self.state.global_step:
            return None  # saved (and checked) at this step already
        self._stop_if_diverged()
        folder = ckpt.save_checkpoint(
            self.out, self.state, self._checkpoint_tensors(),
            optimizer=self.optimizer if self.config.save_optimizer and self.state.step > 0 else None,
            dtype=self.checkpoint_dtype, max_shard_mib=self.config.max_shard_mib,
            total_limit=self.config.checkpoints_total_limit)
        self._saved_at = self.state.global_step
        self.log(f"saved {folder}")
        return folder

    def _pause(self) -> PretrainResult:
        self._save()
        self.log(f"paused at {self.state.stage} step {self.state.step}; continue with --resume latest")
        return PretrainResult(self.out, False, self.state.global_step, self.state.metrics)

    def _perceptual_features(self):
        from lesiongen.classifier.models import load_classifier

        model, info = load_classifier(self.config.vae.perceptual_classifier, device=self.device)
        model.requires_grad_(False)
        mean = torch.tensor(info.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(info.std, device=self.device).view(1, 3, 1, 1)

        def features(x: torch.Tensor) -> torch.Tensor:
            x = F.interpolate((x + 1) / 2, size=info.img_size, mode="bilinear", align_corners=False)
            return model.forward_features((x - mean) / std)

        return features

    # -------------------------------------------------------------------------------------------- latents
    def _latent_cache(self) -> LatentSet:
        return cached_latents(self.vae, self.data, self.out / CACHE_DIR, augment=self.config.augment,
                              device=self.device, autocast=self._autocast)

    def _latent_scaling_factor(self) -> float:
        return self._latent_cache().scaling_factor()

    # ------------------------------------------------------------------------------------ samples / final
    def sample(self, *, per_class: int, seed_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """`per_class` images of every class (row-major by class), from the EMA weights when there are any."""
        from lesiongen.diffusion.pretrain.sampling import decode_latents, sample_latents

        classes = len(self.data.classes)
        labels = torch.arange(classes).repeat_interleave(per_class)
        seeds = [seed_offset + i for i in range(len(labels))]
        text = self._encode_prompts(self.class_prompts)
        with self._ema_weights():
            self.unet.eval()
            latents = sample_latents(
                self.unet, self.scheduler.config, text[labels.to(self.device)], self._encode_prompts([""]), seeds,
                steps=self.config.sample_steps, guidance_scale=self.config.guidance_scale,
                latent_shape=(self.unet.config.in_channels, self.preset.latent_size, self.preset.latent_size),
                autocast_dtype=self.autocast_dtype)
            self.unet.train()
        return decode_latents(self.vae, latents), labels

    @contextlib.contextmanager
    def _ema_weights(self):
        if self.ema is None:
            yield
            return
        params = list(self.unet.parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def _evaluate_missed_step(self) -> None:
        """A run resumed from a checkpoint written at a sampling step was stopped (or killed) between that
        checkpoint and its sample grid: make the grid now, or its step would be missing for good."""
        every, step = self.config.sample_every, self.state.step
        tag = f"step-{self.state.global_step:06d}"
        if every and step and step % every == 0 and not (self.out / SAMPLES_DIR / f"{tag}.png").is_file():
            self.evaluate(tag=tag)

    def evaluate(self, tag: str) -> dict:
        from lesiongen.diffusion.pretrain.sampling import save_grid

        images, labels = self.sample(per_class=self.config.samples_per_class)
        save_grid(images, len(self.data.classes), self.out / SAMPLES_DIR / f"{tag}.png", row_labels=self.data.classes)
        record: dict = {"stage": "eval", "global_step": self.state.global_step, "grid": f"{SAMPLES_DIR}/{tag}.png"}
        if self.config.eval_classifier:
            record.update(self._judge()(images, labels))
            fidelity = record["class_fidelity"]["overall"]
            distance = record.get("domain_distance")
            self.log(f"samples at step {self.state.global_step}: class fidelity {fidelity:.3f}"
                     + (f", domain distance {distance:.3g}" if distance is not None else ""))
        self.state.metrics = record
        self._append_metrics(record)
        return record

    @property
    def leakage_warning(self) -> str | None:
        """A base is meant to learn the training split; one that learned val or test images passes them on."""
        if self.config.split == "train":
            return None
        return (f"LEAKAGE: the base learns the '{self.config.split}' split of {self.manifest}; images it generates "
                f"can reproduce those images, so a classifier trained on them has no held-out "
                f"'{self.config.split}' score")

    def evaluate_vae(self, split: str = "val") -> dict | None:
        """How much class evidence survives the finished VAE, on held-out real images: the judge's balanced
        accuracy on their round trips, beside its accuracy on the originals (`SampleJudge.reconstruction`)."""
        if split == self.config.split:
            self.log(f"VAE class evidence not judged: the '{split}' split is the training split")
            return None
        try:
            held_out = load_class_images(self.manifest, split, self.preset.resolution, cache_dir=self.config.cache_dir)
        except InputError as err:
            self.log(f"VAE class evidence not judged: {err}")
            return None
        result = self._judge().reconstruction(self.vae.eval(), held_out.images, held_out.labels,
                                              autocast=self._autocast)
        kept, original = result["round_trip"]["balanced_accuracy"], result["original"]["balanced_accuracy"]
        self.log(f"VAE round trips of {len(held_out)} {split} images: judge balanced accuracy {kept:.3f} "
                 f"(originals {original:.3f}), RMSE {result['rmse']:.1f} grey levels")
        self._append_metrics({"stage": "vae_eval", "global_step": self.state.global_step, "split": split, **result})
        return result

    def _judge(self):
        if self.judge is None:
            from lesiongen.diffusion.pretrain.evaluation import SampleJudge

            self.judge = SampleJudge(self.config.eval_classifier, self.data.images, self.data.classes, self.device)
        return self.judge

    def _finish(self) -> PretrainResult:
        from lesiongen.diffusion.build import pipeline_from_components
        from lesiongen.diffusion.pretrain.run import write_pipeline_into

        self._save()
        trained_s = self.state.elapsed_s
        budget = self.config.time_budget_minutes
        self.log(f"trained for {trained_s / 60:.2f} min" + (f" (time budget {budget} min)" if budget else ""))
        record = self.evaluate(tag="final")
        with self._ema_weights():
            modules = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
            if self.config.save_dtype == "float16":
                modules = {name: copy.deepcopy(m).half() for name, m in modules.items()}
            pipe = pipeline_from_components({**modules, "tokenizer": self.tokenizer, "scheduler": self.scheduler})
            write_pipeline_into(pipe, self.out, self._provenance(record, trained_s))
        self.log(f"wrote the pretrained base to {self.out}")
        return PretrainResult(self.out, True, self.state.global_step, record)

    def _provenance(self, record: dict, trained_s: float) -> dict:
        fidelity = (record.get("class_fidelity") or {}).get("overall")
        summary = (f"pretrained by lesiongen from preset '{self.preset.name}' at {self.preset.resolution} px on "
                   f"{len(self.data)} images of {self.manifest.name} ({self.stage_steps('vae')} VAE + "
                   f"{self.stage_steps('unet')} UNet steps)")
        if fidelity is not None:
            summary += f"; class fidelity {fidelity:.3f}"
        return {
            **({"leakage_warning": self.leakage_warning} if self.leakage_warning else {}),
            "kind": "pretrained", "summary": summary, "preset": self.preset.name,
            "resolution": self.preset.resolution, "manifest": str(self.manifest),
            "manifest_sha256": self.data.manifest_sha256, "split": self.config.split, "classes": self.data.classes,
            "class_prompts": dict(zip(self.data.classes, self.class_prompts)), "num_images": len(self.data),
            "steps": {"vae": self.stage_steps("vae"), "unet": self.stage_steps("unet")},
            "training_minutes": round(trained_s / 60, 2),
            "latent_scaling_factor": self.vae.config.scaling_factor,
            "prediction_type": self.config.unet.prediction_type, "final_samples": record,
            "config": dataclasses.asdict(self.config),
        }


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _use_bf16(mode: str, device: torch.device) -> bool:
    if mode == "bf16":
        return True
    return mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
