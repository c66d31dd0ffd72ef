"""One actor per sweep: :class:`SweepLock`, the exclusive ``fcntl`` lock the launcher and the monitor (and the
W&B sync, on its own file) hold while they act on ``sweep.db``; the kernel frees it when its holder dies.

The monitor's and the launcher's lock file is ``sweeps/layout.py``'s ``lock_path(sweep_dir)``.
"""
from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from brats_ugrip.errors import BratsUgripError


class MonitorError(BratsUgripError):
    """A monitor action cannot be done (unknown run, run in a state that forbids it, lock held too long)."""


class SweepLock:
    """An exclusive ``fcntl`` lock on a file: one monitor acts on a sweep at a time.

    Args:
        path: the lock file (created if missing).
        timeout_s: how long :meth:`hold` waits for another holder before failing.
    """

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = 600.0,
                 on_wait: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.on_wait = on_wait

    @contextmanager
    def hold(self) -> Iterator[None]:
        deadline = time.monotonic() + self.timeout_s
        with open(self.path, "a") as handle:
            waited = False
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited and self.on_wait is not None:
                        self.on_wait(f"{self.path}: another launcher or monitor holds the sweep's lock; waiting "
                                     f"(up to {self.timeout_s:.0f} s)")
                    waited = True
                    if time.monotonic() > deadline:
                        raise MonitorError(f"{self.path}: another monitor has held the lock for more than "
                                           f"{self.timeout_s:.0f} s; is one stuck? (its pid: `fuser {self.path}`)")
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
