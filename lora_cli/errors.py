"""Exceptions that are shown to the user as one line, never as a traceback.

Library code raises these with a sentence a user can act on; `cli.py` is the only place that
prints them and picks the exit status (2 for bad usage or input, 1 for a failure while running).
"""


class LoraError(Exception):
    """A problem shown to the user as one line; `exit_code` is what the process returns."""

    exit_code = 1


class ConfigError(LoraError):
    """An option or config key is wrong: bad usage, exit status 2."""

    exit_code = 2


class DataError(LoraError):
    """The training or evaluation data cannot be read or used: bad input, exit status 2."""

    exit_code = 2


class ModelError(LoraError):
    """A model, tokenizer or adapter cannot be found or loaded."""

    exit_code = 1


class ModelInputError(ModelError):
    """A model, tokenizer or adapter the user named is damaged or does not fit: bad input, exit status 2."""

    exit_code = 2


class RunError(LoraError):
    """A run folder is missing, incomplete, or would be overwritten."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """A library exception's first line, to quote inside one of ours (its name when it has no text)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
