"""Pretraining recipe: YAML defaults -> CLI overrides -> this validated dataclass (saved as config.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lesiongen.config import check_learning_rate

PREDICTION_TYPES = ("epsilon", "v_prediction")
# Noise schedules (DDIMScheduler settings on top of SD 1.5's). SD's schedule leaves signal at t = T
# (terminal SNR 0.0047); small latents keep their whole layout in that leftover, so a model trained on it
# never learns to draw the layout from pure noise. `zero_snr` rescales to zero terminal SNR (Lin et al.
# 2024; needs v-prediction), `cosine` is the schedule made for 32-64 px images (Nichol & Dhariwal 2021).
NOISE_SCHEDULES: dict[str, dict] = {
    "sd15": {},
    "zero_snr": {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    "cosine": {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"},
}
MIXED_PRECISION = ("auto", "no", "bf16")
CHECKPOINT_DTYPES = ("float16", "float32")


@dataclass
class VaeStageConfig:
    """AutoencoderKL training: L1 reconstruction + KL (+ an optional classifier-feature perceptual term)."""

    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    crop_size: int | None = None  # train on random crops (the VAE is convolutional): 4x cheaper at half size
    kl_weight: float = 1e-6  # SD's VAE used 1e-6: latents stay informative, the scale is fixed afterwards
    perceptual_weight: float = 0.0  # > 0 needs `perceptual_classifier`
    perceptual_classifier: str | None = None  # a `train-classifier` folder whose features judge textures

    def __post_init__(self) -> None:
        _positive(self, "steps", allow_zero=True)
        _positive(self, "batch_size")
        check_learning_rate("vae.learning_rate", self.learning_rate)
        if self.crop_size is not None and self.crop_size < 8:
            raise ValueError(f"vae.crop_size must be >= 8 px, got {self.crop_size}")
        if self.kl_weight < 0 or self.perceptual_weight < 0:
            raise ValueError("vae.kl_weight and vae.perceptual_weight must be >= 0")
        if self.perceptual_weight > 0 and not self.perceptual_classifier:
            raise ValueError("vae.perceptual_weight > 0 needs vae.perceptual_classifier (a classifier folder)")


@dataclass
class UnetStageConfig:
    """Class-conditioned UNet training on cached latents."""

    steps: int = 4000
    batch_size: int = 64
    learning_rate: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.999  # ceiling of diffusers' EMA warm-up schedule; 0 disables EMA
    caption_dropout: float = 0.1  # share of steps trained on the empty prompt, for classifier-free guidance
    prediction_type: str = "v_prediction"
    noise_schedule: str = "zero_snr"
    min_snr_gamma: float | None = 5.0  # Min-SNR loss weighting (Hang et al. 2023); None: plain MSE
    # draw weight n_class ** -class_balance: 1 every class equally (derm-dev, 32 px, 6,000 steps: class fidelity
    # 0.54 against 0.30 as in the data, df 0.69 against 0.02; bench/RESULTS.md), 0 the data's own mix
    class_balance: float = 1.0

    def __post_init__(self) -> None:
        _positive(self, "steps", allow_zero=True)
        _positive(self, "batch_size")
        check_learning_rate("unet.learning_rate", self.learning_rate)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"unet.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"unet.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unet.prediction_type must be one of {PREDICTION_TYPES}, got '{self.prediction_type}'")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"unet.noise_schedule must be one of {list(NOISE_SCHEDULES)}, got '{self.noise_schedule}'")
        if self.noise_schedule == "zero_snr" and self.prediction_type != "v_prediction":
            raise ValueError("unet.noise_schedule zero_snr needs unet.prediction_type v_prediction (an epsilon "
                             "model cannot recover the image from pure noise at t = T)")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError("unet.min_snr_gamma must be > 0 (or null to disable)")
        if not 0.0 <= self.class_balance <= 1.0:
            raise ValueError(f"unet.class_balance must be in [0, 1], got {self.class_balance}")


@dataclass
class PretrainConfig:
    preset: str = "small"
    resolution: int | None = None  # default: the preset's native resolution
    seed: int = 0
    prompts: str = "ham10000"  # prompt file (path or shipped dataset name); its class_prompt conditions
    split: str = "train"
    augment: bool = True  # the 8 flips / 90-degree rotations: dermoscopy has no canonical orientation
    vae: VaeStageConfig = field(default_factory=VaeStageConfig)
    unet: UnetStageConfig = field(default_factory=UnetStageConfig)
    grad_clip: float = 1.0
    # Wall-clock budget of the training (VAE + latent cache + UNet, over all jobs of a chained run; sample
    # grids on the way and the final judging come on top). Each stage's steps become an upper bound:
    # after a few timed steps the stage is planned to end when its share is spent (budget.py).
    time_budget_minutes: float | None = None
    vae_budget_share: float = 0.2  # of the budget; the UNet gets the rest, less what the VAE really took
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the UNet (pays on long GPU runs only)
    device: str = "auto"
    cpu_threads: int | None = None  # torch threads on CPU; 1 is fastest on a machine shared by many jobs
    # Progress and checkpoints
    log_every: int = 50
    sample_every: int = 1000  # UNet steps between per-class sample grids (0: only at the end)
    samples_per_class: int = 8
    sample_steps: int = 25
    guidance_scale: float = 3.0
    eval_classifier: str | None = None  # classifier folder: class fidelity + domain distance of the samples
    checkpoint_every: int = 1000  # steps (of either stage) between checkpoints
    checkpoints_total_limit: int | None = 2
    checkpoint_dtype: str = "float16"  # float32: a resume continues bit-exactly (float16 rounds the weights)
    save_dtype: str = "float32"  # dtype of the finished base's weights (float16 halves the folder)
    max_shard_mib: int = 16
    max_shards: int | None = 8
    save_optimizer: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        from lesiongen.diffusion.presets import PRESETS
        from lesiongen.diffusion.resolution import resolution_problem

        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got '{self.preset}'")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"resolution must be >= 8 px, got {self.resolution}")
        if self.resolution is not None:  # a base that `generate` and `finetune` would refuse is never trained
            preset = PRESETS[self.preset]
            problem = resolution_problem(self.resolution, preset.vae_scale_factor, len(preset.unet["down_block_types"]),
                                         f"a '{self.preset}' base")
            if problem is not None:
                raise ValueError(f"resolution {self.resolution}: {problem}")
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got '{self.split}'")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got '{self.mixed_precision}'")
        for name in ("checkpoint_dtype", "save_dtype"):
            if getattr(self, name) not in CHECKPOINT_DTYPES:
                raise ValueError(f"{name} must be one of {CHECKPOINT_DTYPES}, got '{getattr(self, name)}'")
        for name in ("log_every", "checkpoint_every", "max_shard_mib", "samples_per_class", "sample_steps"):
            _positive(self, name)
        _positive(self, "sample_every", allow_zero=True)
        if self.time_budget_minutes is not None and self.time_budget_minutes <= 0:
            raise ValueError(f"time_budget_minutes must be > 0 (or null for none), got {self.time_budget_minutes}")
        if not 0.0 < self.vae_budget_share < 1.0:
            raise ValueError(f"vae_budget_share must be in (0, 1), got {self.vae_budget_share}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("checkpoints_total_limit must be >= 1 (or null to keep all)")
        if self.max_shards is not None and self.max_shards < 1:
            raise ValueError("max_shards must be >= 1 (or null for no limit)")

    @property
    def total_steps(self) -> int:
        return self.vae.steps + self.unet.steps


def _positive(obj, name: str, *, allow_zero: bool = False) -> None:
    value = getattr(obj, name)
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
