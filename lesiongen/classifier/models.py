"""timm classifiers: create any architecture, initialise it offline, save and load a trained one.

A trained classifier is a folder with `model.safetensors` and `classifier.json` (`ClassifierInfo`:
architecture, classes and everything predict needs to preprocess images the way training did).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lesiongen.errors import InputError
from lesiongen.utils.atomic import atomic_path, write_json

MODEL_FILE = "model.safetensors"
INFO_FILE = "classifier.json"


@dataclass
class ClassifierInfo:
    """What a saved classifier is and how its inputs must be prepared (written as classifier.json)."""

    arch: str
    classes: list[str]
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    load_size: int | None = None  # size images were decoded at for training (evaluate decodes the same)
    color_constancy: float | None = None  # Shades-of-Gray p applied before everything else
    tta: str = "none"
    num_features: int = 0  # width of `extract_features`
    pretrained: str = "none"
    training: dict = field(default_factory=dict)  # provenance: data counts, recipe, best epoch

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(self.classes) < 2:
            raise ValueError(f"a classifier needs at least two classes, got {self.classes}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need three values (RGB)")

    @property
    def decode_size(self) -> int:
        return self.load_size or self.img_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> ClassifierInfo:
        path = Path(folder) / INFO_FILE
        if not path.is_file():
            raise InputError(f"{folder}: not a trained classifier (no {INFO_FILE}); expected the --out folder "
                             "of `lesiongen train-classifier`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise InputError(f"{path}: not a valid classifier description ({err})") from err


def check_arch(arch: str) -> None:
    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f"; did you mean {close}?" if close else "; see timm.list_models()"
        raise InputError(f"--arch: unknown architecture '{arch}'{hint}")


def create_classifier(arch: str, num_classes: int, pretrained: str = "none", *, drop_rate: float = 0.0,
                      drop_path_rate: float | None = None, cache_dir: str | os.PathLike | None = None) -> nn.Module:
    """A timm model with a fresh `num_classes` head. `pretrained`: none | imagenet | weights file | classifier folder.

    Weights go through timm's own loader (`pretrained_cfg_overlay=dict(file=...)`), which drops a head of
    another size; they are first checked against the architecture, because timm loads a head-less
    checkpoint non-strictly and would silently ignore weights of a different model.
    """
    import timm

    check_arch(arch)
    kwargs = {"num_classes": num_classes, "drop_rate": drop_rate}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    weights = resolve_weights(arch, pretrained, cache_dir)
    if weights is None:
        return _small_head(timm.create_model(arch, pretrained=False, **kwargs))
    head_classes = check_weights_match(arch, weights, pretrained)
    try:
        model = timm.create_model(arch, pretrained=True, **kwargs,
                                  pretrained_cfg_overlay=dict(file=str(weights), num_classes=head_classes))
    except RuntimeError as err:  # size mismatches timm detects after its own key filtering
        raise InputError(f"--pretrained {pretrained}: weights do not fit '{arch}': {err}") from err
    return model if head_classes == num_classes else _small_head(model)


def _small_head(model: nn.Module) -> nn.Module:
    """Re-initialise a fresh linear head near zero.

    timm's default head init scales with 1/sqrt(num_classes): with 7 classes the first logits have a
    standard deviation of ~5, the first losses are ~6-8 instead of log(7), and their gradients shake the
    pretrained backbone before the head has learned anything.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.trunc_normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    return model


def resolve_weights(arch: str, pretrained: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The weights file `pretrained` stands for (None for random initialisation)."""
    from lesiongen.classifier.weights import imagenet_weights_file

    if pretrained == "none":
        return None
    if pretrained == "imagenet":
        return imagenet_weights_file(arch, cache_dir)
    path = Path(pretrained)
    if path.is_dir():
        info = ClassifierInfo.read(path)
        if info.arch != arch:
            raise InputError(f"--pretrained {path}: that classifier is a '{info.arch}', not '{arch}'")
        path = path / MODEL_FILE
    if not path.is_file():
        raise InputError(f"--pretrained: '{pretrained}' is not 'none', 'imagenet', a weights file "
                         "or a classifier folder")
    if path.suffix != ".safetensors":
        raise InputError(f"--pretrained {path}: only .safetensors weights are read (pickle formats can run code); "
                         "convert it with safetensors.torch.save_file(torch.load(path, weights_only=True), ...)")
    return path


def check_weights_match(arch: str, weights: Path, pretrained: str) -> int:
    """Refuse weights whose keys or shapes are not `arch`'s (the head aside); return their head's size."""
    import timm
    from safetensors import SafetensorError, safe_open

    with torch.device("meta"):  # only names and shapes are needed
        model = timm.create_model(arch, pretrained=False)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    head = model.pretrained_cfg.get("classifier") or "classifier"
    head_prefixes = (head,) if isinstance(head, str) else tuple(head)
    try:
        with safe_open(str(weights), framework="pt") as handle:
            found = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise InputError(f"--pretrained {pretrained}: {weights} is not a readable safetensors file ({err})") from err
    found = {k: v for k, v in found.items() if not k.endswith("num_batches_tracked")}

    def is_head(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in head_prefixes)

    missing = sorted(k for k in expected if k not in found and not is_head(k))
    unexpected = sorted(k for k in found if k not in expected and not is_head(k))
    wrong_shape = sorted(k for k in expected if k in found and not is_head(k) and found[k] != expected[k])
    if missing or unexpected or wrong_shape:
        details = "; ".join(f"{what} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for what, keys in
                            (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys)
        raise InputError(f"--pretrained {pretrained}: {weights} does not match architecture '{arch}' ({details})")
    head_weight = next((k for k in found if is_head(k) and k.endswith("weight")), None)
    return found[head_weight][0] if head_weight else model.pretrained_cfg.get("num_classes", 1000)


def data_config(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation the architecture's pretrained weights expect (timm's pretrained_cfg)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def save_classifier(model: nn.Module, info: ClassifierInfo, folder: str | os.PathLike) -> Path:
    """Write model.safetensors then classifier.json, each atomically (the json marks a complete model)."""
    from lesiongen.utils.tensor_files import save_safetensors

    folder = Path(folder)
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: its keys would gain '_orig_mod.'
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / MODEL_FILE) as tmp:
        save_safetensors(state, tmp, metadata={"arch": info.arch, "format": "pt"})
    write_json(folder / INFO_FILE, info.to_dict())
    return folder


def load_classifier(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ClassifierInfo]:
    """(model in eval mode on `device`, its ClassifierInfo) from a `train-classifier` output folder."""
    import timm
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lesiongen.utils.outdir import warn_if_unfinished

    info = ClassifierInfo.read(folder)
    check_arch(info.arch)
    # A killed or running training keeps its best model so far here: usable, but never silently.
    warn_if_unfinished(folder, f"lesiongen train-classifier --out {folder} --resume latest")
    weights = Path(folder) / MODEL_FILE
    if not weights.is_file():
        raise InputError(f"{folder}: {MODEL_FILE} is missing")
    model = timm.create_model(info.arch, pretrained=False, num_classes=len(info.classes))
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, SafetensorError) as err:
        raise InputError(f"{weights}: weights do not match '{info.arch}' with {len(info.classes)} classes "
                         f"({err})") from err
    model.to(device=device, memory_format=torch.channels_last).eval()
    return model, info
