"""Class probabilities and penultimate features of a trained classifier, on uint8 images.

`predict_proba` / `extract_features` are the library entry points (one process). `predict_distributed`
is the same computation sharded over the processes of an `accelerate` run and gathered back in the
original order; training's validation and `lesiongen evaluate` use it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lesiongen.classifier.models import ClassifierInfo
from lesiongen.classifier.preprocess import normalize, resize, shades_of_gray, to_unit_float, tta_views


def prepare(images_uint8: Tensor, info: ClassifierInfo, device: torch.device) -> Tensor:
    """uint8 (N, 3, H, W) -> normalised float (N, 3, img_size, img_size), channels_last, on `device`."""
    x = to_unit_float(images_uint8.to(device, non_blocking=True))
    if info.color_constancy:
        x = shades_of_gray(x, info.color_constancy)
    x = normalize(resize(x, info.img_size), info.mean, info.std)
    return x.contiguous(memory_format=torch.channels_last)


def inference_autocast(device: torch.device):
    """bf16 autocast on GPUs that have it; full precision elsewhere (CPU results stay exact)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def forward_probs(model: nn.Module, info: ClassifierInfo, images_uint8: Tensor) -> Tensor:
    """Softmax probabilities of one batch, averaged over the test-time views; float32 on the model's device."""
    device = _device_of(model)
    x = prepare(images_uint8, info, device)
    with inference_autocast(device):
        probs = [model(view).float().softmax(dim=1) for view in tta_views(x, info.tta)]
    return torch.stack(probs).mean(dim=0)


@torch.no_grad()
def forward_features(model: nn.Module, info: ClassifierInfo, images_uint8: Tensor) -> Tensor:
    """Pooled penultimate features (timm `forward_head(pre_logits=True)`) of one batch, one view."""
    device = _device_of(model)
    x = prepare(images_uint8, info, device)
    with inference_autocast(device):
        return model.forward_head(model.forward_features(x), pre_logits=True).float()


@torch.no_grad()
def forward_probs_and_features(model: nn.Module, info: ClassifierInfo, images_uint8: Tensor) -> tuple[Tensor, Tensor]:
    """`forward_probs` and `forward_features` of one batch from one backbone pass over the first view.

    Both heads read the same feature map, so the results equal the two separate calls; only the
    further test-time views need passes of their own.
    """
    device = _device_of(model)
    views = tta_views(prepare(images_uint8, info, device), info.tta)
    with inference_autocast(device):
        feature_map = model.forward_features(views[0])
        features = model.forward_head(feature_map, pre_logits=True).float()
        logits = [model.forward_head(feature_map)] + [model(view) for view in views[1:]]
        probs = torch.stack([x.float().softmax(dim=1) for x in logits]).mean(dim=0)
    return probs, features


def predict_proba(model: nn.Module, info: ClassifierInfo, images_uint8: Tensor, batch_size: int = 256) -> Tensor:
    """(N, C) class probabilities on the CPU, in `info.classes` order."""
    return _batched(forward_probs, model, info, images_uint8, batch_size)


def extract_features(model: nn.Module, info: ClassifierInfo, images_uint8: Tensor, batch_size: int = 256) -> Tensor:
    """(N, D) penultimate features on the CPU (D = info.num_features)."""
    return _batched(forward_features, model, info, images_uint8, batch_size)


def predict_proba_and_features(model: nn.Module, info: ClassifierInfo, images_uint8: Tensor,
                               batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """(N, C) probabilities and (N, D) features on the CPU, for the cost of `predict_proba` alone."""
    return _batched(forward_probs_and_features, model, info, images_uint8, batch_size)


def _batched(fn, model: nn.Module, info: ClassifierInfo, images_uint8: Tensor, batch_size: int):
    """`fn` over batches, concatenated on the CPU; a tuple of tensors for an `fn` that returns one."""
    was_training = model.training
    model.eval()
    try:
        parts = [fn(model, info, images_uint8[i:i + batch_size]) for i in range(0, len(images_uint8), batch_size)]
    finally:
        model.train(was_training)
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([part[k].cpu() for part in parts]) for k in range(len(parts[0])))
    return torch.cat([part.cpu() for part in parts])


class IndexDataset(Dataset):
    """Yields positions 0..n-1: the images themselves stay in one tensor, batches index into it."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def evaluation_loader(accelerator, n: int, batch_size: int):
    """A sharded, ordered loader of positions; prepared once and reused every epoch."""
    # A private generator: creating an iterator then draws nothing from the global RNG (exact resume).
    loader = DataLoader(IndexDataset(n), batch_size=batch_size, shuffle=False,
                        generator=torch.Generator().manual_seed(0))
    return accelerator.prepare_data_loader(loader)


@torch.no_grad()
def predict_distributed(accelerator, model: nn.Module, info: ClassifierInfo, images_uint8: Tensor,
                        loader=None, batch_size: int = 256) -> Tensor:
    """(N, C) probabilities on every process: each scores its shard, `gather_for_metrics` joins them.

    The gather drops the duplicates accelerate pads the last batches with, and the positions gathered
    alongside put every row back in place; each image must come back exactly once.
    """
    loader = loader if loader is not None else evaluation_loader(accelerator, len(images_uint8), batch_size)
    model.eval()
    parts, positions = [], []
    for index in loader:
        probs = forward_probs(model, info, images_uint8[index.to(images_uint8.device)])
        gathered_probs, gathered_index = accelerator.gather_for_metrics((probs, index.to(probs.device)))
        parts.append(gathered_probs.cpu())
        positions.append(gathered_index.cpu())
    probs, index = torch.cat(parts), torch.cat(positions)
    if len(index) != len(images_uint8) or not torch.equal(torch.sort(index).values, torch.arange(len(images_uint8))):
        raise RuntimeError(f"distributed prediction returned {len(index)} rows for {len(images_uint8)} images")
    out = torch.empty_like(probs)
    out[index] = probs
    return out


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
