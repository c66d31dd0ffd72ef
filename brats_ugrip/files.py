"""Reading the project's input files, one way each: YAML documents (configs, grids, ensemble specs, MLCube
parameters) and file digests.

- :func:`read_yaml`: ``yaml.safe_load`` (no ``!!python`` tags: nothing in a file is ever executed), with ``1e-3``
  read as a number (YAML 1.1 keeps a float without a dot a string, and a grid of learning rates means numbers);
  a missing or malformed file is a :class:`~brats_ugrip.errors.ConfigError` naming the file and the cause.
- :func:`sha256_file`: the SHA-256 of a file, read in 1 MiB blocks.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import yaml

from brats_ugrip.errors import ConfigError

_SCIENTIFIC = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_BLOCK = 1 << 20


def _numbers(value: Any) -> Any:
    if isinstance(value, str) and _SCIENTIFIC.match(value):
        return float(value)
    if isinstance(value, dict):
        return {key: _numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_numbers(item) for item in value]
    return value


def read_yaml(path: str | os.PathLike[str], what: str = "file") -> Any:
    """The content of a YAML file (safe loader, scientific numbers as floats; an empty file is None).

    Raises:
        ConfigError: the file is missing, unreadable, or not valid YAML (``what`` names it: "grid", "config" ...).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("<file>", f"{what} not found", str(path)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError("<file>", f"{what} cannot be read ({error})", str(path)) from None
    try:
        return _numbers(yaml.safe_load(text))
    except yaml.YAMLError as error:
        raise ConfigError("<file>", f"not valid YAML ({' '.join(str(error).split())})", str(path)) from None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
