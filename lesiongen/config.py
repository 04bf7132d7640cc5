"""Run configs: YAML defaults -> CLI overrides -> a validated dataclass, saved resolved (timm style)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lesiongen.errors import InputError
from lesiongen.utils.atomic import write_text
from lesiongen.utils.text import not_utf8

T = TypeVar("T")


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line: where (line, column) and what, without its quoted excerpt."""
    mark = getattr(err, "problem_mark", None)
    what = " ".join(str(getattr(err, "problem", None) or err).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently, so
    a second `classifier:` section would drop every setting of the first)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            # `<<: *anchor` merges are left to PyYAML: a key after one overrides the merged value, as intended
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"key {key!r} is given twice (first on line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from err
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({yaml_problem(err)})") from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    return data


def shipped_config(name: str) -> Path:
    """A config shipped in `configs/` by name (`demo`, `ham10000-sd15`, `derm-dev-classifier`, ...)."""
    from importlib import resources

    base = resources.files("lesiongen.configs")
    candidate = base / f"{name}.yaml"
    if not candidate.is_file():
        shipped = sorted(p.name.removesuffix(".yaml") for p in base.iterdir() if p.name.endswith(".yaml"))
        raise InputError(f"config '{name}' is neither a file nor a shipped config (shipped: {shipped})")
    return Path(str(candidate))


def config_path(name_or_path: str | os.PathLike) -> Path:
    """A YAML path as given, or a shipped config: by name (`demo`), or spelled as the README does
    (`configs/demo.yaml`) from a folder other than the repository's, where that path does not exist."""
    path = Path(name_or_path)
    if path.is_file():
        return path  # a folder of the same name (`demo/` in the working directory) does not hide a shipped one
    if path.suffix in (".yaml", ".yml"):
        if path.parent.name == "configs":
            try:
                return shipped_config(path.stem)
            except InputError:
                pass
        return path  # load_yaml names the missing file
    return shipped_config(str(name_or_path))


def from_dict(cls: type[T], data: Mapping, *, where: str = "config", flags: Mapping | None = None,
              flag_names: Mapping[str, str] | Callable[[str], str] | None = None) -> T:
    """Build a (possibly nested) dataclass from a dict (YAML), checking every value against its field's type.

    An unknown key, a value of the wrong type (`steps: many`, `lora: 5` where a section belongs, `true` for a
    number) and a float that is NaN or infinite are errors naming the dotted key, what was expected and the
    value; the class's own `__post_init__` checks the ranges. Ints pass for floats (a numeric string such as
    PyYAML's `1e-4` is read as a float), lists for tuples; fields typed `Any` are not checked.

    `flags`: the part of `data` that came from command-line flags (nested like `data`), so that an error
    caused by one of them names the flag instead of `where` (the config file); `flag_names` maps dotted keys
    to their flag where it is not `--<last key with dashes>` (e.g. {"tokens.lr": "--token-lr"}), or is a
    function of the dotted key (`--set` options).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(cls)
    return _build(cls, data, _Source(where, flags or {}, flag_names or {}), ())


def value_origin(dotted: str, *, where: str, flags: Mapping,
                 flag_names: Mapping[str, str] | Callable[[str], str] | None = None) -> str:
    """What an error about the value at a dotted key should name when a check after `from_dict` finds it wrong:
    the flag that set it (as `from_dict` names flags), else `where`."""
    return _Source(where, flags, flag_names or {}).flag(tuple(dotted.split(".")), section=True) or where


# Opt-in for a float field that may be infinite: `x: float = field(default=..., metadata=ALLOW_INF)`.
ALLOW_INF = {"allow_inf": True}


def check_finite(obj: Any, prefix: str = "") -> None:
    """ValueError naming the field for a NaN (or infinite) float field of a dataclass built without
    `from_dict` (which checks this itself), e.g. from typed command-line options."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and _accepts_float(hints[f.name]) and not _finite_ok(value, f):
            raise ValueError(f"{prefix}{f.name} must be a finite number, got {value}")


# The largest float32: optimizers turn the rate into an fp32 value, and 1e39 (finite for Python) ended in a raw
# "value cannot be converted to type float without overflow". A rate that is merely too high is left to
# training, whose divergence check names the step and the last good checkpoint.
MAX_LEARNING_RATE = 3.4028234663852886e38


def check_learning_rate(name: str, value: float) -> None:
    """ValueError naming the setting unless `value` is a positive learning rate an fp32 step can hold."""
    if not 0.0 < value <= MAX_LEARNING_RATE:
        raise ValueError(f"{name} must be a positive number no larger than {MAX_LEARNING_RATE:.3g} (the largest "
                         f"float32), got {value:g}")


class _Mismatch(Exception):
    """A value that does not fit its annotation: where it sits (dotted key, [index]) and what was expected."""

    def __init__(self, keys: tuple[str, ...], at: str, expected: str, value: Any) -> None:
        super().__init__(at)
        self.keys, self.at, self.expected, self.value = keys, at, expected, value


class _NotFinite(_Mismatch):
    """A NaN or infinite number: wrong whatever else the field's type would accept."""


@dataclasses.dataclass
class _Source:
    where: str  # the config file (or the command) the values came from
    flags: Mapping  # the values that came from command-line flags instead
    flag_names: Mapping[str, str] | Callable[[str], str]

    def flag(self, keys: tuple[str, ...], *, section: bool = False) -> str | None:
        """The flag that gave the value at `keys`, or None when the value came from `where` (or is a section
        of values, judged key by key, unless `section`)."""
        node: Any = self.flags
        for key in keys:
            if not isinstance(node, Mapping) or key not in node:
                return None
            node = node[key]
        if isinstance(node, Mapping) and not section:
            return None
        dotted = ".".join(keys)
        if callable(self.flag_names):
            return self.flag_names(dotted)
        return self.flag_names.get(dotted) or "--" + keys[-1].replace("_", "-")

    def section(self, keys: tuple[str, ...]) -> str:
        """`where`, then the section's dotted key (`configs/demo.yaml: base`, not a file `demo.yaml.base`)."""
        return f"{self.where}: {'.'.join(keys)}" if keys else self.where


def _build(cls: type[T], data: Any, source: _Source, keys: tuple[str, ...]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        flag = source.flag((*keys, unknown[0]), section=True)
        raise InputError(f"{flag or source.section(keys)}: unknown key(s) {unknown}; expected some of {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = (*keys, key)
        try:
            kwargs[key] = _convert(hints[key], value, source, path, ".".join(path), fields[key])
        except _Mismatch as err:
            flag = source.flag(err.keys)  # an item of a flag's list or mapping: the flag and where in it
            prefix = flag + err.at[len(".".join(err.keys)):] if flag else f"{source.where}: {err.at}"
            raise InputError(f"{prefix}: expected {err.expected}, got {err.value!r}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise InputError(f"{_blame(cls, kwargs, source, keys)}: {err}") from err


def _blame(cls: type, kwargs: dict[str, Any], source: _Source, keys: tuple[str, ...]) -> str:
    """The flag(s) whose value the class refused (the class builds once that flag is left out), else `where`."""
    culprits = []
    for key, value in kwargs.items():
        # a mapping-valued setting (`--confusion mel->nv=2`) comes whole from its flag; a section, key by key
        flag = source.flag((*keys, key), section=not dataclasses.is_dataclass(value))
        if flag is None:
            continue
        try:
            cls(**{k: v for k, v in kwargs.items() if k != key})
        except Exception:  # still failing (or failing otherwise) without it: not this flag alone
            continue
        culprits.append(flag)
    return ", ".join(culprits) if culprits else source.section(keys)


def _convert(hint: Any, value: Any, source: _Source, keys: tuple[str, ...], at: str, fld: Any = None) -> Any:
    """`value` checked against `hint` (and converted: YAML lists to tuples, sections to dataclasses)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        deeper = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source, keys, at, fld)
            except _NotFinite:
                raise
            except _Mismatch as err:
                if err.at != at:
                    deeper.append(err)
        if len(deeper) == 1:  # the value has the shape of one alternative: report what is wrong inside it
            raise deeper[0]
        raise _Mismatch(keys, at, _describe(hint), value)
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch(keys, at, _describe(hint), value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise _Mismatch(keys, at, _describe(hint), value)
        return _build(hint, value, source, keys)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif hint is float:
        number = _number(value)
        if number is not None:
            if not _finite_ok(number, fld):
                raise _NotFinite(keys, at, "a finite number", value)
            return number
    elif hint is str:
        if isinstance(value, (str, os.PathLike)):
            return value
        if isinstance(value, bool):
            raise _Mismatch(keys, at, "a string (YAML reads unquoted yes / no / on / off as true / false: quote it)",
                            value)
    elif origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, (list, tuple)):
            if not args:
                return list(value) if (origin or hint) is list else tuple(value)
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                if len(value) != len(args):
                    raise _Mismatch(keys, at, _describe(hint), value)
                items = args
            else:
                items = (args[0],) * len(value)
            converted = [_convert(a, v, source, keys, f"{at}[{i}]", fld) for i, (a, v) in enumerate(zip(items, value))]
            return converted if origin is list else tuple(converted)
    elif origin is dict or hint is dict:
        if isinstance(value, Mapping):
            if not args:
                return dict(value)
            out = {}
            for k, v in value.items():
                try:
                    k = _convert(args[0], k, source, keys, at, fld)
                except _Mismatch:
                    raise _Mismatch(keys, at, f"{_describe(args[0], True)} as keys", k) from None
                out[k] = _convert(args[1], v, source, keys, f"{at}.{k}", fld)
            return out
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:
        return value  # an annotation this checker does not know: left to the class
    raise _Mismatch(keys, at, _describe(hint), value)


def _number(value: Any) -> float | int | None:
    """A float field's value: a real number (an int stays an int), or a string PyYAML left unparsed (`1e-4`)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _finite_ok(value: float | int, fld: Any) -> bool:
    allow_inf = fld is not None and fld.metadata.get("allow_inf", False)
    return math.isfinite(value) or (allow_inf and math.isinf(value))


def _accepts_float(hint: Any) -> bool:
    if hint is float:
        return True
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and float in typing.get_args(hint)


_NOUNS = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), type(None): ("null", "nulls")}


def _describe(hint: Any, plural: bool = False) -> str:
    """What a value of `hint` looks like, in words: `a list of 2 numbers`, `an integer or null`, ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _NOUNS:
        return _NOUNS[hint][plural]
    if origin in (typing.Union, types.UnionType):
        words = [_describe(a, plural) for a in args]
        return ", ".join(words[:-1]) + " or " + words[-1]
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if dataclasses.is_dataclass(hint):
        names = [f.name for f in dataclasses.fields(hint) if f.init]
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        return f"{'sections' if plural else 'a section'} (a mapping of keys such as {shown})"
    if origin in (list, tuple) or hint in (list, tuple):
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            kinds = {_describe(a, True) for a in args}
            what = f"{len(args)} {kinds.pop()}" if len(kinds) == 1 else ", ".join(_describe(a) for a in args)
            return f"{'lists' if plural else 'a list'} of {what}"
        return f"{'lists' if plural else 'a list'} of {_describe(args[0], True)}" if args else "a list"
    if origin is dict or hint is dict:
        noun = "mappings" if plural else "a mapping"
        if len(args) == 2 and args[1] is not Any:
            return f"{noun} of {_describe(args[0], True)} to {_describe(args[1], True)}"
        return noun
    return getattr(hint, "__name__", str(hint))


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


def with_defaults(cls: type, data: Mapping) -> dict:
    """`data` (a saved config of `cls`) with every field it lacks, at any depth, set to its default, as
    `to_dict` would write it: a config saved by an older version compares equal to today's resolved one
    when only fields added since (with their defaults) differ. Keys that are not fields pass through."""
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for field in dataclasses.fields(cls):
        nested = _dataclass_in(hints.get(field.name))
        if field.name in out:
            if nested is not None and isinstance(out[field.name], Mapping):
                out[field.name] = with_defaults(nested, out[field.name])
        elif field.default is not dataclasses.MISSING:
            out[field.name] = to_dict(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            out[field.name] = to_dict(field.default_factory())
    return out


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass an annotation names (`Config`, `Config | None`), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    dataclass_args = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
    return dataclass_args[0] if len(dataclass_args) == 1 else None


def flatten(data: Mapping, prefix: str = "") -> dict:
    """Nested settings as dotted keys: {'lora': {'rank': 4}} -> {'lora.rank': 4}."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(before: Mapping, after: Mapping) -> list[str]:
    """'key.sub: old -> new' for every dotted setting that differs, for messages refusing a resume."""
    old, new = flatten(before), flatten(after)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


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
