"""`lesiongen finetune` settings: dataclass defaults -> `--config` YAML -> CLI flags, validated early."""

from __future__ import annotations

from dataclasses import dataclass, field

from lesiongen.config import check_learning_rate

METHODS = ("lora", "ti", "lora+ti", "full")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
AUGMENTATIONS = ("hflip", "vflip")
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# What `--resume` may not change: the weights in a checkpoint only mean something under these.
RESUME_LOCKED = ("base", "manifest", "method", "prompts", "resolution", "seed", "batch_size", "grad_accum",
                 "lora", "tokens", "augment", "class_balance", "caption_dropout")


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: float | None = None  # None: alpha = rank (scale 1)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(UNET_LORA_TARGETS))
    text_encoder: bool = False  # also a LoRA on the text encoder's attention
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(TEXT_LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module")

    @property
    def lora_alpha(self) -> float:
        return self.rank if self.alpha is None else self.alpha


@dataclass
class TokenSettings:
    num_vectors: int = 1  # embedding vectors per class token
    lr: float = 5e-4  # textual inversion wants a much larger step than LoRA

    def __post_init__(self) -> None:
        if self.num_vectors < 1:
            raise ValueError(f"tokens.num_vectors must be >= 1, got {self.num_vectors}")
        check_learning_rate("tokens.lr", self.lr)


@dataclass
class FinetuneConfig:
    base: str = ""
    manifest: str = ""
    out: str = ""
    method: str = "lora+ti"
    prompts: str = "ham10000"  # prompt file path or shipped dataset name
    resolution: int | None = None  # None: the base's native size (128 px data is upsampled)
    steps: int = 2000
    batch_size: int = 8  # per device
    grad_accum: int = 1
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"  # bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    cache_text: bool = True  # only when nothing on the text side trains
    compile: bool | None = None  # torch.compile the UNet; None: on CUDA (pays back its compile time in minutes)
    ema: bool = False
    ema_decay: float = 0.9999
    snr_gamma: float | None = 5.0  # min-SNR weighting; None: plain MSE
    noise_offset: float = 0.0
    caption_dropout: float = 0.1
    class_balance: float = 1.0  # sample weight = class_count ** -class_balance (1: balanced, 0: natural)
    augment: list[str] = field(default_factory=lambda: list(AUGMENTATIONS))
    seed: int = 0
    checkpoint_every: int = 500
    checkpoint_limit: int | None = 3
    validate_every: int = 500  # 0: only at the end
    validation_images_per_class: int = 2
    validation_steps: int = 25
    validation_guidance: float = 7.5
    log_every: int = 10
    tensorboard: bool = False
    allow_pickle: bool = False
    name: str | None = None  # adapter name used in file names; None: the output folder's name
    lora: LoraSettings = field(default_factory=LoraSettings)
    tokens: TokenSettings = field(default_factory=TokenSettings)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if isinstance(self.tokens, dict):
            self.tokens = TokenSettings(**self.tokens)
        checks = [
            (self.method in METHODS, f"method must be one of {list(METHODS)}, got '{self.method}'"),
            (self.mixed_precision in MIXED_PRECISION,
             f"mixed_precision must be one of {list(MIXED_PRECISION)}, got '{self.mixed_precision}'"),
            (self.lr_scheduler in LR_SCHEDULERS,
             f"lr_scheduler must be one of {list(LR_SCHEDULERS)}, got '{self.lr_scheduler}'"),
            (self.resolution is None or self.resolution > 0, f"resolution must be > 0, got {self.resolution}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.warmup_steps == 0 or self.lr_scheduler != "constant",
             "warmup_steps > 0 needs lr_scheduler constant_with_warmup, cosine or linear ('constant' has no warmup)"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or null"),
            (0.0 < self.ema_decay < 1.0, f"ema_decay must be in (0, 1), got {self.ema_decay}"),
            (self.snr_gamma is None or self.snr_gamma > 0, "snr_gamma must be > 0 or null"),
            (self.noise_offset >= 0, f"noise_offset must be >= 0, got {self.noise_offset}"),
            (0.0 <= self.caption_dropout < 1.0, f"caption_dropout must be in [0, 1), got {self.caption_dropout}"),
            (self.class_balance >= 0, f"class_balance must be >= 0, got {self.class_balance}"),
            (set(self.augment) <= set(AUGMENTATIONS), f"augment must be a subset of {list(AUGMENTATIONS)}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.checkpoint_limit is None or self.checkpoint_limit >= 1, "checkpoint_limit must be >= 1 or null"),
            (self.validate_every >= 0, f"validate_every must be >= 0, got {self.validate_every}"),
            (self.validation_images_per_class >= 1, "validation_images_per_class must be >= 1"),
            (self.validation_steps >= 1, "validation_steps must be >= 1"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_learning_rate("lr", self.lr)

    @property
    def trains_lora(self) -> bool:
        return self.method in ("lora", "lora+ti")

    @property
    def trains_tokens(self) -> bool:
        return self.method in ("ti", "lora+ti", "full")

    @property
    def trains_unet(self) -> bool:
        return self.method != "ti"

    @property
    def text_side_frozen(self) -> bool:
        """Nothing between caption and UNet learns: text states can be computed once per caption."""
        return not self.trains_tokens and not (self.trains_lora and self.lora.text_encoder)
