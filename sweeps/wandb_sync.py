"""Upload a sweep's offline W&B runs once the network is there: ``python sweeps/monitor.py SWEEP_DIR --sync``.

Training writes W&B offline by default (compute nodes rarely reach the internet): each attempt of a run leaves
one *segment*, ``RUN_DIR/wandb/offline-run-<YYYYMMDD_HHMMSS>-<id>/run-<id>.wandb``, all segments of a run sharing
its stable id (``brats_ugrip.training.wandb_run_id``), so a resumed or requeued run is one W&B run.

:func:`sync_sweep` runs, per run of ``sweep.db``, one ``wandb sync --include-synced SEGMENT...`` with the
segments that are new or whose ``.wandb`` file changed since they were last sent, oldest first (W&B replays the
segments of one run in order). What was sent is recorded in ``SWEEP_DIR/wandb-synced.json`` (written atomically
after each run's command succeeds: segment path relative to the sweep → run id, W&B id, size, mtime, time):
a second call sends nothing, a resumed run sends only its new segment. The newest segment of a run that is still
queued or running is left for later, as its attempt may still be writing it. A failing command records nothing
for that run (it is tried again next time) and the others go on. One sync at a time per sweep
(``SWEEP_DIR/.wandb-sync.lock``). ``--include-synced``: this file, not W&B's ``.synced`` markers, decides what
is sent.

The command is run by ``runner`` (a function of the argument list returning the exit status), so tests check it
without a network.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brats_ugrip.atomic import atomic_write_json
from brats_ugrip.errors import BratsUgripError
from brats_ugrip.sweeps import layout
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.lock import SweepLock
from brats_ugrip.sweeps.state import RunRecord, SweepState

SYNCED_FILE = layout.WANDB_SYNCED_FILE
SEGMENT_GLOB = "wandb/offline-run-*"

Runner = Callable[[list[str]], int]


class WandbSyncError(BratsUgripError):
    """The sweep cannot be synced (no ``wandb`` command, no sweep database)."""


@dataclass(frozen=True)
class Segment:
    """One attempt's offline W&B data: the ``offline-run-*`` folder and its ``.wandb`` file's size and mtime."""

    path: Path
    key: str
    wandb_id: str
    size: int
    mtime_ns: int


@dataclass
class SyncReport:
    """What :func:`sync_sweep` did: run id → segment keys sent, run id → error, segments left for later."""

    synced: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)
    up_to_date: int = 0
    commands: list[list[str]] = field(default_factory=list)


def wandb_command() -> str:
    """The ``wandb`` executable of this Python environment, else the one on the PATH."""
    beside = Path(sys.executable).with_name("wandb")
    if beside.is_file():
        return str(beside)
    found = shutil.which("wandb")
    if found is None:
        raise WandbSyncError("the `wandb` command is not installed here (pip install wandb)")
    return found


def run_command(command: list[str]) -> int:
    """Run ``command`` with its output on this terminal; its exit status."""
    return subprocess.run(command, check=False).returncode


def read_synced(sweep_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``SWEEP_DIR/wandb-synced.json``'s segments (segment key → record), empty when nothing was synced yet."""
    try:
        data = json.loads((Path(sweep_dir) / SYNCED_FILE).read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as error:  # written atomically: only a hand-edited file lands here
        raise WandbSyncError(f"{Path(sweep_dir) / SYNCED_FILE}: not valid JSON ({error}); fix or delete it "
                             "(deleting it sends every run again)") from error
    return dict(data.get("segments", {}))


def run_segments(sweep_dir: Path, run: RunRecord) -> list[Segment]:
    """The offline segments of a run, oldest first (their folder names start with the attempt's start time)."""
    segments = []
    for folder in sorted(Path(run.run_dir).glob(SEGMENT_GLOB)):
        logs = sorted(folder.glob("run-*.wandb"))
        if not folder.is_dir() or not logs:
            continue
        stat = logs[0].stat()
        try:
            key = str(folder.resolve().relative_to(sweep_dir.resolve()))
        except ValueError:  # a run directory outside the sweep
            key = str(folder.resolve())
        segments.append(Segment(folder, key, logs[0].stem.removeprefix("run-"), stat.st_size, stat.st_mtime_ns))
    return segments


def _is_new(segment: Segment, synced: dict[str, dict[str, Any]]) -> bool:
    record = synced.get(segment.key)
    return record is None or (record.get("size"), record.get("mtime_ns")) != (segment.size, segment.mtime_ns)


def sync_sweep(sweep_dir: str | os.PathLike[str], *, runner: Runner | None = None, executable: str | None = None,
               extra_args: Sequence[str] = (), state: SweepState | None = None) -> SyncReport:
    """Send every run's new offline W&B segments with ``wandb sync`` (see the module docstring).

    Args:
        runner: runs one command (a list of arguments), returns its exit status (default :func:`run_command`).
        executable: the ``wandb`` command (default: :func:`wandb_command`).
        extra_args: more ``wandb sync`` options, e.g. ``["--entity", "team"]``.
        state: an open ``sweep.db`` (default: opened and closed here).
    """
    sweep_dir = Path(sweep_dir)
    if state is None:
        if not sweep_db_path(sweep_dir).is_file():
            raise WandbSyncError(f"{sweep_db_path(sweep_dir)}: not found; is {sweep_dir} a sweep directory?")
        with SweepState(sweep_db_path(sweep_dir)) as opened:
            return sync_sweep(sweep_dir, runner=runner, executable=executable, extra_args=extra_args, state=opened)
    report = SyncReport()
    with SweepLock(Path(sweep_dir) / layout.WANDB_LOCK_FILE, timeout_s=5.0).hold():
        synced = read_synced(sweep_dir)
        for run in state.runs():
            segments = run_segments(sweep_dir, run)
            if segments and run.state.is_active:  # its attempt may still be writing the newest segment
                report.waiting.append(segments.pop().key)
            new = [s for s in segments if _is_new(s, synced)]
            report.up_to_date += len(segments) - len(new)
            if not new:
                continue
            command = [executable or wandb_command(), "sync", "--include-synced", *extra_args,
                       *(str(segment.path) for segment in new)]
            report.commands.append(command)
            status = (runner or run_command)(command)
            if status != 0:
                report.failed[run.run_id] = f"`wandb sync` exited with status {status}"
                continue
            now = time.time()
            for segment in new:
                synced[segment.key] = {"run_id": run.run_id, "wandb_id": segment.wandb_id, "size": segment.size,
                                       "mtime_ns": segment.mtime_ns, "synced_at": now}
            atomic_write_json(sweep_dir / SYNCED_FILE, {"version": 1, "segments": synced})
            report.synced[run.run_id] = [s.key for s in new]
    return report


def report_lines(report: SyncReport) -> list[str]:
    """The report as a person reads it."""
    sent = sum(len(keys) for keys in report.synced.values())
    lines = [f"W&B sync: {sent} offline segments of {len(report.synced)} runs sent, {report.up_to_date} already sent"]
    if report.waiting:
        lines.append(f"{len(report.waiting)} segments of runs still queued or running left for a later --sync")
    lines += [f"{run_id}: {error}" for run_id, error in report.failed.items()]
    return lines
