"""`inputs.json`: content hashes of the files a run reads, recorded when it starts and checked on resume.

A resumed run compares its settings, which name input files by path; a manifest re-indexed with another split,
or a synthetic folder that grew, keeps its path and changes its content. Resuming on it would continue a model
trained partly on other data (images that are now validation or test images, say) with nothing saying so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lesiongen.errors import InputError
from lesiongen.utils.atomic import write_json
from lesiongen.utils.hashing import sha256_file

INPUTS_FILE = "inputs.json"


def file_hashes(files: dict[str, str | os.PathLike | None]) -> dict[str, str | None]:
    """name -> SHA-256 of the file (None for an input not given)."""
    return {name: sha256_file(path) if path else None for name, path in files.items()}


def training_data_hashes(manifest: str | os.PathLike, prompts: str) -> dict[str, str | None]:
    """What a diffusion trainer learns from: the manifest, and the prompt file when given by path (a shipped
    prompt-set name is part of the package)."""
    return file_hashes({"--manifest": manifest, "--prompts": prompts if Path(prompts).expanduser().is_file() else None})


def record_inputs(folder: str | os.PathLike, hashes: dict[str, str | None]) -> None:
    write_json(Path(folder) / INPUTS_FILE, hashes)


def changed_inputs(folder: str | os.PathLike, hashes: dict[str, str | None]) -> list[str]:
    """The inputs whose content differs from the run's record; none for a run made before records existed.
    Only names in both count: which inputs a run has is a setting, compared with the others."""
    path = Path(folder) / INPUTS_FILE
    if not path.is_file():
        return []
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err}); it records the run's input files") from err
    if not isinstance(before, dict):
        raise InputError(f"{path}: expected a mapping of input name -> content hash")
    return sorted(name for name in set(before) & set(hashes) if before[name] != hashes[name])


def refuse_changed_inputs(folder: str | os.PathLike, hashes: dict[str, str | None], *, action: str,
                          fix: str) -> None:
    """An InputError naming the inputs whose files changed since the run in `folder` started."""
    changed = changed_inputs(folder, hashes)
    if changed:
        raise InputError(f"{action}: {folder} was started from other files under the same paths "
                         f"({', '.join(changed)}: content changed since, see {INPUTS_FILE}); {fix}")
