"""Progress of long library calls (scoring cases, loading held-out sets, soup evaluations), reported without
printing: library code opens a :func:`progress_task` (or iterates with :func:`tracked`); whoever runs it decides
what a task looks like by installing a reporter with :func:`set_reporter`.

- With no reporter (a notebook, another program, a test), tasks are silent but for one ``logging`` DEBUG line
  when each ends.
- The command lines install a rich progress bar on stderr (:func:`brats_ugrip.cli.run` does it for every tool).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, TypeVar

T = TypeVar("T")
_log = logging.getLogger(__name__)


class ProgressTask(Protocol):
    """One running task: ``advance`` after each step; ``set_total`` when the number of steps turns out to differ."""

    @property
    def completed(self) -> int: ...

    def advance(self, steps: int = 1) -> None: ...

    def set_total(self, total: int) -> None: ...


Reporter = Callable[[str, "int | None", bool], AbstractContextManager[ProgressTask]]
"""``reporter(description, total, visible)`` opens a task and closes it on exit."""


class _Counter:
    def __init__(self, total: int | None):
        self.completed, self.total = 0, total

    def advance(self, steps: int = 1) -> None:
        self.completed += steps

    def set_total(self, total: int) -> None:
        self.total = total


_reporter: Reporter | None = None


def set_reporter(reporter: Reporter | None) -> Reporter | None:
    """Install how tasks are shown in this process (None: silent); returns the previous reporter."""
    global _reporter
    previous, _reporter = _reporter, reporter
    return previous


@contextmanager
def progress_task(description: str, total: int | None = None, visible: bool = True) -> Iterator[ProgressTask]:
    """A task of ``total`` steps, shown by the installed reporter (``visible=False``: counted, never drawn)."""
    if _reporter is not None:
        with _reporter(description, total, visible) as task:
            yield task
        return
    counter = _Counter(total)
    yield counter
    _log.debug("%s: %d of %s steps", description, counter.completed, counter.total)


def tracked(items: Iterable[T], description: str, total: int | None = None, visible: bool = True) -> Iterator[T]:
    """Iterate over ``items`` as one task."""
    with progress_task(description, total, visible) as task:
        for item in items:
            yield item
            task.advance()
