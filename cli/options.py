"""Checks shared by the commands' flags."""

from __future__ import annotations

from typing import Any

import typer


def refuse_unused(flags: tuple[tuple[str, Any], ...], why: str) -> None:
    """A flag that changes nothing would still be recorded in the run's config: refuse the given ones
    (value not None), saying `why` they do nothing."""
    given = [flag for flag, value in flags if value is not None]
    if given:
        raise typer.BadParameter(f"{', '.join(given)}: {why}", param_hint=given[0])
