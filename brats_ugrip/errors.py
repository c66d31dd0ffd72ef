"""Exceptions that carry a message meant for the person at the keyboard.

Every error raised on bad input names the file, key or case at fault and says what to do. Command-line
entry points catch :class:`BratsUgripError`, print its message and exit with status 2 (see ``cli.run``).
"""
from __future__ import annotations


class BratsUgripError(Exception):
    """Base class of the errors a user can fix."""


class ConfigError(BratsUgripError, ValueError):
    """A configuration value is unknown, of the wrong type or impossible; the message starts with its key path."""

    def __init__(self, key_path: str, message: str, source: str | None = None):
        self.key_path = key_path
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key_path}: {message}")


class DataError(BratsUgripError, ValueError):
    """A case, image or datalist is missing or malformed."""


class CheckpointError(BratsUgripError, ValueError):
    """A checkpoint cannot be read or does not fit what it is used for."""


class DiskFullError(BratsUgripError, OSError):
    """A file could not be written for want of space (or quota); nothing partial is left (``brats_ugrip.atomic``)."""


class TrainingDivergedError(BratsUgripError, RuntimeError):
    """A run's loss or weights became NaN or infinite; the message says at which epoch and step."""
