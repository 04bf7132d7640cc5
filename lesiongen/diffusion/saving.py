"""Save a pipeline as a diffusers folder, atomically, with a provenance file beside the components."""

from __future__ import annotations

import os
from pathlib import Path

from lesiongen.utils.atomic import atomic_dir, write_json
from lesiongen.utils.outdir import check_replaceable, write_marker

PROVENANCE_FILE = "lesiongen_base.json"


def save_pipeline(pipe, out: str | os.PathLike, *, provenance: dict | None = None, overwrite: bool = False,
                  max_shard_size: str | None = None) -> Path:
    """`save_pretrained` (safetensors) into a temporary folder that replaces `out` only when complete."""
    out = check_replaceable(out, "base", overwrite, what="base model folder")
    with atomic_dir(out) as tmp:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        pipe.save_pretrained(str(tmp), safe_serialization=True, **kwargs)
        if provenance:
            write_json(tmp / PROVENANCE_FILE, provenance)
        write_marker(tmp, "base")
    return out
