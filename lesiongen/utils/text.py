"""Text files read as UTF-8: one error for a file that is not, naming where it stops being UTF-8."""

from __future__ import annotations

import os
from pathlib import Path

from lesiongen.errors import InputError


def not_utf8(path: str | os.PathLike, err: UnicodeDecodeError) -> InputError:
    """The error for `path`, at its first bad byte in the whole file (a reader that decodes in chunks, as
    pandas does, reports an offset within its chunk)."""
    path = Path(path)
    where = err.reason
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except UnicodeDecodeError as whole:
        line = data.count(b"\n", 0, whole.start) + 1
        where = f"byte {whole.start}, line {line}: {whole.reason}"
    except OSError:
        pass
    return InputError(f"{path}: not UTF-8 text ({where}); re-save it as UTF-8")
