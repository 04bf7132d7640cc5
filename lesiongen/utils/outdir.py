"""Output folders: which command made them, when `--overwrite` may replace them, cleanup of failed starts.

Every command that owns an output folder (`--out`) goes through this module:

- the folder it creates gets a marker, `.lesiongen.json`: the kind of output, the lesiongen version and
  whether the work in it is complete (a training run is not, until it has finished);
- `check_out_dir` refuses a path that is a file, and a non-empty folder that is not this kind of output
  (by its marker or, for folders made before markers existed, by the kind's signature files in `KINDS`):
  `--overwrite` only ever replaces a folder lesiongen made for the same command, or an empty one;
- `OutputFolder` adds the start (create, mark; on --overwrite the earlier result is moved aside, not
  deleted) and `removed_on_failure`: a folder this invocation started is removed again when the command
  fails before anything resumable is in it, so the corrected rerun just works, and the result it was to
  replace comes back. The result moved aside is deleted once the new one is finished or resumable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lesiongen.errors import InputError, OutputExistsError

MARKER = ".lesiongen.json"


@dataclass(frozen=True)
class Kind:
    title: str  # in messages: "X is not a <title> output folder made by lesiongen"
    # Folders made before the marker existed: any one of these sets of names (globs allowed), all present.
    signatures: tuple[tuple[str, ...], ...] = ()


KINDS: dict[str, Kind] = {
    "toy-data": Kind("toy data set"),
    # (first match wins: a finished pretraining run is a base model too, so it is looked for first)
    "pretrain": Kind("base pretraining", (("config.yaml", "metrics.jsonl"), ("config.yaml", "checkpoints"))),
    "base": Kind("base model", (("model_index.json", "lesiongen_base.json"),)),
    "classifier": Kind("classifier training", (("classifier.json",), ("config.yaml", "history.csv"))),
    "evaluation": Kind("evaluation", (("metrics.json", "predictions.csv"),)),
    "comparison": Kind("comparison", (("comparison.json",),)),
    "finetune": Kind("finetune", (("adapter.json", "config.yaml"), ("config.yaml", "checkpoint-*"))),
    "export": Kind("adapter export"),
    "generation": Kind("generation", (("generation.json",),)),
    "mining": Kind("mining", (("hard_cases.csv", "mining.json"),)),
    "mine-and-generate": Kind("mine-and-generate", (("config.yaml", "hard_cases.csv"),)),
    "quality": Kind("synthetic-quality", (("quality.json",),)),
    "loop": Kind("loop run", (("config.yaml", "state.json"),)),
}


# -- the marker ------------------------------------------------------------------------------------

def read_marker(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(folder: str | os.PathLike, kind: str, *, complete: bool = True) -> None:
    from lesiongen import __version__
    from lesiongen.utils.atomic import write_json

    if kind not in KINDS:
        raise ValueError(f"unknown output kind '{kind}'")
    write_json(Path(folder) / MARKER, {"kind": kind, "lesiongen": __version__, "complete": complete})


def mark_complete(folder: str | os.PathLike, complete: bool = True) -> None:
    """Record that the work in `folder` is (or is again not) finished; a folder without a marker is left alone.
    A finished result makes the one an --overwrite replaced (`replaced_path`) obsolete: it goes."""
    marker = read_marker(folder)
    if marker is not None and marker.get("kind") in KINDS and marker.get("complete") is not complete:
        write_marker(folder, marker["kind"], complete=complete)
    if complete:
        shutil.rmtree(replaced_path(folder), ignore_errors=True)


def is_unfinished(folder: str | os.PathLike) -> bool:
    """True when a command marked `folder` as work in progress (e.g. a training run killed or still running)."""
    marker = read_marker(folder)
    return marker is not None and marker.get("complete") is False


def folder_kind(folder: str | os.PathLike) -> str | None:
    """The kind of lesiongen output in `folder`: its marker, else the first kind whose signature matches."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is not None and marker.get("kind") in KINDS:
        return marker["kind"]
    for name, kind in KINDS.items():
        if any(all(any(folder.glob(pattern)) for pattern in signature) for signature in kind.signatures):
            return name
    return None


# -- checks ----------------------------------------------------------------------------------------

def _a(title: str) -> str:
    return f"{'an' if title[0] in 'aeiou' else 'a'} {title}"


def _holds(folder: Path, limit: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def check_out_dir(path: str | os.PathLike, kind: str, *, flag: str = "--out") -> str:
    """'missing', 'empty' or 'own' (a non-empty folder of this kind); anything else is refused, --overwrite
    or not: a file, or a folder that lesiongen did not make for this kind of output."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file; expected a folder")
    if not path.exists():
        return "missing"
    if not any(path.iterdir()):
        return "empty"
    found = folder_kind(path)
    if found == kind:
        return "own"
    other = f"; it is {_a(KINDS[found].title)} output" if found else ""
    raise OutputExistsError(f"{path} is not {_a(KINDS[kind].title)} output folder made by lesiongen (it holds "
                            f"{_holds(path)}{other}); --overwrite only replaces such a folder, so choose another "
                            f"{flag} or remove it yourself")


def resumed_config(path: str | os.PathLike, kind: str, file_name: str = "config.yaml") -> Path | None:
    """The saved config a `--resume` continues from, or None when `path` holds no run yet. A folder that
    another command made is refused before its config is read (its keys would read as unknown ones)."""
    saved = Path(path) / file_name
    marked = (read_marker(path) or {}).get("kind")
    # Only a marker is sure: a crashed run's checkpoint-N/ + config.yaml match several kinds' signatures.
    if marked in KINDS and marked != kind:
        check_out_dir(path, kind)  # raises, naming what the folder is
    if not saved.is_file():
        if os.environ.get("RANK", "0") == "0":  # said once under `accelerate launch`
            # not an error (a chain of short jobs starts this way), but a mistyped --out should not go unseen
            print(f"note: {path} holds no {KINDS[kind].title} run to resume; starting a new one there",
                  file=sys.stderr)
        return None
    return saved


def check_replaceable(path: str | os.PathLike, kind: str, overwrite: bool, *, what: str = "output",
                      flag: str = "--out") -> Path:
    """For outputs written as a whole (atomic_dir): missing, empty, or an own folder with --overwrite."""
    path = Path(path)
    if check_out_dir(path, kind, flag=flag) == "own" and not overwrite:
        raise OutputExistsError(f"{what} {path} already exists; pass --overwrite to replace it")
    return path


def check_out_file(path: str | os.PathLike, overwrite: bool, *, what: str = "output", flag: str = "--out") -> Path:
    """An output FILE: not a folder, and not replaced without --overwrite."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; expected a file")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{what} {path} already exists; pass --overwrite to replace it")
    return path


def warn_if_unfinished(folder: str | os.PathLike, resume_hint: str) -> None:
    """A prominent line on stderr when a command uses the output of a run that has not finished (once under
    `accelerate launch`: every process reads the same folder)."""
    if is_unfinished(folder) and os.environ.get("RANK", "0") == "0":
        print(f"WARNING: {folder} is an unfinished run (stopped before the end, or still running); using what it "
              f"holds so far. Finish it with: {resume_hint}", file=sys.stderr)


# How to finish a run whose manifest another command reads (both fill in only what is missing).
MANIFEST_RESUME_HINTS = {"generation": "the same `lesiongen generate` command again",
                         "mine-and-generate": "the same `lesiongen mine-and-generate` command again"}


def warn_if_unfinished_manifest(manifest: str | os.PathLike) -> None:
    """`warn_if_unfinished` for the folder a manifest was written into: `generate` rewrites its manifest.csv
    after every batch, so a killed run leaves a valid-looking manifest of part of the images."""
    folder = Path(manifest).parent
    kind = (read_marker(folder) or {}).get("kind")
    warn_if_unfinished(folder, MANIFEST_RESUME_HINTS.get(kind, "the command that wrote it, again"))


# -- starting and failing --------------------------------------------------------------------------

def _clear(folder: Path) -> None:
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _remove_unless_resumable(path: Path, resumable: Callable[[Path], bool], existed: bool) -> None:
    """What a failed invocation created in `path` goes, unless `resumable(path)`: the folder itself when
    it did not exist before, its contents when it was an empty folder (`existed`)."""
    if path.is_dir() and not _resumable(path, resumable):
        try:
            _clear(path) if existed else shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _resumable(path: Path, resumable: Callable[[Path], bool]) -> bool:
    try:
        return resumable(path)
    except OSError:
        return False


def _settle_replaced(path: Path, resumable: Callable[[Path], bool], failed: bool) -> None:
    """After the guarded work: a new result that stands (done, or failed but resumable) makes the replaced one
    obsolete; a failed start that was removed gives it back."""
    aside = replaced_path(path)
    if not aside.exists():
        return
    if not failed or (path.is_dir() and _resumable(path, resumable)):
        shutil.rmtree(aside, ignore_errors=True)
    elif not path.exists():
        os.replace(aside, path)


@contextlib.contextmanager
def removed_on_failure(path: str | os.PathLike, resumable: Callable[[Path], bool], *, existed: bool,
                       active: bool = True) -> Iterator[None]:
    """On an exception, remove what this invocation created in `path` unless `resumable(path)`, and give back
    the result an --overwrite start moved aside; on success, that result goes."""
    path = Path(path)
    try:
        yield
    except BaseException:
        if active:
            _remove_unless_resumable(path, resumable, existed)
            _settle_replaced(path, resumable, failed=True)
        raise
    if active:
        _settle_replaced(path, resumable, failed=False)


def replaced_path(path: str | os.PathLike) -> Path:
    """Where `--overwrite` keeps the result it replaces until the new one is finished or resumable."""
    path = Path(path)
    return path.with_name(f".{path.name}.replaced")


class OutputFolder:
    """An output folder of one `kind`, checked when constructed (nothing is written until `start`).

    `existing` is True for a non-empty folder of this kind (a run to resume or a result to replace):
    the command decides which, then calls `start(replace=...)`. A replaced result waits beside the folder
    (`replaced_path`) until `finish()` or the end of `removed_on_failure`: a bad input found after the
    start (an unreadable image an hour in) must not cost the user the result they had.
    """

    def __init__(self, path: str | os.PathLike, kind: str, *, flag: str = "--out") -> None:
        self.path, self.kind, self.flag = Path(path), kind, flag
        state = check_out_dir(self.path, kind, flag=flag)
        self.existing = state == "own"
        self._existed = state == "empty"  # an empty folder the user made: emptied, not removed, on failure
        self.started = False  # this invocation started the folder's contents (removed again on failure)

    def start(self, *, replace: bool = False, complete: bool = False) -> Path:
        """Create the folder and mark it; `replace` first moves the earlier output of this kind aside."""
        if self.existing and replace:
            aside = replaced_path(self.path)
            if aside.exists() and not (read_marker(self.path) or {}).get("complete"):
                # a killed --overwrite left an unfinished folder beside the finished result it was replacing
                shutil.rmtree(self.path)
            else:
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(self.path, aside)
            self.existing = False
        self.started = not self.existing
        self.path.mkdir(parents=True, exist_ok=True)
        marker = read_marker(self.path)
        if marker is None or marker.get("kind") != self.kind or marker.get("complete") is not complete:
            write_marker(self.path, self.kind, complete=complete)
        return self.path

    def removed_on_failure(self, resumable: Callable[[Path], bool] = lambda path: False, *,
                           active: bool = True) -> contextlib.AbstractContextManager:
        return _StartedGuard(self, resumable, active)

    def finish(self) -> None:
        mark_complete(self.path)


class _StartedGuard(contextlib.AbstractContextManager):
    """`removed_on_failure` that looks at `started` when the failure happens (start may come later)."""

    def __init__(self, folder: OutputFolder, resumable: Callable[[Path], bool], active: bool) -> None:
        self.folder, self.resumable, self.active = folder, resumable, active

    def __exit__(self, exc_type, exc, tb) -> None:
        folder = self.folder
        if not (self.active and folder.started):
            return None
        if exc_type is not None:
            _remove_unless_resumable(folder.path, self.resumable, folder._existed)
        _settle_replaced(folder.path, self.resumable, failed=exc_type is not None)
        return None
