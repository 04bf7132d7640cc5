"""Prompt -> CLIP hidden states, the way `StableDiffusionPipeline.encode_prompt` does it.

Training calls this instead of `encode_prompt` because it needs just the conditional states (with
gradients into the learned tokens) and one tokenizer call per batch. The result must stay identical to
the pipeline's (tested): a LoRA trained on other conditioning than generation uses would be wasted.
"""

from __future__ import annotations

import torch


def tokenize(pipe, prompts: list[str]) -> torch.Tensor:
    """Token ids (N, 77): multi-vector tokens expanded, padded and truncated to the model length."""
    expanded = pipe.maybe_convert_prompt(list(prompts), pipe.tokenizer)
    return pipe.tokenizer(expanded, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids


def encode(text_encoder, input_ids: torch.Tensor, device=None) -> torch.Tensor:
    """Last hidden state (N, 77, dim) of the text encoder (which may be wrapped, e.g. by DDP)."""
    return text_encoder(input_ids.to(device or text_encoder.device))[0]


class CachedPromptEncoder:
    """Encodes each distinct prompt once; for a frozen text side the cache replaces the text encoder.

    Captions come from a few templates, so a whole data set has a few hundred distinct captions at
    most: the cache is small and, once warm, training never runs the text encoder again.
    """

    def __init__(self, pipe, text_encoder=None, dtype: torch.dtype | None = None) -> None:
        self.pipe = pipe
        self.text_encoder = text_encoder if text_encoder is not None else pipe.text_encoder
        self.dtype = dtype
        self._cache: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._cache)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            states = encode(self.text_encoder, tokenize(self.pipe, missing))
            if self.dtype is not None:
                states = states.to(self.dtype)
            self._cache.update(zip(missing, states, strict=True))
        return torch.stack([self._cache[p] for p in prompts])
