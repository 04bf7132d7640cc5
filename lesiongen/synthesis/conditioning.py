"""What the UNet is conditioned on during inversion and sampling, and one guided noise prediction.

Text embeddings are per image (B, L, D), so a batch may mix classes, per-image optimised embeddings and
interpolations. The unconditional side is either one embedding per image or one per sampling step
(null-text inversion optimises it step by step). Classifier-free guidance runs as one batched UNet call
on [uncond; cond], not two calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch


@dataclass
class Conditioning:
    cond: torch.Tensor  # (B, L, D)
    uncond: torch.Tensor | None = None  # (B, L, D), or (S, B, L, D): one per denoising step
    scale: float = 1.0  # classifier-free guidance; 1 means the conditional prediction alone

    def __post_init__(self) -> None:
        if self.scale != 1.0 and self.uncond is None:
            raise ValueError("classifier-free guidance (scale != 1) needs an unconditional embedding")
        if self.uncond is not None and self.uncond.shape[-3:] != self.cond.shape:
            raise ValueError(f"unconditional embeddings {tuple(self.uncond.shape)} "
                             f"do not match {tuple(self.cond.shape)}")

    @property
    def guided(self) -> bool:
        return self.scale != 1.0

    @property
    def per_step(self) -> bool:
        return self.uncond is not None and self.uncond.dim() == 4

    def uncond_at(self, step: int) -> torch.Tensor:
        assert self.uncond is not None
        return self.uncond[step] if self.per_step else self.uncond

    def with_scale(self, scale: float) -> Conditioning:
        return replace(self, scale=scale)

    def repeat_each(self, n: int) -> Conditioning:
        """Each image's conditioning n times in a row (variants of one source share it)."""
        batch_dim = 1 if self.per_step else 0
        uncond = None if self.uncond is None else self.uncond.repeat_interleave(n, dim=batch_dim)
        return Conditioning(self.cond.repeat_interleave(n, dim=0), uncond, self.scale)

    def index(self, rows: Sequence[int] | torch.Tensor) -> Conditioning:
        rows = torch.as_tensor(rows, device=self.cond.device)
        uncond = None
        if self.uncond is not None:
            uncond = self.uncond[:, rows] if self.per_step else self.uncond[rows]
        return Conditioning(self.cond[rows], uncond, self.scale)


def predict_noise(unet: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor | int,
                  conditioning: Conditioning, step: int) -> torch.Tensor:
    """The (guided) model output at one step; CFG batches [uncond; cond] into one UNet call."""
    if not conditioning.guided:
        return unet(latents, timestep, encoder_hidden_states=conditioning.cond, return_dict=False)[0]
    embeddings = torch.cat([conditioning.uncond_at(step), conditioning.cond])
    out_uncond, out_cond = unet(torch.cat([latents, latents]), timestep, encoder_hidden_states=embeddings,
                                return_dict=False)[0].chunk(2)
    return out_uncond + conditioning.scale * (out_cond - out_uncond)


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], device: torch.device | str) -> torch.Tensor:
    """Text-encoder hidden states for each prompt (B, L, D), through the pipeline's own `encode_prompt`
    so multi-vector learned tokens and text-encoder LoRA are handled exactly as in diffusers."""
    embeds, _ = pipe.encode_prompt(list(prompts), device, 1, False)
    return embeds


class PromptCache:
    """Each distinct prompt encoded once per run (class prompts repeat across every batch)."""

    def __init__(self, pipe, device: torch.device | str) -> None:
        self.pipe = pipe
        self.device = device
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            for prompt, embed in zip(missing, encode_prompts(self.pipe, missing, self.device)):
                self._cache[prompt] = embed
        return torch.stack([self._cache[p] for p in prompts])
