"""`lesiongen export`: convert LoRA and embedding files between diffusers and A1111 / kohya formats.

Targets:
- `diffusers`: `pytorch_lora_weights.safetensors` (with its LoraConfig) + `learned_embeds.safetensors`.
  kohya -> diffusers needs the base (`--base`, or the adapter's own), because only the model's module
  names can undo kohya's '.' -> '_' renaming.
- `kohya`: the LoRA as `<name>_kohya.safetensors` with the true alpha and `ss_*` / `modelspec.*` metadata.
- `a1111`: the kohya LoRA plus one A1111 embedding per token (`<trigger>.safetensors`, or `.pt` with
  `embedding_format="pt"` for old A1111 builds).

A source is an adapter folder, any folder of such files, or one file; each file's format is told
from its keys, never from its name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lesiongen.diffusion.adapters import ADAPTER_FILE, AdapterInfo, embedding_metadata, kohya_metadata
from lesiongen.diffusion.embedding_files import (
    DIFFUSERS_EMBEDDINGS_FILE,
    PICKLE_SUFFIXES,
    load_embeddings,
    save_a1111_embedding,
    save_diffusers_embeddings,
    trigger_word,
)
from lesiongen.diffusion.lora_files import (
    DIFFUSERS_LORA_FILE,
    LoraWeights,
    is_diffusers_lora,
    is_kohya_lora,
    load_diffusers_lora,
    lora_from_pipeline_loader,
    read_header,
    read_tensors,
    save_diffusers_lora,
    save_kohya_lora,
)
from lesiongen.errors import InputError
from lesiongen.utils.atomic import atomic_dir
from lesiongen.utils.outdir import check_replaceable, write_marker

TARGETS = ("diffusers", "kohya", "a1111")


@dataclass(frozen=True)
class SourceFile:
    kind: str  # "lora-diffusers", "lora-kohya", "embedding"
    path: Path


def classify(path: Path, *, allow_pickle: bool) -> SourceFile | None:
    """What a file holds, from its keys; None for files that are neither a LoRA nor an embedding."""
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise InputError(f"{path}: pickle files run code when loaded; pass --allow-pickle if you trust it")
        return SourceFile("embedding", path)
    if path.suffix != ".safetensors":
        return None
    tensors = read_tensors(path)
    if is_kohya_lora(tensors):
        return SourceFile("lora-kohya", path)
    if is_diffusers_lora(tensors):
        return SourceFile("lora-diffusers", path)
    if tensors and all(t.ndim in (1, 2) for t in tensors.values()):  # token -> vectors, or A1111's emb_params
        return SourceFile("embedding", path)
    return None


def find_sources(source: Path, *, allow_pickle: bool) -> list[SourceFile]:
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    if source.is_file():
        found = classify(source, allow_pickle=allow_pickle)
        if found is None:
            raise InputError(f"{source}: neither a LoRA (diffusers or kohya keys) nor a textual-inversion embedding")
        return [found]
    if (source / ADAPTER_FILE).is_file():  # an adapter folder: its canonical files, not its checkpoints
        info = AdapterInfo.load(source)
        names = ([DIFFUSERS_LORA_FILE] if info.has_lora else []) + [DIFFUSERS_EMBEDDINGS_FILE]
        return [f for f in (classify(source / n, allow_pickle=False) for n in names) if f is not None]
    suffixes = (".safetensors", *PICKLE_SUFFIXES) if allow_pickle else (".safetensors",)
    candidates = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in suffixes)
    found = [f for f in (classify(p, allow_pickle=allow_pickle) for p in candidates) if f is not None]
    if not found:
        raise InputError(f"{source}: no LoRA or embedding files found")
    return found


def export(source: str | os.PathLike, to: str, out: str | os.PathLike | None = None, *, base: str | None = None,
           token: str | None = None, allow_pickle: bool = False, overwrite: bool = False,
           embedding_format: str = "safetensors") -> list[Path]:
    """Convert every LoRA / embedding found in `source` to the `to` format; returns the files written."""
    if to not in TARGETS:
        raise InputError(f"--to {to}: expected one of {list(TARGETS)}")
    if embedding_format not in ("safetensors", "pt"):
        raise InputError(f"embedding format '{embedding_format}': expected safetensors or pt")
    source = Path(source)
    files = find_sources(source, allow_pickle=allow_pickle)
    folder = source if source.is_dir() else source.parent
    info = AdapterInfo.load(folder) if (folder / ADAPTER_FILE).is_file() else None
    out = Path(out) if out is not None else folder / f"export-{to}"
    check_replaceable(out, "export", overwrite, what="export folder")  # only ever replaces an earlier export
    loras = [f for f in files if f.kind.startswith("lora")]
    embedding_files = [f.path for f in files if f.kind == "embedding"]
    if to == "kohya" and not loras:  # kohya files are LoRAs: embeddings have their own targets
        raise InputError(f"{source} holds no LoRA to convert to kohya (found {len(embedding_files)} embedding "
                         "file(s), which convert with --to a1111 or --to diffusers)")
    if token is not None and len(embedding_files) > 1:
        raise InputError(f"--token {token} names one embedding, but {source} holds {len(embedding_files)}; "
                         "their file names give each its token")
    embeddings: dict = {}
    for path in embedding_files:
        embeddings.update(load_embeddings(path, token=token, allow_pickle=allow_pickle))
    written: list[Path] = []
    with atomic_dir(out) as tmp:  # written whole: --overwrite replaces an export, never merges into it
        for f in loras:
            written.append(_convert_lora(f, to, tmp, info=info, base=base or (info.base if info else None),
                                         allow_pickle=allow_pickle))
        if embeddings and to == "diffusers":
            header = info.metadata() if info else {}
            written.append(save_diffusers_embeddings(tmp / DIFFUSERS_EMBEDDINGS_FILE, embeddings, header))
        elif embeddings and to == "a1111":
            classes = {t: c for c, t in info.classes.items()} if info else {}
            for name, vectors in embeddings.items():
                header = embedding_metadata(info, classes.get(name, ""), name) if info else {"lesiongen.token": name}
                path = tmp / f"{trigger_word(name)}.{'pt' if embedding_format == 'pt' else 'safetensors'}"
                written.append(save_a1111_embedding(path, vectors, header, step=info.steps if info else 0))
        write_marker(tmp, "export")
    return [out / p.relative_to(tmp) for p in written]


def _convert_lora(f: SourceFile, to: str, out: Path, *, info: AdapterInfo | None, base: str | None,
                  allow_pickle: bool) -> Path:
    header = {k: v for k, v in read_header(f.path).items() if k.startswith("lesiongen.")}
    if f.kind == "lora-diffusers":
        lora = load_diffusers_lora(f.path)
    else:
        if to != "diffusers":  # kohya -> kohya / a1111: already the right format, copied with its header
            lora = None
        else:
            if base is None:
                raise InputError(f"{f.path}: converting a kohya LoRA to diffusers needs the base it was trained "
                                 "for (--base), whose module names undo kohya's renaming")
            from lesiongen.diffusion.loading import load_pipeline

            lora = lora_from_pipeline_loader(f.path, load_pipeline(base, allow_pickle=allow_pickle))
    if to == "diffusers":
        return save_diffusers_lora(out / DIFFUSERS_LORA_FILE, lora, header)
    name = info.name if info else f.path.stem.removesuffix("_kohya")
    target = out / f"{name}_kohya.safetensors"
    if lora is None:
        import shutil

        from lesiongen.utils.atomic import atomic_path

        with atomic_path(target) as tmp:
            shutil.copyfile(f.path, tmp)
        return target
    return save_kohya_lora(target, lora, kohya_metadata(info, lora) if info else {**header, **_minimal_kohya(lora)})


def _minimal_kohya(lora: LoraWeights) -> dict[str, str]:
    component = "unet" if "unet" in lora.layers else next(iter(lora.layers))
    rank, alpha = lora.summary(component)
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
            "ss_base_model_version": "sd_v1", "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.implementation": "diffusers"}
