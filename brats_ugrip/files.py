"""The one YAML reader and the one file hash of the project.

:func:`read_yaml` reads with ``yaml.safe_load`` only, so ``!!python/...`` tags are never constructed: a file
holding one, a syntax error, a missing or unreadable file all raise :class:`~brats_ugrip.errors.ConfigError`
naming the file (``<file>`` key path), which command-line tools print as one line with exit code 2.

:func:`sha256_file` streams a file through SHA-256 in 1 MiB blocks (checkpoints can be gigabytes).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import yaml

from brats_ugrip.errors import ConfigError

_CHUNK = 1 << 20
_SCIENTIFIC = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def _scientific_numbers(value: Any) -> Any:
    if isinstance(value, str) and _SCIENTIFIC.match(value):
        return float(value)
    if isinstance(value, dict):
        return {key: _scientific_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_scientific_numbers(item) for item in value]
    return value


def read_yaml(path: str | os.PathLike[str], scientific_numbers: bool = False, what: str = "file") -> Any:
    """The content of a YAML file (``yaml.safe_load``; an empty file is None).

    Args:
        scientific_numbers: read ``1e-3`` (no dot) as a number; YAML 1.1 keeps it a string, but in a grid of
            learning rates it means a number (grids and their base configs are read this way).
        what: what the file is, for the not-found message ("config file", "grid file" ...).

    Raises:
        ConfigError: the file is missing or unreadable, is not valid YAML, or holds a tag ``safe_load`` refuses
            (``!!python/object/apply:...``): key path ``<file>``, source the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("<file>", f"{what} not found", str(path))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError("<file>", f"cannot read it ({error.__class__.__name__}: {error})", str(path)) from error
    try:
        values = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as error:
        raise ConfigError("<file>", f"refused: it holds a YAML tag that plain data does not use ({error.problem}); "
                          "only plain YAML is read, never !!python/... tags", str(path)) from error
    except yaml.YAMLError as error:
        raise ConfigError("<file>", f"not valid YAML ({error})", str(path)) from error
    return _scientific_numbers(values) if scientific_numbers else values


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
