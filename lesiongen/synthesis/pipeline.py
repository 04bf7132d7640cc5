"""`mine-and-generate`: mine -> invert -> vary -> filter, with provenance, sharded and resumable.

Every process of an `accelerate launch` run mines the same list (it is deterministic and cheap), takes
every k-th source image, and writes one record per finished source (`outputs.py`). Seeds come from the
source image and the variant index, never from the process rank, so 1 or 8 processes, or a resumed
run, make the same images. The main process then joins the records into the synthetic manifest.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
import yaml

from lesiongen.config import changed_settings, to_dict, with_defaults
from lesiongen.errors import InputError, OutputExistsError
from lesiongen.metrics.memorization import MemorizationIndex
from lesiongen.synthesis.conditioning import PromptCache
from lesiongen.synthesis.filters import FilterConfig, VariantFilter, build_memorization_index, reconstruction_verdicts
from lesiongen.synthesis.inversion import DDIMSchedule, InversionConfig, invert, measure_round_trip
from lesiongen.synthesis.mining import MiningConfig, MiningResult, load_predictions, mine_hard_cases
from lesiongen.synthesis.variants import VariantConfig
from lesiongen.utils.outdir import OutputFolder

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from lesiongen.data.prompts import PromptSet

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Settings that change how fast a run goes, not what it makes: a resumed run may change them.
EXECUTION_KEYS = ("out", "batch_size", "compile", "cache_dir", "progress")


@dataclass
class SynthesisConfig:
    predictions: str = ""  # `evaluate`'s predictions.csv on the mining split
    manifest: str = ""  # the manifest those predictions were made on
    base: str = ""  # SD base: diffusers folder, single file, hub id
    adapter: str | None = None  # `finetune` output folder (LoRA + class tokens)
    classifier: str | None = None  # the classifier being improved: classifier guidance, default judge
    reference_classifier: str | None = None  # judge for the off-class filter and features (default: classifier)
    out: str = "checkpoints/mine-and-generate"
    prompts: str | None = None  # prompt file; default: the adapter's, else ham10000
    seed: int = 0
    batch_size: int = 8  # source images per batch (variants multiply it)
    dtype: str = "auto"  # auto: fp16 on CUDA (inversion is more exact than in bf16), fp32 on CPU
    compile: bool = False  # torch.compile the UNet (pays off for long runs on a GPU)
    # DDIM loops recompute the UNet's deep features only every N-th step (DeepCache; feature_cache.py):
    # 1 = exact; 2 or 3 trade some round-trip fidelity (reported per image) for speed
    feature_cache: int = 1
    save_rejected: bool = True  # keep dropped variants under rejected/ for inspection
    allow_pickle: bool = False
    cache_dir: str | None = None  # decoded-image cache for the memorisation index
    progress: bool = True
    mining: MiningConfig = field(default_factory=MiningConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    variants: VariantConfig = field(default_factory=VariantConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)

    def __post_init__(self) -> None:
        if not self.base and self.adapter:  # as `generate`: the base the adapter was fine-tuned from
            from lesiongen.diffusion.adapters import AdapterInfo

            self.base = AdapterInfo.load(self.adapter).base
        for name in ("predictions", "manifest"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if not self.base:
            raise ValueError("--base is required (or --adapter, whose adapter.json names its base)")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got '{self.dtype}'")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.feature_cache < 1:
            raise ValueError(f"feature_cache must be >= 1 (1: every step runs the whole UNet), "
                             f"got {self.feature_cache}")
        if self.inversion.null_text_steps and self.variants.guidance == 1.0:
            raise ValueError("null-text optimisation only matters with classifier-free guidance: "
                             "set --guidance above 1 or --null-text-steps 0")
        if self.variants.classifier_guidance and not self.classifier:
            raise ValueError("classifier guidance needs --classifier")
        if int(self.inversion.steps * self.variants.strength) < 1:
            raise ValueError(f"--strength {self.variants.strength} x --inversion-steps {self.inversion.steps} "
                             "leaves no sampling step; raise one of them")

    @property
    def leakage_warning(self) -> str | None:
        return self.mining.leakage_warning

    def resolved(self) -> dict:
        """The config as saved: absolute paths, and the leakage warning on top when there is one."""
        data = to_dict(self)
        for key in ("predictions", "manifest", "classifier", "reference_classifier", "adapter", "out", "cache_dir"):
            if data.get(key):
                data[key] = str(Path(data[key]).expanduser().resolve())
        if Path(self.base).expanduser().exists():
            data["base"] = str(Path(self.base).expanduser().resolve())
        return {"leakage_warning": self.leakage_warning, **data} if self.leakage_warning else data


# -- models -----------------------------------------------------------------------------------------


@dataclass
class Generator:
    """The adapted pipeline prepared for inversion and sampling, and its identity."""

    pipe: StableDiffusionPipeline
    unet: torch.nn.Module  # possibly compiled
    schedule: DDIMSchedule
    prompts: PromptSet
    resolution: int
    device: torch.device
    dtype: torch.dtype
    base_hash: str
    adapter_hash: str | None
    prompt_cache: PromptCache  # class prompts are encoded once per run, not per batch

    @property
    def generator_hash(self) -> str:
        from lesiongen.synthesis.outputs import generator_hash

        return generator_hash(self.base_hash, self.adapter_hash)

    def describe_sampler(self) -> str:
        """The schedule, and the feature cache when there is one (every output row carries this)."""
        interval = getattr(self.unet, "interval", None)
        suffix = f"; deep features recomputed every {interval} steps (DeepCache)" if interval else ""
        return self.schedule.describe() + suffix


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def model_identity(config: SynthesisConfig) -> tuple[str, str | None]:
    """(base hash, adapter hash), checked before anything is written."""
    from lesiongen.diffusion.adapters import check_adapter_base
    from lesiongen.diffusion.fingerprint import pipeline_hash

    if config.adapter:
        return check_adapter_base(config.base, config.adapter)
    return pipeline_hash(config.base), None


def load_generator(config: SynthesisConfig, device: torch.device, identity: tuple[str, str | None]) -> Generator:
    from lesiongen.data.prompts import load_prompts
    from lesiongen.diffusion.adapters import AdapterInfo, load_adapted_pipeline
    from lesiongen.diffusion.generate import optimize_for_inference
    from lesiongen.synthesis.feature_cache import FeatureCachedUNet
    from lesiongen.synthesis.latents import pipeline_resolution

    base_hash, adapter_digest = identity
    prompt_file = config.prompts or (AdapterInfo.load(config.adapter).prompt_file if config.adapter else "ham10000")
    dtype = resolve_dtype(config.dtype, device)
    pipe = load_adapted_pipeline(config.base, config.adapter, allow_pickle=config.allow_pickle, torch_dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    cached = config.feature_cache > 1
    # also freezes every weight: only embeddings are ever optimised here
    optimize_for_inference(pipe, fuse=True, compile=config.compile and not cached)
    unet = FeatureCachedUNet(pipe.unet, config.feature_cache, compile=config.compile) if cached else pipe.unet
    return Generator(pipe, unet, DDIMSchedule(pipe.scheduler.config, config.inversion.steps, device),
                     load_prompts(prompt_file), pipeline_resolution(pipe), device, dtype, base_hash, adapter_digest,
                     PromptCache(pipe, device))


def load_checked_classifier(path: str, flag: str, manifest, device: torch.device):
    """(model, info) of a classifier folder that predicts the manifest's classes, in its order."""
    from lesiongen.classifier.models import load_classifier

    model, info = load_classifier(path, device=device)
    model.requires_grad_(False)
    if list(info.classes) != list(manifest.classes):
        raise InputError(f"{flag} {path} predicts classes {info.classes}, but the manifest's are {manifest.classes}")
    return model, info


def check_classifiers(config: SynthesisConfig, manifest) -> None:
    """The classifier folders' descriptions (cheap), checked before anything is written."""
    from lesiongen.classifier.models import MODEL_FILE, ClassifierInfo

    for path, flag in ((config.classifier, "--classifier"), (config.reference_classifier, "--reference-classifier")):
        if not path:
            continue
        try:
            info = ClassifierInfo.read(path)
        except InputError as err:
            raise InputError(f"{flag}: {err}") from err
        if not (Path(path) / MODEL_FILE).is_file():
            raise InputError(f"{flag} {path}: {MODEL_FILE} is missing")
        if list(info.classes) != list(manifest.classes):
            raise InputError(f"{flag} {path} predicts classes {info.classes}, but the manifest's are "
                             f"{manifest.classes}")


def load_classifiers(config: SynthesisConfig, manifest, device: torch.device):
    """(guide, judge): the classifier being improved (for classifier guidance) and the filter's judge."""
    guide = load_checked_classifier(config.classifier, "--classifier", manifest, device) if config.classifier else None
    if config.reference_classifier:
        return guide, load_checked_classifier(config.reference_classifier, "--reference-classifier", manifest, device)
    return guide, guide


def load_filter(config: SynthesisConfig, manifest, device: torch.device, judge=None) -> VariantFilter:
    """The judge classifier (given, or loaded from the config) and the training set as a memorisation index."""
    from lesiongen.data.images import load_uint8

    if judge is None:
        judge = load_classifiers(config, manifest, device)[1]
    variant_filter = VariantFilter(config.filters, manifest.classes, classifier=judge)
    if config.filters.memorization:
        train = manifest.split("train")
        train = train.subset(~train.is_synthetic)
        images = load_uint8(train.image_paths(), variant_filter.size, cache_dir=config.cache_dir)
        variant_filter.memorization = build_memorization_index(images, list(train.df["group_id"]), config.filters,
                                                               classifier=judge)
        variant_filter.reference_ids = list(train.df["image"])
        held_out = manifest.subset(manifest.df["split"].isin(["val", "test"]) & ~manifest.is_synthetic)
        if len(held_out):
            images = load_uint8(held_out.image_paths(), variant_filter.size, cache_dir=config.cache_dir)
            variant_filter.held_out = MemorizationIndex(images, phash_threshold=config.filters.phash_threshold)
            variant_filter.held_out_ids = list(held_out.df["image"])
    return variant_filter


# -- the run ----------------------------------------------------------------------------------------


def mine(config: SynthesisConfig):
    """(manifest, mining result) with every mined image checked against the manifest row it came from."""
    from lesiongen.data.manifest import load_manifest

    manifest = load_manifest(config.manifest)
    predictions = load_predictions(config.predictions, config.manifest, split=config.mining.split,
                                   classes=manifest.classes)
    result = mine_hard_cases(predictions, config.mining)
    rows = manifest.df.set_index("image")
    for i, case in result.cases.iterrows():
        if case["image"] not in rows.index:
            raise InputError(f"{config.predictions}: image '{case['image']}' is not in {config.manifest}")
        truth = rows.loc[case["image"]]
        for column in ("label", "split", "group_id"):
            if str(truth[column]) != str(case[column]):
                raise InputError(f"{config.predictions}: image '{case['image']}' has {column} '{case[column]}', "
                                 f"but {config.manifest} says '{truth[column]}'")
    return manifest, result


def input_hashes(config: SynthesisConfig, identity: tuple[str, str | None]) -> dict[str, str | None]:
    """Content hashes of everything a run's images and filters depend on besides its settings: a resumed run
    must find the same files under its paths (a retrained adapter or classifier in the same folder would
    otherwise mix two models' outputs in one manifest)."""
    from lesiongen.classifier.models import INFO_FILE, MODEL_FILE
    from lesiongen.utils.hashing import sha256_file, sha256_files

    def classifier(path: str | None) -> str | None:
        return sha256_files([Path(path) / MODEL_FILE, Path(path) / INFO_FILE]) if path else None

    base_hash, adapter_digest = identity
    return {"base": base_hash, "adapter": adapter_digest, "classifier": classifier(config.classifier),
            "reference_classifier": classifier(config.reference_classifier),
            "predictions": sha256_file(config.predictions), "manifest": sha256_file(config.manifest)}


def prepare_output(out: Path, resolved: dict, overwrite: bool, inputs: dict[str, str | None]) -> OutputFolder:
    """Start, resume (same config and input files) or refuse (another config or other input files, or a folder
    this command did not make)."""
    from lesiongen.utils.atomic import remove_temporaries, write_text
    from lesiongen.utils.inputs import INPUTS_FILE, changed_inputs, record_inputs

    config_file = out / "config.yaml"
    folder = OutputFolder(out, "mine-and-generate")
    if folder.existing and not overwrite:
        if not config_file.is_file():
            raise OutputExistsError(f"{out} holds no config.yaml of a mine-and-generate run; "
                                    "pass --overwrite or choose another --out")
        else:
            # a setting newer than the run's config.yaml, at any depth, had its default then (runs of older
            # versions resume)
            previous = with_defaults(SynthesisConfig, yaml.safe_load(config_file.read_text(encoding="utf-8")) or {})
            changed = changed_settings({k: v for k, v in previous.items() if k not in EXECUTION_KEYS},
                                       {k: v for k, v in resolved.items() if k not in EXECUTION_KEYS})
            if changed:
                raise OutputExistsError(f"{out} holds a run with other settings ({'; '.join(changed)}); "
                                        "pass --overwrite to replace it or choose another --out")
            replaced = changed_inputs(out, inputs)
            if replaced:
                raise OutputExistsError(
                    f"{out} holds a run made from other files under the same paths ({', '.join(replaced)}: "
                    f"content changed since it started, see {INPUTS_FILE}); resuming would mix their outputs. "
                    "Pass --overwrite to start again, or choose another --out")
    folder.start(replace=overwrite)
    remove_temporaries(out)  # half-written records and images of a killed run: redone, never read
    write_text(config_file, yaml.safe_dump(resolved, sort_keys=False))
    record_inputs(out, inputs)
    return folder


def run_mine_and_generate(config: SynthesisConfig, *, overwrite: bool = False) -> dict:
    """The whole command on this process; returns the run's summary (on every process)."""
    from lesiongen.synthesis import outputs
    from lesiongen.utils.distributed import process_state, together

    started = time.time()
    state = process_state()
    manifest, mined = mine(config)
    check_classifiers(config, manifest)
    identity = model_identity(config)
    out = Path(config.out)
    folder = None
    with together(state):  # a refused --out stops every process
        if state.is_main_process:
            folder = prepare_output(out, config.resolved(), overwrite, input_hashes(config, identity))
    # A run this call started that fails before its first finished source leaves no folder behind.
    with (folder.removed_on_failure(lambda path: bool(outputs.finished_sources(path)))
          if folder is not None else contextlib.nullcontext()):
        return _run(config, state, manifest, mined, identity, out, started, folder)


def _run(config: SynthesisConfig, state, manifest, mined: MiningResult, identity, out: Path, started: float,
         folder: OutputFolder | None) -> dict:
    from lesiongen.synthesis import outputs
    from lesiongen.utils.atomic import atomic_path
    from lesiongen.utils.distributed import together

    with together(state):
        if state.is_main_process and not (out / outputs.HARD_CASES).is_file():
            with atomic_path(out / outputs.HARD_CASES) as tmp:
                mined.cases.to_csv(tmp, index=False)

    generator = load_generator(config, state.device, identity)
    guide, judge = load_classifiers(config, manifest, state.device)
    variant_filter = load_filter(config, manifest, state.device, judge)
    done = outputs.finished_sources(out)
    mine_rows = mined.cases.iloc[state.process_index::state.num_processes]
    todo = mine_rows[~mine_rows["image"].isin(done)]
    batches = [todo.iloc[i:i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    from tqdm.auto import tqdm

    with together(state):  # a process that fails on its share stops the others at the end of theirs
        for batch in tqdm(batches, desc="mine-and-generate", unit="batch",
                          disable=not (config.progress and state.is_main_process)):
            for record in process_batch(batch, manifest, config, generator, variant_filter, guide, out):
                outputs.write_record(out, record)

    with together(state):
        if state.is_main_process:
            records = outputs.load_records(out, list(mined.cases["image"]))
            outputs.write_outputs(out, mined.cases, records, manifest.classes,
                                  leakage_warning=mined.leakage_warning,
                                  summary=run_summary(config, mined, generator, variant_filter,
                                                      time.time() - started, processes=state.num_processes),
                                  manifest_meta={"source_manifest": str(Path(config.manifest).resolve()),
                                                 "generator_hash": generator.generator_hash})
            folder.finish()
    return json.loads((out / outputs.SUMMARY).read_text(encoding="utf-8"))


def run_summary(config: SynthesisConfig, mined: MiningResult, generator: Generator, variant_filter: VariantFilter,
                seconds: float, *, processes: int = 1) -> dict:
    return {
        "mining": mined.stats,
        "method": config.variants.method,
        "strength": config.variants.strength,
        "variants_per_image": config.variants.per_image,
        "inversion_depth": inversion_depth(config, generator.schedule),
        "scheduler": generator.describe_sampler(),
        "resolution": generator.resolution,
        "base_hash": generator.base_hash,
        "adapter_hash": generator.adapter_hash,
        "generator_hash": generator.generator_hash,
        "label_filter": (f"on: p(label) >= {config.filters.min_label_prob:g} by "
                         f"{config.reference_classifier or config.classifier}") if variant_filter.classifier is not None
                        else "off (no --classifier)",
        "memorization_filter": "on" if variant_filter.memorization is not None else "off",
        "seconds": round(seconds, 1),
        "processes": processes,
    }


def inversion_depth(config: SynthesisConfig, schedule: DDIMSchedule) -> int:
    """How many levels to invert: up to where the variants start, or all of them (`inversion.depth`)."""
    if config.inversion.depth == "full":
        return schedule.steps
    return schedule.level_for_strength(config.variants.strength)


def process_batch(batch: pd.DataFrame, manifest, config: SynthesisConfig, generator: Generator,
                  variant_filter: VariantFilter, guide, out: Path) -> list[dict]:
    """Invert a batch of sources, make and filter their variants, save images; one record per source."""
    from lesiongen.data.images import load_uint8
    from lesiongen.diffusion.generate import save_png
    from lesiongen.synthesis import outputs
    from lesiongen.synthesis.latents import encode, to_model_pixels

    g, vcfg = generator, config.variants
    images = load_uint8([manifest.root / p for p in batch["image"]], g.resolution)
    with torch.no_grad():
        latents = encode(g.pipe.vae, to_model_pixels(images, g.resolution, device=g.device, dtype=g.dtype))
    labels = list(batch["label"])
    cond = g.prompt_cache([g.prompts.class_prompt(label) for label in labels])
    # CFG's unconditional side is the prompt file's negative prompt: variants steer away from it
    uncond = g.prompt_cache([g.prompts.negative_prompt] * len(labels))
    inversion = invert(g.unet, g.schedule, latents, cond, uncond, config.inversion, sampling_guidance=vcfg.guidance,
                       depth=inversion_depth(config, g.schedule))
    round_trip = measure_round_trip(g.unet, g.pipe.vae, g.schedule, inversion, images)
    scores = round_trip.rows()
    verdicts = reconstruction_verdicts(scores, config.filters)
    usable = [i for i, verdict in enumerate(verdicts) if not verdict]
    variants_of = make_and_filter(batch.iloc[usable], inversion.select(usable), config, generator,
                                  variant_filter, guide) if usable else []

    records = []
    for i, (_, source) in enumerate(batch.iterrows()):
        image, label = source["image"], source["label"]
        reconstruction = outputs.reconstruction_path(label, image)
        save_png(round_trip.reconstruction[i], out / reconstruction)
        variants = variants_of[usable.index(i)] if i in usable else []
        for variant in variants:
            variant["image"] = outputs.variant_path("images" if variant["keep"] else "rejected", label, image,
                                                    variant["index"])
            pixels = variant.pop("pixels")
            if variant["keep"] or config.save_rejected:
                save_png(pixels, out / variant["image"])
        records.append({
            "source": {k: _plain(source[k]) for k in ("rank", "image", "label", "split", "group_id", "pred",
                                                     "reason", "hardness")},
            "inversion": {**scores[i], "depth": inversion.depth, "verdict": verdicts[i]},
            "reconstruction": reconstruction,
            "method": vcfg.method, "strength": vcfg.strength, "renoise": vcfg.renoise, "guidance": vcfg.guidance,
            "lambda": vcfg.embedding_lambda if vcfg.method == "embedding" else None,
            "scheduler": g.describe_sampler(), "base_hash": g.base_hash, "adapter_hash": g.adapter_hash,
            "generator_hash": g.generator_hash, "variants": variants,
        })
    return records


def make_and_filter(sources: pd.DataFrame, inversion, config: SynthesisConfig, generator: Generator,
                    variant_filter: VariantFilter, guide) -> list[list[dict]]:
    """For each source: its variants (pixels, seed, filter scores, keep), in variant order."""
    from lesiongen.synthesis.conditioning import Conditioning
    from lesiongen.synthesis.variants import (
        ClassifierGuidance,
        fit_image_embeddings,
        interpolate_embeddings,
        sample_variants,
        variant_seed,
    )

    g, vcfg, k = generator, config.variants, config.variants.per_image
    images, labels = list(sources["image"]), list(sources["label"])
    seeds = [variant_seed(config.seed, image, index) for image in images for index in range(k)]
    variant_labels = [label for label in labels for _ in range(k)]
    conditioning = None
    if vcfg.method == "embedding":
        fitted = fit_image_embeddings(g.unet, g.schedule, inversion.clean, inversion.sampling.cond,
                                      steps=vcfg.embedding_steps, lr=vcfg.embedding_lr,
                                      seeds=[variant_seed(config.seed, image, 0, "embedding") for image in images])
        mixed = interpolate_embeddings(inversion.sampling.cond, fitted, vcfg.embedding_lambda)
        conditioning = Conditioning(mixed, inversion.sampling.uncond, inversion.sampling.scale)
    correction = None
    if vcfg.classifier_guidance:
        model, info = guide
        targets = torch.tensor([info.classes.index(label) for label in variant_labels], device=g.device)
        correction = ClassifierGuidance(g.pipe.vae, model, info, g.schedule, targets,
                                        scale=vcfg.classifier_guidance, target_prob=vcfg.classifier_target_prob)
    pixels = sample_variants(g.unet, g.pipe.vae, g.schedule, inversion, vcfg, seeds=seeds, conditioning=conditioning,
                             correction=correction)
    scores = variant_filter.score(pixels, variant_labels)
    variants = [{"index": row % k, "seed": seed, **{c: _plain(v) for c, v in scores.iloc[row].items()},
                 "pixels": pixels[row]} for row, seed in enumerate(seeds)]
    return [variants[i * k:(i + 1) * k] for i in range(len(images))]


def _plain(value):
    """numpy / pandas scalars -> JSON-friendly Python values."""
    return value.item() if hasattr(value, "item") else value
