"""Conventions shared by every command-line tool: clear errors, non-zero exit codes, progress bars.

Only command lines print. :func:`run` also installs :func:`rich_reporter` as the process's progress reporter, so
the library's tasks (:mod:`brats_ugrip.progress`) are drawn as progress bars on stderr.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from brats_ugrip import progress
from brats_ugrip.atomic import atomic_write_text
from brats_ugrip.errors import BratsUgripError

T = TypeVar("T")
R = TypeVar("R")
console = Console(stderr=True)


def error_message(error: BratsUgripError) -> str:
    """The message of ``error``. One raised in a DataLoader worker comes back in the main process as the same type
    with the worker's traceback as its message ("Caught DataError in DataLoader worker process 0. Original
    Traceback ... brats_ugrip.errors.DataError: <message>"): its message is what follows the last type name."""
    text, marker = str(error), f"{type(error).__name__}: "
    if text.startswith(f"Caught {type(error).__name__} ") and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)`` and exit: 0 on success, 2 on a :class:`BratsUgripError` (message printed, no traceback).
    The library's progress tasks are drawn as rich progress bars meanwhile."""
    progress.set_reporter(rich_reporter)
    try:
        code = main(argv)
    except BratsUgripError as error:
        console.print(f"[bold red]error:[/] {error_message(error)}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    sys.exit(code or 0)


def print_and_write(text: str, out: str | os.PathLike[str] | None = None) -> None:
    """A command's report: printed on stdout and, when ``out`` (its ``--out``) is given, written there atomically.
    One text for both, so the file holds exactly what the console showed."""
    print(text)
    if out:
        atomic_write_text(out, text)


def progress_bar(transient: bool = False) -> Progress:
    """A rich progress bar with count, elapsed and remaining time (drawn on stderr)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def map_with_progress(function: Callable[[T], R], items: Sequence[T], description: str, workers: int = 1,
                      chunksize: int = 1) -> list[R]:
    """``[function(item) for item in items]`` with a progress bar, in ``workers`` processes when more than one
    (``function`` must then be picklable). Results keep the order of ``items``."""
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(items))
        results: list[R] = []
        if workers <= 1:
            mapped: Iterable[R] = map(function, items)
            for result in mapped:
                results.append(result)
                bar.advance(task)
            return results
        with ProcessPoolExecutor(workers) as pool:
            for result in pool.map(function, items, chunksize=chunksize):
                results.append(result)
                bar.advance(task)
        return results


class _BarTask:
    def __init__(self, bar: Progress, task: TaskID):
        self.bar, self.task = bar, task

    @property
    def completed(self) -> int:
        return int(self.bar.tasks[self.task].completed)

    def advance(self, steps: int = 1) -> None:
        self.bar.advance(self.task, steps)

    def set_total(self, total: int) -> None:
        self.bar.update(self.task, total=total)


@contextmanager
def rich_reporter(description: str, total: int | None, visible: bool) -> Iterator[progress.ProgressTask]:
    """A :mod:`brats_ugrip.progress` reporter: each task is a progress bar on stderr (gone when it ends unless
    visible)."""
    with progress_bar(transient=not visible) as bar:
        yield _BarTask(bar, bar.add_task(description, total=total, visible=visible))


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """Iterate over ``items`` with a progress bar."""
    with progress_bar() as bar:
        yield from bar.track(items, total=total, description=description)
