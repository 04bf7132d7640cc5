"""Root Typer application. Command modules import only typer at module level so `--help` is fast;
the library (torch, diffusers, ...) is imported inside each command."""

from __future__ import annotations

import importlib
import os

import typer
from typer.core import TyperGroup

from lesiongen.errors import LesiongenError
from lesiongen.utils.distributed import close_process_group

# Each module exposes `register(app)`; order is the order of `lesiongen --help`.
COMMAND_MODULES = ("data", "base", "classifier", "finetune", "synthesis", "quality", "loop")
# The commands that share their work among `accelerate launch` processes. Any other, launched on several,
# would run once per process into the same output (a base pretrained N times over, racing on its checkpoints).
MULTI_PROCESS_COMMANDS = ("train-classifier", "evaluate", "finetune", "generate", "mine-and-generate", "loop",
                          "demo", "version")


class _Group(TyperGroup):
    """Shows a LesiongenError as one plain `Error: <message>` line on stderr, exit status 2, no
    traceback. Plain text rather than a rich panel, so a long file path in the message is never cropped.
    So is an operating-system error about a path (an --out below a file, a full disk, no permission): the
    path and the system's reason say what to fix; a traceback would not.

    Under `accelerate launch` an error that every process raised together (`utils.distributed.together`)
    is printed by the main process only, so it is read once; one that a single process met is printed by it.
    """

    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
        except LesiongenError as err:
            _echo_error(str(err), err)
            _close_if_shared(err)
            raise typer.Exit(code=2) from err
        except OSError as err:
            if err.filename is None:
                raise
            _echo_error(_path_error(err), err)
            _close_if_shared(err)
            raise typer.Exit(code=2) from err
        close_process_group()  # every process finished the command
        return result

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not isinstance(command, TyperGroup) \
                and not set(rest) & set(ctx.help_option_names):
            refuse_several_processes(" ".join([*_group_names(ctx), name]))
        return name, command, rest


def _group_names(ctx) -> list[str]:
    """The command groups below the root that `ctx` is in (`base` for `lesiongen base pretrain`)."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return names[::-1]


def refuse_several_processes(command: str) -> None:
    """A LesiongenError when `accelerate launch` started several processes for a command that runs on one."""
    from lesiongen.utils.distributed import shared

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and command not in MULTI_PROCESS_COMMANDS:
        raise shared(LesiongenError(
            f"`lesiongen {command}` runs on one process, but `accelerate launch` started {processes} (WORLD_SIZE="
            f"{processes}): each would do the whole job into the same output. Run it as `lesiongen {command} ...`, "
            f"or launch with --num_processes 1. Commands that share their work among processes: "
            f"{', '.join(c for c in MULTI_PROCESS_COMMANDS if c != 'version')}"))  # every process raises it


def _echo_error(message: str, err: BaseException) -> None:
    from lesiongen.utils.distributed import is_shared, launched_main

    if launched_main() or not is_shared(err):
        typer.echo(f"Error: {message}", err=True)


def _close_if_shared(err: BaseException) -> None:
    """Every process raised `err` together, so all of them are here: close the process group. An error
    of one process leaves it alone (the others may still be inside a collective; the launcher stops them)."""
    from lesiongen.utils.distributed import is_shared

    if is_shared(err):
        close_process_group()


def _path_error(err: OSError) -> str:
    from pathlib import Path

    if isinstance(err, (FileExistsError, NotADirectoryError)):
        path = Path(err.filename)
        blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            deeper = f" (for {path})" if path != blocking else ""
            return f"{blocking} is a file, but a folder is needed there{deeper}"
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    return f"{paths}: {err.strerror or err}"


def build_app() -> typer.Typer:
    app = typer.Typer(
        cls=_Group,
        name="lesiongen",
        help="Mine a skin-lesion classifier's mistakes and answer them with Stable Diffusion.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    @app.callback()
    def root() -> None:
        """Mine a skin-lesion classifier's mistakes and answer them with Stable Diffusion.

        Start with `lesiongen demo`; see README.md for the full workflow.
        """

    for name in COMMAND_MODULES:
        importlib.import_module(f"lesiongen.cli.{name}").register(app)

    @app.command()
    def version() -> None:
        """Print the lesiongen version."""
        from lesiongen import __version__

        typer.echo(__version__)

    return app


app = build_app()


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # diffusers / transformers warn on every pipeline load about things this project does on purpose
    # (no safety checker, LoRA only on the UNet); keep the terminal for our own progress lines.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    app()
