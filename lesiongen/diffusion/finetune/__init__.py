"""`lesiongen finetune`: adapt a Stable Diffusion base to dermoscopy (LoRA + one learned token per class)."""

from lesiongen.diffusion.finetune.config import FinetuneConfig, LoraSettings, TokenSettings
from lesiongen.diffusion.finetune.run import resolve_config, run_finetune

__all__ = ["FinetuneConfig", "LoraSettings", "TokenSettings", "resolve_config", "run_finetune"]
