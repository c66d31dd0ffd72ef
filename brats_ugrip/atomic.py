"""Atomic file writes: write to a temporary file in the same directory, fsync, then rename over the target.

A reader (or a process restarted after SIGKILL) sees either the old file or the new one, never a torn one.

A full disk (``ENOSPC``) or an exhausted quota (``EDQUOT``) while writing, syncing or renaming raises
:class:`~brats_ugrip.errors.DiskFullError` ("no space left on device while writing X"), and the temporary file
is removed: the target keeps its old content, or stays absent. Every writer of the project goes through here, so
this is the one place that turns a full disk into a one-line message.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import yaml

from brats_ugrip.errors import DiskFullError

_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _disk_full(error: BaseException | None, target: Path) -> DiskFullError | None:
    """The :class:`DiskFullError` that ``error`` (an ``OSError`` anywhere in its cause/context chain) stands for."""
    seen = 0
    while error is not None and seen < 8:  # a short chain: the writer's own wrapping, not arbitrary depth
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return DiskFullError(f"{_DISK_FULL[error.errno]} while writing {target}; free some space and run again "
                                 "(nothing was written)")
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on normal exit it is fsynced and renamed onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise _disk_full(error, target) or error
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600 files; give the result the permissions of a normally created file (team-readable).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())  # where delayed allocation reports a full disk
        os.replace(tmp, target)
    except (OSError, RuntimeError) as error:
        full = _disk_full(error, target)
        if full is None:
            raise
        raise full from error
    finally:
        tmp.unlink(missing_ok=True)


class _RecordingWriter:
    """A binary file that remembers the ``OSError`` of a failed write. ``torch.save`` turns it into a
    ``RuntimeError`` ("unexpected pos ...") without its errno; :func:`atomic_write` chains it back on."""

    def __init__(self, handle: IO[bytes]):
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def atomic_write(target: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(binary_file)`` on a temporary file and move it onto ``target`` atomically."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            recorder = _RecordingWriter(handle)
            try:
                write(recorder)  # type: ignore[arg-type]
            except RuntimeError as error:
                if recorder.error is None:
                    raise
                raise error from recorder.error
    return Path(target)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(target, lambda handle: handle.write(data))


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_yaml(target: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(target, yaml.safe_dump(obj, sort_keys=False))
