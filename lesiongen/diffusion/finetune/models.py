"""What trains in each method, set up on a loaded pipeline: learned tokens, LoRA, or the whole UNet.

| method    | UNet                  | text encoder                           |
| --------- | --------------------- | -------------------------------------- |
| `lora`    | LoRA                  | frozen tokens (optional LoRA)          |
| `ti`      | frozen                | the class tokens' rows                 |
| `lora+ti` | LoRA                  | the class tokens' rows (optional LoRA) |
| `full`    | every weight          | the class tokens' rows                 |

Every method adds the class tokens, so captions and prompts read the same whatever was trained.
Frozen weights run in the mixed-precision dtype; trainable ones are kept in float32 (diffusers'
`cast_training_params`), which mixed-precision optimisers need.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from lesiongen.data.prompts import PromptSet
from lesiongen.diffusion.finetune.config import FinetuneConfig
from lesiongen.diffusion.lora_files import LoraWeights
from lesiongen.diffusion.tokens import FrozenRowsGuard, LearnedTokens, add_learned_tokens
from lesiongen.errors import InputError

TOKEN_PREFIX = "tokens."


@dataclass
class TrainableModels:
    pipe: object  # StableDiffusionPipeline whose components train in place
    config: FinetuneConfig
    tokens: LearnedTokens
    guard: FrozenRowsGuard | None

    @classmethod
    def setup(cls, pipe, config: FinetuneConfig, prompts: PromptSet, *, weight_dtype: torch.dtype,
              where: str) -> TrainableModels:
        from diffusers.training_utils import cast_training_params

        unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
        for model in (unet, text_encoder, vae):
            model.requires_grad_(False)
        tokens = add_learned_tokens(pipe.tokenizer, text_encoder, prompts, config.tokens.num_vectors, where=where)
        if config.trains_lora:
            _add_lora(unet, config.lora.rank, config.lora.lora_alpha, config.lora.dropout,
                      config.lora.target_modules, where=f"{where} UNet")
            if config.lora.text_encoder:
                _add_lora(text_encoder, config.lora.rank, config.lora.lora_alpha, config.lora.dropout,
                          config.lora.text_encoder_target_modules, where=f"{where} text encoder")
        if config.method == "full":
            unet.requires_grad_(True)
        # fp16 VAE encodes overflow on some SD checkpoints; it runs once when latents are cached anyway.
        vae_dtype = torch.float32 if weight_dtype == torch.float16 else weight_dtype
        for model, dtype in ((vae, vae_dtype), (unet, weight_dtype), (text_encoder, weight_dtype)):
            if model.dtype != dtype:
                model.to(dtype=dtype)
        guard = None
        if config.trains_tokens:
            text_encoder.get_input_embeddings().weight.requires_grad_(True)
        cast_training_params([unet, text_encoder], dtype=torch.float32)
        if config.trains_tokens:
            guard = FrozenRowsGuard(text_encoder.get_input_embeddings(), tokens.first_new_id)
        if config.gradient_checkpointing:
            if config.trains_unet:
                unet.enable_gradient_checkpointing()
            if not config.text_side_frozen:
                text_encoder.gradient_checkpointing_enable()
        return cls(pipe, config, tokens, guard)

    @property
    def trains_text_encoder(self) -> bool:
        return not self.config.text_side_frozen

    @property
    def trainable_models(self) -> list[torch.nn.Module]:
        models = [self.pipe.unet] if self.config.trains_unet else []
        return models + ([self.pipe.text_encoder] if self.trains_text_encoder else [])

    @cached_property
    def parameter_groups(self) -> list[dict]:
        """Optimizer groups: UNet / LoRA weights at `lr`, token rows at `tokens.lr` without weight decay."""
        embedding = self.pipe.text_encoder.get_input_embeddings().weight
        main = [p for m in (self.pipe.unet, self.pipe.text_encoder) for p in m.parameters()
                if p.requires_grad and p is not embedding]
        groups = [{"params": main, "lr": self.config.lr, "weight_decay": self.config.weight_decay}] if main else []
        if self.config.trains_tokens:
            groups.append({"params": [embedding], "lr": self.config.tokens.lr, "weight_decay": 0.0})
        return groups

    @cached_property
    def parameters(self) -> list[torch.nn.Parameter]:
        """Every trained tensor (walking the modules for it each step costs milliseconds of Python)."""
        return [p for group in self.parameter_groups for p in group["params"]]

    def after_optimizer_step(self) -> None:
        if self.guard is not None:
            self.guard.restore()

    def lora_weights(self) -> LoraWeights | None:
        if not self.config.trains_lora:
            return None
        return LoraWeights.from_models(unet=self.pipe.unet, text_encoder=self.pipe.text_encoder)

    def embeddings(self) -> dict[str, torch.Tensor]:
        return self.tokens.embeddings(self.pipe.text_encoder)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that trains (what a checkpoint must hold), flat and safetensors-ready."""
        state: dict[str, torch.Tensor] = {}
        lora = self.lora_weights()
        if lora is not None:
            for component, layers in lora.layers.items():
                state.update({f"lora.{component}.{k}": v for k, v in layers.items()})
        if self.config.method == "full":
            state.update({f"unet.{k}": v.detach().cpu() for k, v in self.pipe.unet.state_dict().items()})
        state.update({f"{TOKEN_PREFIX}{t}": e for t, e in self.embeddings().items()})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        for component, model in (("unet", self.pipe.unet), ("text_encoder", self.pipe.text_encoder)):
            prefix = f"lora.{component}."
            layers = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if layers:
                set_peft_model_state_dict(model, layers)
        unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        if unet_state:
            self.pipe.unet.load_state_dict(unet_state)
        weight = self.pipe.text_encoder.get_input_embeddings().weight
        for token, ids in self.tokens.token_ids.items():
            weight[ids] = state[f"{TOKEN_PREFIX}{token}"].to(weight.device, weight.dtype)


def _add_lora(model, rank: int, alpha: float, dropout: float, targets: list[str], *, where: str) -> None:
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        init_lora_weights="gaussian")
    try:
        model.add_adapter(config)
    except ValueError as err:
        raise InputError(f"cannot add a LoRA on {list(targets)} to the {where}: {err}") from err
