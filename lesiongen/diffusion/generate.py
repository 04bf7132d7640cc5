"""Text-to-image generation: class prompts or free prompts -> PNGs + a manifest with provenance.

The pipeline's own `__call__` does the denoising (classifier-free guidance batched as one UNet call);
`Renderer` adds what makes it faster at equal steps: LoRA folded into the weights, fused QKV
projections, channels-last memory, prompt states computed once per distinct prompt, and optionally
`torch.compile`. One seeded CPU generator per image makes every image reproducible on its own,
whatever batch it landed in.

Output folder: `images/<class>/<class>-<i>.png`, `manifest.csv` (+ sidecar; synthetic=1, split=train,
a fresh `gen-<hash>` group per image), `generation.json` (settings and hashes). Rerunning into the
same folder with the same settings fills in the missing images only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lesiongen.data.prompts import PromptSet
from lesiongen.errors import InputError, LesiongenError, OutputExistsError
from lesiongen.utils.distributed import together
from lesiongen.utils.outdir import OutputFolder

SCHEDULERS = ("ddim", "dpmpp", "euler")
GENERATION_FILE = "generation.json"
MANIFEST_FILE = "manifest.csv"
# Settings that change the pixels: a folder made with other values cannot be completed with these.
LOCKED_SETTINGS = ("steps", "guidance", "scheduler", "resolution", "negative_prompt", "seed", "base_hash",
                   "adapter_hash")


@dataclass
class GenerationSettings:
    steps: int = 30
    guidance: float = 7.5
    scheduler: str = "dpmpp"
    resolution: int | None = None  # None: the adapter's training resolution, else the base's native one
    batch_size: int = 8
    negative_prompt: str | None = None  # None: the prompt file's
    seed: int = 0
    compile: bool = False
    fuse: bool = True  # fold LoRA and fuse QKV projections (slightly different floating-point sums)

    def __post_init__(self) -> None:
        from lesiongen.config import check_finite

        check_finite(self)  # --guidance nan would pass the range check below
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}, got '{self.scheduler}'")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class ImageRequest:
    """One image: what to draw, its own seed, where it goes (relative to the output folder)."""

    label: str
    prompt: str
    seed: int
    image: str


def set_scheduler(pipe, name: str) -> None:
    """Swap the sampler, keeping the base's noise schedule (betas, prediction type)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    config = pipe.scheduler.config
    if name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(config)
    elif name == "dpmpp":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    elif name == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(config)
    else:
        raise InputError(f"scheduler '{name}' is not one of {list(SCHEDULERS)}")


def optimize_for_inference(pipe, *, fuse: bool = True, compile: bool = False):
    """Speed-ups that leave the model's function unchanged (up to floating-point rounding)."""
    if fuse:
        if any(getattr(model, "peft_config", None) for model in (pipe.unet, pipe.text_encoder)):
            pipe.fuse_lora()
            pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA branches
        pipe.fuse_qkv_projections()
    # Frozen last: fusing makes new to_qkv / to_kv layers that require grad, and mine-and-generate's null-text
    # and embedding fits run autograd through the UNet (weight gradients computed, kept and never zeroed).
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    if pipe.device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile:
        pipe.unet = torch.compile(pipe.unet)
    return pipe


class Renderer:
    """Batches of `ImageRequest` -> uint8 images (N, 3, H, W) through a pipeline."""

    def __init__(self, pipe, settings: GenerationSettings, negative_prompt: str, resolution: int) -> None:
        self.pipe, self.settings = pipe, settings
        self.negative_prompt, self.resolution = negative_prompt, resolution
        self._states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def guided(self) -> bool:
        return self.settings.guidance > 1.0

    @torch.no_grad()
    def prompt_states(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if prompt not in self._states:
            self._states[prompt] = self.pipe.encode_prompt(prompt, self.pipe.device, 1, self.guided,
                                                           self.negative_prompt)
        return self._states[prompt]

    @torch.no_grad()
    def __call__(self, requests: list[ImageRequest]) -> torch.Tensor:
        states = [self.prompt_states(r.prompt) for r in requests]
        positive = torch.cat([s[0] for s in states])
        negative = torch.cat([s[1] for s in states]) if self.guided else None
        images = self.pipe(
            prompt_embeds=positive, negative_prompt_embeds=negative,
            generator=[torch.Generator().manual_seed(r.seed) for r in requests],
            num_inference_steps=self.settings.steps, guidance_scale=self.settings.guidance,
            height=self.resolution, width=self.resolution, output_type="pt",
        ).images
        return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def class_requests(prompts: PromptSet, counts: dict[str, int], seed: int) -> list[ImageRequest]:
    """`counts[c]` images of each class c from its plain class prompt; image i of a class has seed
    `seed + i`, so a larger count only adds images."""
    return [ImageRequest(c, prompts.class_prompt(c), seed + i, f"images/{c}/{c}-{i:05d}.png")
            for c, count in counts.items() for i in range(count)]


def class_counts(entries: list[str], n: int, prompts: PromptSet) -> dict[str, int]:
    """`--class` values -> images per class: `mel` (n of them), `mel=200`, or `all` (n of every class)."""
    counts: dict[str, int] = {}
    for entry in entries:
        label, _, count = entry.partition("=")
        if label == "all":
            names = prompts.class_names
        else:
            prompts.get(label)
            names = [label]
        try:
            number = int(count) if count else n
        except ValueError:
            number = 0
        if number < 1:
            raise InputError(f"--class {entry}: expected CLASS or CLASS=N with N a positive whole number")
        counts.update(dict.fromkeys(names, number))
    return counts


def prompt_requests(prompts: PromptSet, prompt: str, n: int, seed: int, label: str | None) -> list[ImageRequest]:
    """`n` images of a free prompt, labelled `label` or by the one class token the prompt contains."""
    if label is None:
        found = [key for key, cls in prompts.classes.items() if cls.token in prompt]
        if len(found) != 1:
            raise InputError(f"--prompt '{prompt}': cannot tell which class the images show (class tokens found: "
                             f"{found}); pass --class to label them")
        label = found[0]
    prompts.get(label)
    stem = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    return [ImageRequest(label, prompt, seed + i, f"images/{label}/prompt-{stem}-{i:05d}.png") for i in range(n)]


@dataclass
class GenerationRecord:
    """`generation.json`: what made the folder's images."""

    settings: dict
    base: str
    base_hash: str
    adapter: str | None
    adapter_hash: str | None
    prompt_file: str
    classes: list[str]
    requests: int = 0
    extra: dict = field(default_factory=dict)
    request: dict | None = None  # what was asked for: {"classes": {class: n}} or {"prompt", "label", "n"}

    def locked(self) -> dict:
        values = {**self.settings, "base_hash": self.base_hash, "adapter_hash": self.adapter_hash}
        return {k: values.get(k) for k in LOCKED_SETTINGS}

    @property
    def generator_hash(self) -> str:
        return hashlib.sha256(f"{self.base_hash}|{self.adapter_hash}".encode()).hexdigest()


def _keeps_every_image(old: dict, new: dict | None) -> bool:
    """`new` asks for every image of `old` (the same or higher counts), so no row of the folder goes."""
    new = new or {}
    if "classes" in old:
        return isinstance(new.get("classes"), dict) and all(
            new["classes"].get(label, 0) >= count for label, count in old["classes"].items())
    return ({k: v for k, v in old.items() if k != "n"} == {k: v for k, v in new.items() if k != "n"}
            and new.get("n", 0) >= old.get("n", 0))


def _request_changes(old_record: GenerationRecord, record: GenerationRecord) -> dict[str, tuple]:
    """What `record` asks for that the folder made for `old_record` cannot give by completing itself."""
    if old_record.request is not None and not _keeps_every_image(old_record.request, record.request):
        return {"request": (old_record.request, record.request)}
    if old_record.request is None and record.requests < old_record.requests:  # folders of older versions
        return {"images requested": (old_record.requests, record.requests)}
    return {}


def check_resumable(out_dir: Path, record: GenerationRecord, overwrite: bool, *,
                    settings_known: bool = True) -> OutputFolder:
    """A folder is completed (or extended: higher counts) only by the same request and settings; a request
    that would drop images, or other settings, needs another folder or --overwrite (which replaces only a
    folder `generate` made). `settings_known=False` checks only the request and the seed: what is known
    before the pipeline loads, so a wrong --out fails in a second, not after the load."""
    folder = OutputFolder(out_dir, "generation")
    path = out_dir / GENERATION_FILE
    if not folder.existing or not path.is_file():
        return folder
    old_record = GenerationRecord(**json.loads(path.read_text(encoding="utf-8")))
    old = old_record.locked()
    locked = record.locked() if settings_known else {"seed": record.settings.get("seed")}
    changed = {k: (old[k], v) for k, v in locked.items() if old[k] != v}
    changed.update(_request_changes(old_record, record))
    if changed and not overwrite:
        details = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise OutputExistsError(f"{out_dir} holds images generated for another request or with other settings "
                                f"({details}); rerun the same request (or higher counts) to complete it, choose "
                                "another --out, or pass --overwrite to replace it")
    return folder


def manifest_rows(requests: list[ImageRequest], record: GenerationRecord, negative_prompt: str,
                  out_dir: Path) -> pd.DataFrame:
    """Manifest rows of the requests whose image exists, with the synthetic-row provenance columns."""
    s = record.settings
    rows = []
    for r in requests:
        if not (out_dir / r.image).is_file():
            continue
        identity = f"{record.generator_hash}|{r.prompt}|{r.seed}|{s['steps']}|{s['guidance']}|{s['scheduler']}"
        rows.append({
            "image": r.image, "label": r.label, "split": "train",
            "group_id": "gen-" + hashlib.sha256(identity.encode()).hexdigest()[:16],
            "synthetic": 1, "source_image": "", "method": "txt2img", "strength": 1.0, "seed": r.seed,
            "generator_hash": record.generator_hash, "prompt": r.prompt, "negative_prompt": negative_prompt,
            "steps": s["steps"], "guidance": s["guidance"], "scheduler": s["scheduler"],
            "resolution": s["resolution"], "base_hash": record.base_hash, "adapter_hash": record.adapter_hash or "",
        })
    return pd.DataFrame(rows)


def save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    from lesiongen.utils.atomic import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp)


def generate_to_folder(renderer: Renderer, requests: list[ImageRequest], out_dir: str | os.PathLike,
                       record: GenerationRecord, *, overwrite: bool = False, progress: bool = True,
                       processes=None) -> Path:
    """Render the requests whose PNG is missing, batch by batch; the manifest follows every batch.

    Under `accelerate launch` (`processes`: accelerate's `PartialState`) each process renders every
    n-th missing image; the main process keeps the manifest, which lists the PNGs present at the time
    of writing (they appear by atomic rename, so a listed image is always complete).
    """
    from lesiongen.utils.atomic import is_temporary, remove_temporaries, write_json

    out_dir = Path(out_dir)
    main = processes is None or processes.is_main_process
    record.requests = len(requests)
    folder = None
    with together(processes):  # a refused --out (other settings, say) stops every process
        if main:
            folder = check_resumable(out_dir, record, overwrite)
            folder.start(replace=overwrite)  # --overwrite: the folder's earlier images and manifest go
            remove_temporaries(out_dir)  # images a killed run was writing: made again below
            write_json(out_dir / GENERATION_FILE, asdict(record))
    # A folder this call started that fails before its first image is removed again.
    with (folder.removed_on_failure(lambda path: any(not is_temporary(p) for p in (path / "images").rglob("*.png")))
          if folder is not None else contextlib.nullcontext()):
        return _render(renderer, requests, out_dir, record, main=main, progress=progress, processes=processes,
                       folder=folder)


def _render(renderer: Renderer, requests: list[ImageRequest], out_dir: Path, record: GenerationRecord, *,
            main: bool, progress: bool, processes, folder: OutputFolder | None) -> Path:
    from lesiongen.data.manifest import Manifest, write_manifest

    # Shard the whole request list first, then drop what exists: every image belongs to exactly one process
    # whatever the others have written by the time each looks (listing first would shift the shards).
    mine = requests[processes.process_index::processes.num_processes] if processes is not None else requests
    todo = [r for r in mine if not (out_dir / r.image).is_file()]
    size = renderer.settings.batch_size
    batches = [todo[i:i + size] for i in range(0, len(todo), size)]

    def write_manifest_now() -> None:
        df = manifest_rows(requests, record, renderer.negative_prompt, out_dir)
        write_manifest(Manifest(df, out_dir, list(record.classes)), out_dir / MANIFEST_FILE,
                       generation=GENERATION_FILE)

    from tqdm.auto import tqdm

    with together(processes):  # a process that fails on its share stops the others at the end of theirs
        for batch in tqdm(batches, desc="generate", unit="batch", disable=not (progress and main)):
            for request, image in zip(batch, renderer(batch), strict=True):
                save_png(image, out_dir / request.image)
            if main:
                write_manifest_now()
    with together(processes):  # the caller's next barrier (the loop's) is not met by a main process that failed
        if main:
            write_manifest_now()
            missing = [r.image for r in requests if not (out_dir / r.image).is_file()]
            if missing:  # never mark a folder complete that lacks images of its request
                raise LesiongenError(f"{out_dir}: {len(missing)} of {len(requests)} images were not written "
                                     f"(e.g. {missing[0]}); rerun the same command to fill them in")
            folder.finish()
    return out_dir / MANIFEST_FILE


def inference_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class LoadedGenerator:
    """A pipeline loaded once (base + adapter, scheduler, fast path) that fills any number of folders.

    The loop draws each class into its own folder with its own count and seeds; loading the pipeline
    once for all of them, not once per class, is what this object is for.
    """

    renderer: Renderer
    record: GenerationRecord  # the folder record without its seed and request count
    prompt_set: PromptSet
    processes: Any

    def class_folder(self, counts: dict[str, int], seed: int, out: str | os.PathLike, *,
                     overwrite: bool = False, progress: bool = True) -> Path:
        """`counts[c]` images of each class c into `out` (resumable; a folder made with lower counts is
        topped up); returns its manifest path."""
        for label in counts:
            self.prompt_set.get(label)
        return self._fill(class_requests(self.prompt_set, counts, seed), seed, out, overwrite, progress,
                          {"classes": dict(counts)})

    def prompt_folder(self, prompt: str, label: str | None, n: int, seed: int, out: str | os.PathLike, *,
                      overwrite: bool = False, progress: bool = True) -> Path:
        """`n` images of a free prompt into `out`, labelled `label` or by the class token it names."""
        requests = prompt_requests(self.prompt_set, prompt, n, seed, label)
        return self._fill(requests, seed, out, overwrite, progress,
                          {"prompt": prompt, "label": requests[0].label if requests else label, "n": n})

    def _fill(self, requests: list[ImageRequest], seed: int, out: str | os.PathLike, overwrite: bool,
              progress: bool, request: dict) -> Path:
        record = replace(self.record, settings={**self.record.settings, "seed": seed}, request=request)
        return generate_to_folder(self.renderer, requests, out, record, overwrite=overwrite, progress=progress,
                                  processes=self.processes)


def adapter_and_prompts(adapter: str | os.PathLike | None, prompts: str | None):
    """The adapter's record (None without one) and the prompt set: `prompts`, else the adapter's own."""
    from lesiongen.data.prompts import load_prompts
    from lesiongen.diffusion.adapters import AdapterInfo

    info = AdapterInfo.load(adapter) if adapter is not None else None
    return info, load_prompts(prompts or (info.prompt_file if info else "ham10000"))


def load_generator(*, base: str | None, adapter: str | os.PathLike | None, steps: int = 30,
                   guidance: float = 7.5, scheduler: str = "dpmpp", negative_prompt: str | None = None,
                   batch_size: int = 8, resolution: int | None = None, prompts: str | None = None,
                   compile: bool = False, fuse: bool = True, allow_pickle: bool = False) -> LoadedGenerator:
    """Load base (+ adapter) on this process's device with the generation settings validated first."""
    from lesiongen.diffusion.adapters import check_adapter_base, load_adapted_pipeline
    from lesiongen.diffusion.fingerprint import pipeline_hash
    from lesiongen.diffusion.info import native_resolution
    from lesiongen.diffusion.resolution import check_resolution
    from lesiongen.utils.distributed import process_state

    info, prompt_set = adapter_and_prompts(adapter, prompts)
    base = base or (info.base if info else None)
    if base is None:
        raise InputError("--base is required when no --adapter names its base")
    negative = prompt_set.negative_prompt if negative_prompt is None else negative_prompt
    try:
        settings = GenerationSettings(steps=steps, guidance=guidance, scheduler=scheduler, batch_size=batch_size,
                                      negative_prompt=negative, compile=compile, fuse=fuse)
    except ValueError as err:
        raise InputError(str(err)) from err
    base_hash, adapter_digest = check_adapter_base(base, adapter) if adapter else (pipeline_hash(base), None)
    processes = process_state()  # one process, or one per GPU under `accelerate launch`
    dtype = inference_dtype(processes.device)
    pipe = load_adapted_pipeline(base, adapter, allow_pickle=allow_pickle, torch_dtype=dtype)
    pipe.to(processes.device)
    pipe.set_progress_bar_config(disable=True)
    if resolution is None:  # 0 is not "the default": check_resolution refuses it
        resolution = info.resolution if info else native_resolution(pipe)
    settings.resolution = check_resolution(pipe, resolution, where=str(base))
    set_scheduler(pipe, scheduler)
    optimize_for_inference(pipe, fuse=fuse, compile=compile)
    record = GenerationRecord(settings=asdict(settings), base=str(base), base_hash=base_hash,
                              adapter=str(adapter) if adapter else None, adapter_hash=adapter_digest,
                              prompt_file=prompt_set.source, classes=prompt_set.class_names)
    return LoadedGenerator(Renderer(pipe, settings, negative, settings.resolution), record, prompt_set, processes)


def run_generate(*, classes: list[str] | None, n: int, prompt: str | None, out: str | os.PathLike, seed: int = 0,
                 overwrite: bool = False, progress: bool = True, **loading: Any) -> Path:
    """`lesiongen generate`: class-prompted images (`classes` as `--class` takes them: `mel`, `mel=200`,
    `all`; `n` per class unless given), or `n` images of one free `prompt`.

    `loading` holds `load_generator`'s arguments (base, adapter, steps, guidance, ...).
    """
    if prompt is not None and classes and len(classes) > 1:
        raise InputError("--prompt takes at most one --class (the label of its images)")
    if prompt is None and not classes:
        raise InputError("pass --class (one or more, or 'all') or --prompt")
    _, prompt_set = adapter_and_prompts(loading.get("adapter"), loading.get("prompts"))
    # Everything checkable without the pipeline is checked first: bad classes, an unlabelled prompt, an --out
    # that holds another request's images fail in a second, not after the load.
    counts: dict[str, int] = {}
    if prompt is None:
        counts = class_counts(classes, n, prompt_set)
        request: dict = {"classes": counts}
    else:
        if classes and "=" in classes[0]:
            raise InputError(f"--class {classes[0]}: with --prompt, --class is only the images' label (CLASS); "
                             "give their number with --n")
        label = classes[0] if classes else None
        labelled = prompt_requests(prompt_set, prompt, n, seed, label)
        request = {"prompt": prompt, "label": labelled[0].label if labelled else label, "n": n}
    check_resumable(Path(out), GenerationRecord(settings={"seed": seed}, base="", base_hash="", adapter=None,
                                                adapter_hash=None, prompt_file="", classes=[], request=request),
                    overwrite, settings_known=False)
    generator = load_generator(**loading)
    if prompt is not None:
        return generator.prompt_folder(prompt, classes[0] if classes else None, n, seed, out, overwrite=overwrite,
                                       progress=progress)
    return generator.class_folder(counts, seed, out, overwrite=overwrite, progress=progress)
