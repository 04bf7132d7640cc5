"""Write-then-rename: a killed process never leaves a half file under a finished-looking name."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lesiongen.errors import OutputExistsError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error delete it.

    The temporary name keeps the real suffix (e.g. `.png`, `.safetensors`) so libraries that choose a
    format from the extension still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files; results get the usual umask-based mode
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


# The temporary names of `atomic_path` and `atomic_dir` (mkstemp / mkdtemp add 8 characters): a kill -9
# between writing and renaming leaves one.
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[^.]*)?$")


def is_temporary(path: str | os.PathLike) -> bool:
    """A file or folder `atomic_path` / `atomic_dir` was still writing (or had not yet renamed) when its
    process died."""
    return bool(_TEMPORARY.match(Path(path).name))


def remove_temporaries(folder: str | os.PathLike) -> int:
    """Delete what killed writers left under `folder` (call before anyone writes there again); the count."""
    leftovers = [p for p in Path(folder).rglob(".*") if is_temporary(p)]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return len(leftovers)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        readable_by_umask(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` onto `dst`; an existing `dst` is set aside first and deleted only afterwards."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def readable_by_umask(folder: str | os.PathLike) -> None:
    """Give every file below `folder` the read bits the umask allows: safetensors (0.8) writes its files
    0600, so weights saved by libraries into our folders would not load for another user or container."""
    bits = 0o444 & ~_umask()
    for root, _, files in os.walk(folder):
        for name in files:
            file = os.path.join(root, name)
            mode = os.stat(file).st_mode
            if mode & bits != bits:
                os.chmod(file, mode | bits)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def ensure_writable(path: str | os.PathLike, overwrite: bool, *, what: str = "output") -> Path:
    """Refuse to replace an existing result unless the user asked for it with --overwrite."""
    path = Path(path)
    if path.exists() and not overwrite:
        if path.is_dir() and not any(path.iterdir()):
            return path
        raise OutputExistsError(f"{what} {path} already exists; pass --overwrite to replace it")
    return path
