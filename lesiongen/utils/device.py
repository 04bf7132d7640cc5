"""One reading of a `--device` value for every command that takes one (auto, cpu, cuda, cuda:N)."""

from __future__ import annotations

import re

import torch

from lesiongen.errors import InputError

_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def is_device_name(name: str) -> bool:
    """Whether `name` reads as a device (auto, cpu, cuda, cuda:N); configs check this at load time, before a
    run starts, and `resolve_device` whether the device is there when it is used."""
    text = str(name).strip().lower()
    return text in ("auto", "cpu") or _CUDA.match(text) is not None


def resolve_device(name: str | torch.device, *, flag: str = "--device") -> torch.device:
    """`auto` -> the first CUDA GPU when one is visible, else the CPU; `cpu`; `cuda` / `cuda:N`, which must be
    visible. Anything else, or a GPU that is not there, is an InputError naming `flag` and the value."""
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.match(text)
    if not match:
        raise InputError(f"{flag} {name}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"{flag} {name}: no CUDA GPU is visible (use --device cpu, or auto)")
    index = match.group(1)
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise InputError(f"{flag} {name}: only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1})")
    return torch.device(text)
