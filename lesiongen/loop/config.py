"""The loop's run config: one YAML file, validated into dataclasses before any work starts.

Each stage's section is the config class of the module that does the work (the classifier's
`TrainConfig`, mining's `MiningConfig`, ...), so a key those modules do not know is an error naming it,
here, at load time, not an hour into the run. Keys the loop sets itself per stage (the manifest, the
synthetic manifests, the seed) are refused in those sections.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from lesiongen.classifier.config import TrainConfig
from lesiongen.config import from_dict, load_yaml, merge, to_dict, value_origin, yaml_problem
from lesiongen.data.manifest import SPLITS
from lesiongen.diffusion.finetune.config import FinetuneConfig
from lesiongen.diffusion.pretrain.config import PretrainConfig
from lesiongen.errors import InputError
from lesiongen.metrics.quality import QualityConfig
from lesiongen.synthesis.mining import MiningConfig
from lesiongen.synthesis.pipeline import SynthesisConfig

ARMS: tuple[str, ...] = ("real", "classical", "random", "mined")
ARM_DESCRIPTIONS: dict[str, str] = {
    "real": "real images only (the round-0 classifier)",
    "classical": "real + classical augmentations (flips, rotations, crops, colour) of the same hard cases, same counts",
    "random": "real + class-prompted synthetic images that were not mined, same per-class counts",
    "mined": "real + variants of the mined hard cases (DDIM inversion, img2img) after filtering",
}
# Keys of the stage sections (dotted paths) that the loop fills in itself for every stage.
LOOP_OWNED_KEYS: dict[str, tuple[str, ...]] = {
    "classifier": ("manifest", "synthetic", "seed"),
    "finetune": ("base", "manifest", "out", "prompts"),
    "base.pretrain": ("prompts",),
}
# `mine-and-generate` settings whose values the loop supplies per stage; stand-ins validate the rest.
SYNTHESIS_INPUTS: dict[str, Any] = {"predictions": "<loop>", "manifest": "<loop>", "base": "<loop>", "adapter": None,
                                    "classifier": None, "out": "<loop>", "prompts": None, "seed": 0, "mining": {},
                                    "allow_pickle": False}


@dataclass
class ToyData:
    """The project's procedural data set (`lesiongen data toy`): the demo's data."""

    n_per_class: int = 16
    size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.n_per_class, int) or self.n_per_class < 4:
            raise ValueError(f"data.toy.n_per_class must be an integer >= 4, got {self.n_per_class!r}")
        # The same bound as `lesiongen data toy --size`; the renderer draws any side from 32 px up.
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 32:
            raise ValueError(f"data.toy.size must be an integer >= 32 px (64 or 128 recommended), got {self.size!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"data.toy.seed must be an integer in [0, 2**32 - 1], got {self.seed!r}")


@dataclass
class DataSection:
    """Where the images come from: exactly one of `toy`, `source` (a data set to index), `manifest`."""

    toy: ToyData | None = None
    source: str | None = None  # HAM10000 / ISIC 2019 / ImageFolder / labels.csv folder or file
    manifest: str | None = None  # an existing manifest (its split is kept)
    format: str = "auto"
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    group_near_duplicates: bool = False  # `data index --group-near-duplicates` (not with `manifest`)
    prompts: str = "ham10000"  # a shipped prompt file name or a path

    def __post_init__(self) -> None:
        if isinstance(self.toy, dict):
            self.toy = from_dict(ToyData, self.toy, where="data.toy")
        given = [name for name in ("toy", "source", "manifest") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"data needs exactly one of toy / source / manifest, got {given or 'none'}")
        if self.group_near_duplicates and self.manifest is not None:
            raise ValueError("data.group_near_duplicates applies when the run indexes its data: a given "
                             "data.manifest keeps its split (index it with `data index --group-near-duplicates`)")
        self.fractions = tuple(float(f) for f in self.fractions)
        if len(self.fractions) != 3:
            raise ValueError(f"data.fractions must be three numbers (train, val, test), got {list(self.fractions)}")
        from lesiongen.data.split import SplitConfig

        try:  # the data stage's own checks, now rather than when the stage runs
            SplitConfig(self.fractions, self.split_seed)
        except ValueError as err:
            raise ValueError(f"data.fractions / data.split_seed: {err}") from None


@dataclass
class BaseSection:
    """The diffusion base: a local checkpoint (`path`), one shipped in the package (`asset`, the demo's),
    or one pretrained in the run (`pretrain`)."""

    path: str | None = None  # diffusers folder or single-file .safetensors (SD 1.5, an in-house base)
    asset: str | None = None  # a file in lesiongen/assets/ (a small in-house base made by the project)
    pretrain: PretrainConfig | None = None  # `lesiongen base pretrain` on the run's train split
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("path", "asset", "pretrain") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"base needs exactly one of path (a local checkpoint), asset (shipped) or pretrain "
                             f"(options), got {given or 'none'}")
        if self.pretrain is not None and getattr(self.pretrain, "split", "train") != "train":
            raise ValueError(f"base.pretrain.split is '{self.pretrain.split}': the loop's base learns the training "
                             "split only (val selects the classifiers and is mined, test reports them); remove the "
                             "key")
        if self.asset is not None and not asset_path(self.asset).is_file():
            raise ValueError(f"base.asset '{self.asset}' is not shipped in lesiongen/assets/")

    @property
    def description(self) -> str:
        if self.pretrain is not None:
            p = self.pretrain
            return (f"in-house '{p.preset}' base pretrained in the run on its training split "
                    f"({p.vae.steps} VAE + {p.unet.steps} UNet steps)")
        if self.asset is not None:
            return f"tiny in-house base shipped with lesiongen ({self.asset})"
        return str(self.path)


def asset_path(name: str) -> Path:
    """A file shipped in the package's assets folder."""
    from importlib import resources

    return Path(str(resources.files("lesiongen") / "assets" / name))


@dataclass
class ClassicalConfig:
    """The classical-augmentation arm: random crop, dihedral transform and colour jitter per copy."""

    crop_scale: tuple[float, float] = (0.6, 1.0)  # area fraction of the random resized crop
    dihedral: bool = True
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.03

    def __post_init__(self) -> None:
        self.crop_scale = tuple(float(v) for v in self.crop_scale)
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError("classical.crop_scale must be [low, high] with 0 < low <= high <= 1, "
                             f"got {self.crop_scale}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"classical.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"classical.hue must be in [0, 0.5], got {self.hue}")


@dataclass
class PromptedConfig:
    """Class-prompted samples (`lesiongen generate`): the random arm, and rare classes in the mined arm.
    Both pass the same filters as the mined variants; `oversample` draws extra so the filters can drop
    some and the counts still match, and a class still short is drawn again up to `max_oversample` x its
    count."""

    steps: int = 30
    guidance: float = 7.5
    scheduler: str = "dpmpp"
    batch_size: int = 8
    compile: bool = False
    fuse: bool = True
    oversample: float = 1.5
    max_oversample: float = 4.0

    def __post_init__(self) -> None:
        from lesiongen.diffusion.generate import SCHEDULERS

        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"generate.steps must be a positive integer, got {self.steps!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"generate.scheduler must be one of {list(SCHEDULERS)}, got '{self.scheduler}'")
        if self.guidance < 0:  # the generate stage's own bound (GenerationSettings)
            raise ValueError(f"generate.guidance must be >= 0, got {self.guidance}")
        if self.oversample < 1.0:
            raise ValueError(f"generate.oversample must be >= 1, got {self.oversample}")
        if self.max_oversample < self.oversample:
            raise ValueError(f"generate.max_oversample must be >= generate.oversample ({self.oversample}), "
                             f"got {self.max_oversample}")
        if self.batch_size < 1:
            raise ValueError(f"generate.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class EvaluateSection:
    bootstrap: int = 1000  # lesion-level bootstrap resamples for 95 % CIs and the paired tests
    batch_size: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise ValueError(f"evaluate.bootstrap must be a non-negative integer, got {self.bootstrap!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"evaluate.batch_size must be a positive integer, got {self.batch_size!r}")


@dataclass
class LoopConfig:
    """A whole adversarial run: data, base, adaptation, R rounds for every arm and seed, the report."""

    name: str = "lesiongen-run"
    demo: bool = False  # the toy data and a small in-house base: every output says it is a demonstration
    rounds: int = 1
    seeds: list[int] | int = field(default_factory=lambda: [0])  # an int N: seeds 0 .. N-1
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    rare_classes: dict[str, int] = field(default_factory=dict)  # class -> prompted samples per round (mined arm)
    cpu_threads: int | None = None  # torch CPU threads for every stage (None: torch's default)
    data: DataSection = field(default_factory=lambda: DataSection(toy=ToyData()))
    base: BaseSection = field(default_factory=lambda: BaseSection(pretrain=PretrainConfig()))
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    classifier: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    mining: MiningConfig = field(default_factory=MiningConfig)
    synthesis: dict[str, Any] = field(default_factory=dict)  # `mine-and-generate` settings (SynthesisConfig)
    generate: PromptedConfig = field(default_factory=PromptedConfig)
    classical: ClassicalConfig = field(default_factory=ClassicalConfig)
    quality: QualityConfig | None = field(default_factory=QualityConfig)  # None: no generation-quality metrics

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        given = self.seeds
        if isinstance(self.seeds, int):  # `seeds: 3` means seeds 0, 1, 2
            self.seeds = list(range(self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or not all(isinstance(s, int) for s in self.seeds):
            raise ValueError(f"seeds must be distinct integers (or a positive count), got {given!r}")
        if not all(0 <= s < 2**32 for s in self.seeds):  # numpy and accelerate's set_seed take [0, 2**32)
            raise ValueError(f"seeds must be integers in [0, 2**32 - 1], got {self.seeds!r}")
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown or "real" not in self.arms or "mined" not in self.arms:
            raise ValueError(f"arms must include 'real' and 'mined' and be among {list(ARMS)}, got {self.arms}")
        self.arms = [arm for arm in ARMS if arm in self.arms]  # canonical order
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            raise ValueError(f"cpu_threads must be a positive integer or null, got {self.cpu_threads!r}")
        for key, count in self.rare_classes.items():
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"rare_classes.{key} must be a positive integer, got {count!r}")
        self.synthesis = library_section(SynthesisConfig, self.synthesis or {}, SYNTHESIS_INPUTS, "synthesis")
        self._share_selection_reserve()
        if self.mining.split not in self.classifier.synthetic_splits:  # variants keep their source's split
            wanted = [s for s in SPLITS if s in {*self.classifier.synthetic_splits, self.mining.split}]
            raise ValueError(
                f"mining.split is {self.mining.split!r}, but classifier.synthetic_splits "
                f"{self.classifier.synthetic_splits} leaves rows of that split out of training: the variants of its "
                "hard cases keep their source's split, so the mined and classical arms would add no image; add it "
                f"(--set classifier.synthetic_splits=[{','.join(wanted)}])")

    def _share_selection_reserve(self) -> None:
        """`classifier.selection: reserved` selects on lesions that mining must skip: one setting drives both."""
        reserve = self.classifier.selection_reserve if self.classifier.selection == "reserved" else None
        if self.mining.selection_reserve not in (None, reserve):  # a resumed run's saved config repeats it
            raise ValueError(
                f"mining.selection_reserve is set by the loop (classifier.selection_reserve when classifier."
                f"selection is 'reserved'), got {self.mining.selection_reserve!r} with classifier.selection "
                f"{self.classifier.selection!r}; set classifier.selection=reserved and classifier.selection_reserve")
        if reserve is not None and self.mining.split != "val":
            raise ValueError(f"classifier.selection 'reserved' selects on validation lesions that mining skips, "
                             f"but mining.split is {self.mining.split!r}; mine 'val' or select with 'all'/'unseen'")
        self.mining = replace(self.mining, selection_reserve=reserve)

    @property
    def leakage(self) -> bool:
        return self.mining.split == "test"


def library_section(cls: type, section: dict[str, Any], loop_inputs: dict[str, Any], where: str, *,
                    flags: dict[str, Any] | None = None, file: str | None = None) -> dict[str, Any]:
    """A section for a library config class some of whose fields the loop sets per stage: checked now by
    building `cls` with stand-ins for those, returned resolved (every other field, defaults included).
    With `flags` (the section's `--set` values) and `file`, an error names the `--set` key or the file."""
    owned = sorted(set(section) & set(loop_inputs))
    if owned:
        raise InputError(f"{where}.{owned[0]} is set by the loop for every stage; remove it")
    built = from_dict(cls, {**section, **loop_inputs}, where=f"{file}: {where}" if file else where,
                      flags=flags or {}, flag_names=lambda key: f"--set {where}.{key}")
    return {key: value for key, value in to_dict(built).items() if key not in loop_inputs}


def load_loop_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> LoopConfig:
    """YAML (or the built-in defaults) -> CLI overrides -> a validated LoopConfig."""
    data = load_yaml(path) if path is not None else {}
    data = merge(data, overrides or {}, none_is_value=True)  # `--set key=null` clears a key
    where = str(path) if path is not None else "config"
    for section, keys in LOOP_OWNED_KEYS.items():
        owned = sorted(set(_at(data, section)) & set(keys))
        if owned:
            raise InputError(f"{where}: {section}.{owned[0]} is set by the loop for every stage; remove it")
    # the synthesis section first, so that a bad value in it is blamed on its --set key or the file
    library_section(SynthesisConfig, _at(data, "synthesis") or {}, SYNTHESIS_INPUTS, "synthesis",
                    flags=_at(overrides or {}, "synthesis"), file=where)
    config = from_dict(LoopConfig, data, where=where, flags=overrides, flag_names=_set_flag)
    check_classes(config, where, overrides or {})
    return config


def _set_flag(key: str) -> str:
    return f"--set {key}"


def _origin(key: str, overrides: dict[str, Any], where: str) -> str:
    """`--set KEY` when a command-line override set the dotted key, else the config file it came from."""
    return value_origin(key, where=where, flags=overrides, flag_names=_set_flag)


def check_classes(config: LoopConfig, where: str, overrides: dict[str, Any] | None = None) -> None:
    """Class names in the config must be classes of the prompt file: caught before any training, not at the
    stage that first reads them (mining comes after the adaptation and the round-0 classifiers)."""
    from lesiongen.data.prompts import load_prompts
    from lesiongen.synthesis.mining import parse_confusion_key

    classes = load_prompts(config.data.prompts).class_names
    quota = config.mining.per_class_quota
    named = {
        "rare_classes": set(config.rare_classes),
        "mining.per_class_quota": set(quota) if isinstance(quota, dict) else set(),
        "mining.confusion_weights": {name for key in config.mining.confusion_weights or {}
                                     for pair in parse_confusion_key(key) for name in pair},
    }
    for key, names in named.items():
        unknown = sorted(names - set(classes))
        if unknown:
            raise InputError(f"{_origin(key, overrides or {}, where)}: {key} names unknown class(es) {unknown}; "
                             f"classes are {classes}")


def check_input_paths(config: LoopConfig, where: str, overrides: dict[str, Any] | None = None) -> None:
    """The local inputs must exist before the run folder is made: a stage that found one missing would leave
    finished stages behind, and a run folder that only --overwrite could restart with the corrected path."""
    from lesiongen.diffusion.loading import hub_offline, looks_like_hub_id

    for key, value in (("data.source", config.data.source), ("data.manifest", config.data.manifest),
                       ("base.path", config.base.path)):
        if value is None or Path(value).expanduser().exists():
            continue
        if key == "base.path" and looks_like_hub_id(value) and not hub_offline():
            continue  # downloaded by the base stage
        raise InputError(f"{_origin(key, overrides or {}, where)}: {key} {value!r}: no such file or folder")
    check_finetune_resolution(config, where, overrides or {})
    # the classifier is first built after the base and the adaptation (hours with a pretrained base): its
    # architecture and initial weights are checked now, named by the config key rather than train-classifier's flag
    from lesiongen.classifier.models import check_arch, resolve_weights

    clf = config.classifier
    for key, check in (("classifier.arch", lambda: check_arch(clf.arch)),
                       ("classifier.pretrained", lambda: clf.pretrained in ("none", "imagenet")
                        or resolve_weights(clf.arch, clf.pretrained))):
        try:
            check()
        except InputError as err:
            message = str(err).split(": ", 1)[-1] if str(err).startswith("--") else str(err)
            raise InputError(f"{_origin(key, overrides or {}, where)}: {key}: {message}") from err


def _base_factors(base: BaseSection) -> tuple[int, int, str] | None:
    """(VAE downsampling, UNet down blocks, a name) of the loop's base, read without loading weights: a preset
    for a base pretrained in the run, the component configs of a diffusers folder; None otherwise (the
    finetune stage checks a single file or a hub id once loaded)."""
    import json

    from lesiongen.diffusion.presets import PRESETS

    if base.pretrain is not None and base.pretrain.preset in PRESETS:
        preset = PRESETS[base.pretrain.preset]
        return preset.vae_scale_factor, len(preset.unet["down_block_types"]), f"a '{base.pretrain.preset}' base"
    folder = Path(base.path).expanduser() if base.path else None
    configs = [folder / part / "config.json" for part in ("vae", "unet")] if folder is not None else []
    if not configs or not all(path.is_file() for path in configs):
        return None
    try:
        vae, unet = (json.loads(path.read_text(encoding="utf-8")) for path in configs)
        return 2 ** (len(vae["block_out_channels"]) - 1), len(unet["down_block_types"]), f"the base {folder}"
    except (OSError, ValueError, KeyError, TypeError):  # the base stage names a damaged folder
        return None


def check_finetune_resolution(config: LoopConfig, where: str, overrides: dict[str, Any]) -> None:
    """finetune.resolution against the base's size multiple, before the base stage (hours when pretrained)."""
    from lesiongen.diffusion.resolution import resolution_problem

    resolution, factors = config.finetune.resolution, _base_factors(config.base)
    if resolution is None or factors is None:
        return
    problem = resolution_problem(resolution, *factors)
    if problem is not None:
        raise InputError(f"{_origin('finetune.resolution', overrides, where)}: finetune.resolution {resolution}: "
                         f"{problem}")


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """`--set classifier.epochs=3 --set seeds=[0,1]` -> nested overrides (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set '{item}': expected KEY=VALUE, e.g. --set classifier.epochs=3")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise InputError(f"--set '{item}': value is not valid YAML ({yaml_problem(err)})") from err
        node = out
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # `--set classifier=null --set classifier.epochs=3`
                earlier = ".".join(parts[:i + 1])
                raise InputError(f"--set '{item}': an earlier --set gave {earlier} the value {node!r}, not a "
                                 f"section; give {earlier} once, either whole or key by key")
        node[parts[-1]] = parsed
    return out


def absolute_paths(config: LoopConfig, base_dir: str | os.PathLike) -> LoopConfig:
    """Input paths made absolute (relative ones are relative to `base_dir`, the working directory), so a
    run resumed from elsewhere reads the same files. A path that does not exist is left as given: the
    stage that reads it names it in its error (and a base may be a hub id when online)."""
    def resolve(value: str | None) -> str | None:
        if value is None:
            return None
        candidate = Path(base_dir) / Path(value).expanduser()
        return str(candidate.resolve()) if candidate.exists() else value

    config.data.source, config.data.manifest = resolve(config.data.source), resolve(config.data.manifest)
    config.base.path = resolve(config.base.path)
    if Path(config.data.prompts).suffix:  # a prompt file (a bare name is a shipped one)
        config.data.prompts = resolve(config.data.prompts)
    if config.classifier.pretrained not in ("none", "imagenet"):  # a weights file or classifier folder
        config.classifier = replace(config.classifier, pretrained=resolve(config.classifier.pretrained))
    if config.synthesis.get("reference_classifier"):
        config.synthesis["reference_classifier"] = resolve(config.synthesis["reference_classifier"])
    if (pretrain := config.base.pretrain) is not None:
        pretrain.eval_classifier = resolve(pretrain.eval_classifier)
        pretrain.vae.perceptual_classifier = resolve(pretrain.vae.perceptual_classifier)
        if pretrain.cache_dir is not None:  # made when first used: absolute even before it exists
            pretrain.cache_dir = str((Path(base_dir) / Path(pretrain.cache_dir).expanduser()).resolve())
    return config


def config_yaml(config: LoopConfig) -> str:
    """The resolved config as saved in the run folder (without the keys the loop sets per stage)."""
    data = to_dict(config)
    for section, keys in LOOP_OWNED_KEYS.items():
        for key in keys:
            _at(data, section).pop(key, None)
    return yaml.safe_dump(data, sort_keys=False)


def _at(data: dict, dotted: str) -> dict:
    """The mapping at a dotted path of nested mappings ({} where it is absent or null)."""
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
        if data is None:
            return {}
    return data if isinstance(data, dict) else {}


# Top-level keys every saved config has had: a saved config without them was emptied or cut short, and would
# otherwise silently become the built-in defaults (another base, classifier, seeds ...) on resume and in the report.
SAVED_KEYS = ("name", "rounds", "seeds", "data", "base", "classifier")


def load_resolved(path: str | os.PathLike) -> LoopConfig:
    """Reload a run's saved `config.yaml` (already resolved) for `--resume`."""
    missing = [key for key in SAVED_KEYS if key not in load_yaml(path)]
    if missing:
        raise InputError(f"{path}: not a complete saved run config (no {', '.join(missing)}); `lesiongen loop` "
                         "writes every setting there: restore the file from a backup, or start the run again")
    return load_loop_config(Path(path))
