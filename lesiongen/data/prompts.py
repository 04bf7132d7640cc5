"""Prompt files (`prompts/<dataset>.yaml`): class names, learned tokens, caption templates; validated at load."""

from __future__ import annotations

import os
import random
import re
import string
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from lesiongen.config import load_yaml
from lesiongen.errors import InputError

_TOKEN_RE = re.compile(r"^<[a-z0-9][a-z0-9_-]*>$")


@dataclass(frozen=True)
class ClassPrompt:
    key: str
    name: str
    token: str
    init_words: tuple[str, ...]
    description: str = ""


@dataclass
class PromptSet:
    dataset: str
    classes: dict[str, ClassPrompt]
    templates: list[str]
    negative_prompt: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    @property
    def tokens(self) -> list[str]:
        return [c.token for c in self.classes.values()]

    def get(self, key: str) -> ClassPrompt:
        if key not in self.classes:
            raise InputError(f"class '{key}' is not in the prompt file {self.source} (classes: {self.class_names})")
        return self.classes[key]

    def caption(self, label: str, row: dict | None = None, rng: random.Random | None = None,
                template_index: int | None = None) -> str:
        """A caption for one image; templates needing metadata the row lacks are skipped."""
        cls = self.get(label)
        fields = {"token": cls.token, "name": cls.name, "description": cls.description}
        for field_name, column in self.metadata.items():
            value = (row or {}).get(column, "")
            if value not in ("", None, "unknown", "nan"):
                fields[field_name] = str(value).removesuffix(".0")
        usable = [t for t in self.templates if _fields(t) <= fields.keys()]
        if template_index is not None:
            template = self.templates[template_index]
            if not _fields(template) <= fields.keys():
                template = usable[0]
        else:
            template = (rng or random).choice(usable)
        return template.format(**fields)

    def class_prompt(self, label: str) -> str:
        """The plain class prompt used for generation, inversion and validation grids."""
        return self.caption(label, None, template_index=0)


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _shipped_prompt_folder() -> Traversable:
    """`lesiongen.prompts` once installed (pyproject maps the top-level `prompts/` there); the
    checkout's `prompts/` when the package runs from a source tree on PYTHONPATH, as on a bare GPU box."""
    try:
        return resources.files("lesiongen.prompts")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "prompts"


def builtin_prompt_file(dataset: str) -> Path:
    """The shipped prompt file for a dataset name (ham10000, isic2019)."""
    base = _shipped_prompt_folder()
    candidate = base / f"{dataset}.yaml"
    if not candidate.is_file():
        shipped = sorted(p.name.removesuffix(".yaml") for p in base.iterdir() if p.name.endswith(".yaml"))
        raise InputError(f"no built-in prompt file for dataset '{dataset}' (shipped: {shipped}); pass a path")
    return Path(str(candidate))


FILE_KEYS = ("dataset", "classes", "templates", "negative_prompt", "metadata")
CLASS_KEYS = ("name", "token", "init_words", "description")


def _refuse_unknown(mapping: dict, known: tuple[str, ...], where: str) -> None:
    import difflib

    unknown = [str(k) for k in mapping if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InputError(f"{where}: unknown key(s) {unknown}{hint}; expected some of {list(known)}")


def load_prompts(path_or_dataset: str | os.PathLike = "ham10000") -> PromptSet:
    """Load a prompt file by path, or a shipped one by dataset name, and validate it."""
    path = Path(path_or_dataset)
    if not path.suffix:
        path = builtin_prompt_file(str(path_or_dataset))
    if not path.is_file():
        raise InputError(f"{path}: prompt file not found")
    raw = load_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), dict) or not raw["classes"]:
        raise InputError(f"{path}: expected a mapping with a non-empty 'classes' mapping")
    _refuse_unknown(raw, FILE_KEYS, str(path))  # a typo (`negative_promt`) would silently drop the setting
    classes: dict[str, ClassPrompt] = {}
    for key, spec in raw["classes"].items():
        where = f"{path}: class '{key}'"
        if not isinstance(spec, dict):
            raise InputError(f"{where}: expected a mapping with name, token, init_words")
        _refuse_unknown(spec, CLASS_KEYS, where)
        for required in ("name", "token", "init_words"):
            if not spec.get(required):
                raise InputError(f"{where}: missing '{required}'")
        if not _TOKEN_RE.match(spec["token"]):
            raise InputError(f"{where}: token '{spec['token']}' must look like <lowercase-name>")
        words = spec["init_words"]
        words = [words] if isinstance(words, str) else list(words)
        classes[str(key)] = ClassPrompt(str(key), spec["name"], spec["token"], tuple(words),
                                        spec.get("description", ""))
    tokens = [c.token for c in classes.values()]
    if len(set(tokens)) != len(tokens):
        raise InputError(f"{path}: learned tokens must be unique per class, got {tokens}")
    templates = raw.get("templates") or ["a dermoscopy image of {token} {name}"]
    allowed = {"token", "name", "description", *(raw.get("metadata") or {})}
    for template in templates:
        unknown = _fields(template) - allowed
        if unknown:
            raise InputError(f"{path}: template '{template}' uses unknown field(s) {sorted(unknown)}")
        if "{token}" not in template:
            raise InputError(f"{path}: template '{template}' must contain {{token}}")
    if _fields(templates[0]) - {"token", "name", "description"}:
        raise InputError(f"{path}: the first template is the plain class prompt and may not need metadata")
    return PromptSet(str(raw.get("dataset", path.stem)), classes, list(templates),
                     str(raw.get("negative_prompt", "")), dict(raw.get("metadata") or {}), str(path))
