"""What the monitor shows: one :class:`RunView` per run, merged from ``sweep.db`` (state, attempts, job ids) and
each run's progress file (epoch, best validation Dice, host, GPU), and a :class:`SweepSnapshot` of the sweep
(counts per state, GPU-hours, the best run) that the dashboard, ``--once`` and ``--json`` render.

Progress files are re-read only when their size or modification time changed (one ``stat`` per run per poll).

While a scheduler cannot be asked (SLURM's accounting down), the monitor concludes nothing and a run keeps the
state ``sweep.db`` last held; the view then shows what the run's own files prove: a run whose latest job wrote its
success (``job_results/<job id>.json``, or ``progress.json`` saying completed since that submission) reads
``finished, awaiting accounting``, counted apart from the state it still holds, and the snapshot carries since
when each scheduler has been unavailable (``sweep.db`` meta, set at the first failed query, cleared at the first
answer), so every ``--once``, ``--json`` and dashboard frame says it once.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from brats_ugrip.sweeps import layout
from brats_ugrip.sweeps.jobs import read_job_result
from brats_ugrip.sweeps.state import AttemptRecord, RunRecord, RunState, SweepState

STALLED = "STALLED"
AWAITING_ACCOUNTING = "finished, awaiting accounting"
"""The label of an active run whose job's own files say it finished, before the scheduler's record says so."""
REQUEUED_AFTER_NOTE = "requeued by the scheduler after"
"""How the reason of a run whose job SLURM requeued after a failure (NODE_FAIL) starts."""
HELD_NOTE = "held"
"""How the reason of a run whose job is held starts (the engine writes it, the view reads it)."""
UNAVAILABLE_KEY = "states_unavailable_since"
"""``sweep.db`` meta: JSON ``{cluster: first failed query (Unix seconds)}`` while a scheduler cannot be asked."""


def states_unavailable_since(state: SweepState) -> dict[str, float]:
    """Since when each scheduler could not be asked (empty when every one answered its last query)."""
    try:
        data = json.loads(state.get_meta(UNAVAILABLE_KEY) or "{}")
    except ValueError:
        return {}
    return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}


def record_states_unavailable(state: SweepState, cluster: str, since: float | None) -> None:
    """Note that ``cluster``'s query failed at ``since`` (the first failure is kept), or answered (None: cleared).
    Written only when it changes: a poll of a healthy sweep writes nothing."""
    current = states_unavailable_since(state)
    if since is None and cluster not in current or since is not None and cluster in current:
        return
    if since is None:
        current.pop(cluster)
    else:
        current[cluster] = since
    state.set_meta(UNAVAILABLE_KEY, json.dumps(current))


class ProgressReader:
    """Reads ``RUN_DIR/progress.json`` files, re-parsing one only when it changed since the last read."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[int, int, dict[str, Any] | None]] = {}

    def read(self, run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, float | None]:
        """(progress dict or None, the file's modification time or None when there is no file yet)."""
        path = layout.progress_path(run_dir)  # written atomically by training at start, each epoch, the end
        try:
            stat = os.stat(path)
        except OSError:
            self._cache.pop(path, None)
            return None, None
        cached = self._cache.get(path)
        if cached is not None and cached[0] == stat.st_mtime_ns and cached[1] == stat.st_size:
            return cached[2], stat.st_mtime
        try:
            with open(path, "rb") as handle:
                data = json.loads(handle.read())
        except (OSError, ValueError):  # written atomically, so only a foreign or broken file lands here
            data = None
        self._cache[path] = (stat.st_mtime_ns, stat.st_size, data if isinstance(data, dict) else None)
        return self._cache[path][2], stat.st_mtime


@dataclass
class RunView:
    """One row of the dashboard (times in Unix seconds, durations in seconds)."""

    run_id: str
    params: dict[str, Any]
    state: str
    attempt: int
    max_attempts: int
    fold: Any = None
    job_id: str | None = None
    scheduler_state: str | None = None
    node: str | None = None
    gpu: str | None = None
    epoch: int | None = None
    max_epochs: int | None = None
    best_dice: float | None = None
    best_epoch: int | None = None
    started_at: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    updated_at: float | None = None
    stalled: bool = False
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    awaiting_accounting: bool = False

    @property
    def held(self) -> bool:
        return RunState(self.state).is_active and (self.reason or "").startswith(HELD_NOTE)

    @property
    def shown_state(self) -> str:
        """The state counted in the header: the run files' word for a finished run the scheduler has not
        confirmed yet, else the database's."""
        return AWAITING_ACCOUNTING if self.awaiting_accounting else self.state

    @property
    def label(self) -> str:
        """The state as a person reads it: REQUEUED runs were checkpointed on a timeout or a preemption."""
        if self.awaiting_accounting:
            return AWAITING_ACCOUNTING
        if self.held:
            return f"{self.state} (held)"
        if self.state == RunState.REQUEUED.value:  # requeued on a failure (node), else on the clock or a preemption
            return "REQUEUED" if (self.reason or "").startswith(REQUEUED_AFTER_NOTE) else "TIMEOUT→REQUEUED"
        if self.stalled:
            return f"{self.state} {STALLED}"
        return self.state

    @property
    def fraction(self) -> float | None:
        if self.epoch is None or not self.max_epochs:
            return None
        return min(1.0, self.epoch / self.max_epochs)


@dataclass
class SweepSnapshot:
    """The whole sweep at one moment."""

    sweep_dir: str
    name: str
    taken_at: float
    runs: list[RunView]
    varied_keys: list[str]
    gpu_hours: float
    job_hours: float
    notes: list[str] = field(default_factory=list)
    poll_seconds: float | None = None
    halving: list[str] = field(default_factory=list)
    """Successive halving's summary lines (``sweeps/monitoring/promotion.py``), empty for a plain grid."""
    unavailable_since: dict[str, float] = field(default_factory=dict)
    """Schedulers that could not be asked, and since when (Unix seconds)."""

    @property
    def counts(self) -> dict[str, int]:
        """Runs per state (in RunState order; finished runs awaiting accounting apart, after them), and STALLED
        for running runs without progress lately."""
        counter = Counter(r.shown_state for r in self.runs)
        counts = {s: counter[s] for s in [*(s.value for s in RunState), AWAITING_ACCOUNTING] if counter[s]}
        stalled = sum(r.stalled for r in self.runs)
        if stalled:
            counts[STALLED] = stalled
        return counts

    @property
    def best(self) -> RunView | None:
        scored = [r for r in self.runs if r.best_dice is not None]
        return max(scored, key=lambda r: r.best_dice) if scored else None

    @property
    def active(self) -> list[RunView]:
        return [r for r in self.runs if RunState(r.state).is_active]

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "sweep_dir": self.sweep_dir, "name": self.name, "taken_at": self.taken_at, "counts": self.counts,
            "gpu_hours": round(self.gpu_hours, 4), "job_hours": round(self.job_hours, 4),
            "best": {"run_id": best.run_id, "best_dice": best.best_dice, "best_epoch": best.best_epoch} if best else None,
            "varied_keys": self.varied_keys, "notes": self.notes, "halving": self.halving,
            "unavailable_since": self.unavailable_since,
            "runs": [{**asdict(r), "label": r.label} for r in self.runs],
        }


def varied_keys(runs: list[RunRecord]) -> list[str]:
    """The parameter keys of the sweep, in the order the grid gave them."""
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run.params))
    return list(keys)


def _gpus(run: RunRecord) -> int:
    parameters = run.submit.get("parameters", {})
    return int(parameters.get("gpus_per_node") or 0) * int(parameters.get("nodes") or 1)


def attempt_hours(attempts: list[AttemptRecord], runs: dict[str, RunRecord], now: float) -> tuple[float, float]:
    """(GPU-hours, job-hours) used by every attempt so far (running attempts count up to ``now``)."""
    gpu_s = job_s = 0.0
    for attempt in attempts:
        if attempt.started_at is None:
            continue
        run = runs.get(attempt.run_id)
        if attempt.ended_at is not None:
            seconds = attempt.ended_at - attempt.started_at
        elif run is not None and run.attempts == attempt.attempt and run.state.is_active:
            seconds = now - attempt.started_at
        else:
            continue
        job_s += max(0.0, seconds)
        gpu_s += max(0.0, seconds) * (_gpus(run) if run is not None else 0)
    return gpu_s / 3600, job_s / 3600


def run_view(run: RunRecord, attempt: AttemptRecord | None, progress: dict[str, Any] | None,
             progress_mtime: float | None, now: float, stall_s: float) -> RunView:
    """Merge a run's database record, its latest attempt and its progress file into one row."""
    progress = progress or {}
    config_trainer = run.config.get("trainer", {}) if isinstance(run.config, dict) else {}
    data = run.config.get("data", {}) if isinstance(run.config, dict) else {}
    started_at = (attempt.started_at if attempt else None) or run.started_at
    ended_at = (attempt.ended_at if attempt else None) or run.ended_at
    state = run.state
    elapsed = None
    if started_at is not None:
        elapsed = (ended_at if ended_at is not None and not state.is_active else now) - started_at
    epoch = progress.get("epoch")
    max_epochs = progress.get("max_epochs") or config_trainer.get("max_epochs")
    eta = None
    if state == RunState.RUNNING and isinstance(epoch, int) and max_epochs:
        per_epoch = progress.get("epoch_seconds")
        if not per_epoch and epoch and elapsed:
            per_epoch = elapsed / epoch
        if per_epoch:
            eta = max(0, max_epochs - epoch) * per_epoch
    # Stalled: running, and neither the progress file nor the attempt's start is recent.
    last_sign = max(filter(None, (progress_mtime, started_at)), default=None)
    stalled = state == RunState.RUNNING and last_sign is not None and now - last_sign > stall_s
    awaiting = state.is_active and attempt is not None and finished_by_files(run, attempt, progress,
                                                                             progress_mtime)
    best_dice = progress.get("best_val_dice")
    if best_dice is None:
        best_dice = run.metrics.get("best_val_dice")
    return RunView(
        run_id=run.run_id, params=run.params, state=state.value, attempt=run.attempts,
        max_attempts=run.max_retries + 1, fold=data.get("fold"), job_id=attempt.job_id if attempt else None,
        scheduler_state=attempt.state if attempt else None,
        node=(attempt.node if attempt else None) or progress.get("host"), gpu=progress.get("gpu"),
        epoch=epoch, max_epochs=max_epochs, best_dice=best_dice,
        best_epoch=progress.get("best_epoch") or run.metrics.get("best_epoch"), started_at=started_at,
        elapsed_s=elapsed, eta_s=eta, updated_at=progress_mtime, stalled=stalled, reason=run.reason,
        metrics=run.metrics, awaiting_accounting=awaiting,
    )


def finished_by_files(run: RunRecord, attempt: AttemptRecord, progress: dict[str, Any],
                      progress_mtime: float | None) -> bool:
    """Whether the run's files prove that its latest attempt finished training: the job's result file says
    success, or (no result file yet) ``progress.json``, written since that submission, says completed."""
    outcome = read_job_result(run.run_dir, attempt.job_id, attempt.attempt)
    if outcome is not None:
        return outcome.succeeded
    written_since = progress_mtime is not None and progress_mtime >= (attempt.submitted_at or 0.0)
    return written_since and progress.get("status") == "completed"


def build_snapshot(sweep_dir: str | os.PathLike[str], state: SweepState, progress: ProgressReader,
                   stall_minutes: float = 60.0, notes: list[str] | None = None,
                   now: float | None = None, halving: list[str] | None = None) -> SweepSnapshot:
    """Read the sweep's database and every run's progress file into a snapshot (read only); ``halving`` is the
    schedule's report lines (:func:`~brats_ugrip.sweeps.monitoring.promotion.halving_report`), which the engine
    passes in, so this module stays below promotion."""
    now = time.time() if now is None else now
    runs = state.runs()
    latest = state.latest_attempts()
    views = []
    for run in runs:
        data, mtime = progress.read(run.run_dir)
        views.append(run_view(run, latest.get(run.run_id), data, mtime, now, stall_minutes * 60))
    gpu_hours, job_hours = attempt_hours(state.attempts(), {r.run_id: r for r in runs}, now)
    return SweepSnapshot(sweep_dir=str(sweep_dir), name=state.get_meta("name") or Path(sweep_dir).name, taken_at=now,
                         runs=views, varied_keys=varied_keys(runs), gpu_hours=gpu_hours, job_hours=job_hours,
                         notes=list(notes or []), halving=list(halving or []),
                         unavailable_since=states_unavailable_since(state))

