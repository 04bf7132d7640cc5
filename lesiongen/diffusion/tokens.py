"""One learned token per class: added to the tokenizer, initialised from words, the only rows that move.

A token may own several embedding vectors. They are stored with diffusers' multi-vector convention
(`<derm-mel>`, `<derm-mel>_1`, ...), so a prompt expanded by `pipe.maybe_convert_prompt` during
training reads exactly as it does after `pipe.load_textual_inversion` in someone else's script.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lesiongen.data.prompts import PromptSet
from lesiongen.errors import InputError


def vector_names(token: str, num_vectors: int) -> list[str]:
    """The tokenizer entries of one learned token: diffusers' `<t>`, `<t>_1`, ... naming."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


@dataclass
class LearnedTokens:
    """Which class owns which learned token and which embedding rows hold its vectors."""

    class_tokens: dict[str, str]  # class key -> token, in prompt-file order
    token_ids: dict[str, list[int]]  # token -> ids of its vectors
    first_new_id: int  # every id below this belongs to the base vocabulary

    @property
    def num_vectors(self) -> int:
        return len(next(iter(self.token_ids.values())))

    def embeddings(self, text_encoder) -> dict[str, torch.Tensor]:
        """token -> (num_vectors, dim) float32 CPU tensor: what every embedding format stores."""
        weight = text_encoder.get_input_embeddings().weight.detach()
        return {token: weight[ids].float().cpu().clone() for token, ids in self.token_ids.items()}


def check_tokens_absent(tokenizer, tokens: list[str], num_vectors: int, *, where: str) -> None:
    """A learned token must be new: reusing an existing entry would silently train a real word."""
    vocab = tokenizer.get_vocab()
    for token in tokens:
        for name in vector_names(token, num_vectors):
            if name in vocab:
                raise InputError(
                    f"token '{name}' already exists in the tokenizer of {where} (id {vocab[name]}); "
                    "the base probably already holds learned tokens (a fine-tuned pipeline?). Start from the "
                    "original base or give the classes other token names in the prompt file")


def _init_vectors(tokenizer, weight: torch.Tensor, words: tuple[str, ...], num_vectors: int,
                  *, where: str) -> torch.Tensor:
    """Vectors from the words' sub-word embeddings: split into `num_vectors` groups, each averaged.

    With more vectors than sub-words, the extra vectors start from the mean of them all; positions
    differ, so their gradients differ and they separate during training.
    """
    ids = tokenizer(" ".join(words), add_special_tokens=False).input_ids
    if not ids:
        raise InputError(f"{where}: init_words {list(words)} produce no tokens")
    source = weight[torch.tensor(ids)].float()
    mean = source.mean(0)
    groups = torch.tensor_split(source, num_vectors) if num_vectors <= len(ids) else [source[:0]] * num_vectors
    return torch.stack([g.mean(0) if len(g) else mean for g in groups])


def add_learned_tokens(tokenizer, text_encoder, prompts: PromptSet, num_vectors: int = 1,
                       *, where: str = "the base") -> LearnedTokens:
    """Add every class token of `prompts` (each `num_vectors` rows) and initialise it from its init words."""
    if num_vectors < 1:
        raise InputError(f"num_vectors must be >= 1, got {num_vectors}")
    classes = list(prompts.classes.values())
    check_tokens_absent(tokenizer, [c.token for c in classes], num_vectors, where=where)
    first_new_id = len(tokenizer)
    names = [name for c in classes for name in vector_names(c.token, num_vectors)]
    tokenizer.add_tokens(names)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are set below
    weight = text_encoder.get_input_embeddings().weight
    token_ids: dict[str, list[int]] = {}
    with torch.no_grad():
        for cls in classes:
            ids = tokenizer.convert_tokens_to_ids(vector_names(cls.token, num_vectors))
            vectors = _init_vectors(tokenizer, weight[:first_new_id], cls.init_words, num_vectors,
                                    where=f"{prompts.source}: class '{cls.key}'")
            weight[ids] = vectors.to(weight.dtype)
            token_ids[cls.token] = ids
    return LearnedTokens({c.key: c.token for c in classes}, token_ids, first_new_id)


class FrozenRowsGuard:
    """Keeps every embedding row below `first_new_id` fixed while the whole matrix is a trainable tensor.

    The gradient of those rows is zeroed in a hook (so optimizer statistics and gradient clipping see
    only the new tokens) and their values are copied back after each optimizer step (so weight decay
    or numerical drift cannot move them either).
    """

    def __init__(self, embedding: torch.nn.Embedding, first_new_id: int) -> None:
        self.weight = embedding.weight
        self.first_new_id = first_new_id
        self.original = self.weight.detach()[:first_new_id].clone()
        self._handle = self.weight.register_hook(self._mask_gradient)

    def _mask_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[: self.first_new_id] = 0
        return grad

    @torch.no_grad()
    def restore(self) -> None:
        if self.original.device != self.weight.device:
            # The guard is made before the pipeline moves to the GPU: without this, every step would copy
            # the whole vocabulary's rows (150 MB for SD 1.5) from pageable host memory.
            self.original = self.original.to(self.weight.device)
        self.weight[: self.first_new_id].copy_(self.original)

    def remove(self) -> None:
        self._handle.remove()
