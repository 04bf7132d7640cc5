"""Run configs: YAML defaults -> CLI overrides -> a validated dataclass, saved resolved (timm style)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lesiongen.errors import InputError
from lesiongen.utils.atomic import write_text

T = TypeVar("T")


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    return data


def from_dict(cls: type[T], data: dict, *, where: str = "config") -> T:
    """Build a (possibly nested) dataclass from a dict; unknown keys are errors naming the key."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(cls)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        nested = _dataclass_in(hint)
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value, where=f"{where}.{key}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise InputError(f"{where}: {err}") from err


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def merge(base: dict, overrides: dict, *, none_is_value: bool = False) -> dict:
    """Deep-merge `overrides` into `base`. None in overrides means 'not given on the CLI', unless
    `none_is_value` (a YAML `null` written on purpose, e.g. `--set base.pretrain=null`)."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None and not none_is_value:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, none_is_value=none_is_value)
        else:
            out[key] = value
    return out


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_config(obj: Any, path: str | os.PathLike) -> Path:
    return write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
