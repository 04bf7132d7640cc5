"""User-facing errors: the CLI prints their message and exits with status 2, no traceback."""


class LesiongenError(Exception):
    """An error caused by the user's input (a file, a row, a flag); the message names it."""


class InputError(LesiongenError):
    """Bad input data: a manifest, image, weights file or config that is not what was expected."""


class OutputExistsError(LesiongenError):
    """An output already exists and `--overwrite` was not given."""


class TrainingDivergedError(LesiongenError):
    """The loss (or the weights) became NaN or infinite; the message names the step and the last good checkpoint."""


class ProcessFailedError(LesiongenError):
    """Under `accelerate launch`: another process stopped with an unexpected error; its traceback says why."""
