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


def echo_main(text: str, *, err: bool = False) -> None:
    """`typer.echo` on the main process only: under `accelerate launch` every process runs the command, and
    its closing lines would otherwise come once per process."""
    from lesiongen.runs import current_processes

    if current_processes().is_main_process:
        typer.echo(text, err=err)
