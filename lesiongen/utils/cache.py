"""Where derived assets go (converted weights, tokenizer files, decoded images, feature statistics)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$LESIONGEN_CACHE`, else `$XDG_CACHE_HOME/lesiongen`, else `~/.cache/lesiongen`.

    Everything under it can be rebuilt from installed packages and the user's data, so deleting it is safe.
    """
    env = os.environ.get("LESIONGEN_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lesiongen"
