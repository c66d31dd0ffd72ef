"""Keeping a sweep going: :class:`SweepMonitor` merges the scheduler's word into ``sweep.db``, retries failures,
resumes runs that timed out without being requeued, collects completed runs, and acts on ``--cancel``/``--retry``.

Every poll is one pass under an exclusive file lock (``SWEEP_DIR/.monitor.lock``, ``fcntl``; the kernel frees it
when its holder dies): read ``sweep.db``, ask each scheduler once about the latest attempt of every unfinished
run, write what changed, resubmit, collect. Decisions depend only on what the database, the scheduler and the
run directories say at that moment, never on what a monitor remembers, so a monitor killed at any point and
restarted (or two monitors at once) finishes the work and never submits a run twice:

- an attempt that ended is handled by whoever next holds the lock (its resubmission records a new attempt in the
  same pass, so the next holder sees that attempt, not the ended one);
- a resubmission is announced in ``SWEEP_DIR/.monitor-submitting.json`` before ``sbatch``; if the monitor dies
  after ``sbatch`` but before the attempts are recorded, the next holder finds the jobs it submitted (their
  folders under ``SWEEP_DIR/jobs/`` name the run directory) and records them instead of submitting again.

Policy per attempt (scheduler state → run):

- PENDING/RUNNING/REQUEUED… → SUBMITTED or RETRYING / RUNNING / REQUEUED (a job that was requeued is REQUEUED
  until it runs again); a held pending job (squeue's reason ``JobHeld…``) is shown held and left to the scheduler;
- COMPLETED → COMPLETED, with training's result as metrics, then the best checkpoint is collected;
- FAILED, OUT_OF_MEMORY, NODE_FAIL… → resubmitted while the run's failed attempts ≤ ``max_retries`` (RETRYING,
  the reason on the dashboard), else FAILED with the reason; the error tail of the log is kept per attempt;
- TIMEOUT (not requeued by its job: killed hard, or requeued too often) → resubmitted to resume from
  ``last.ckpt`` when that attempt wrote a newer one (not counted as a failure); without progress it is FAILED
  (one epoch does not fit the time limit, and retrying would not change that);
- PREEMPTED → REQUEUED while SLURM requeues the job; still PREEMPTED after ``PREEMPTED_GRACE_S``, it was not
  requeued and is resumed like a TIMEOUT;
- NODE_FAIL → REQUEUED for ``NODE_FAIL_GRACE_S``: SLURM requeues such a job and accounting hears of it seconds
  later (resubmitting sooner would run the run twice); after the grace without a new record, a failure as above;
- CANCELLED → CANCELLED (by the user, from outside, also a pending task scancelled before it started, which
  accounting may go on listing as pending: never retried on its own; ``--retry`` resumes it). Other runs
  are never touched by a run's failure.

A scheduler that cannot be asked (sacct failing: slurmdbd down) changes nothing: the poll notes it, and
``sweep.db`` keeps since when (the snapshot shows it once, and each finished run as awaiting accounting).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from submitit.core.utils import JobPaths

from brats_ugrip.atomic import atomic_write_json
from brats_ugrip.errors import CheckpointError
from brats_ugrip.sweeps import layout
from brats_ugrip.sweeps.job_states import (
    CANCELLED_WORD,
    COMPLETED_WORD,
    GONE_WHILE_PENDING,
    UNCOMPLETED_MARK,
    JobPhase,
    JobStateSource,
    JobStatus,
    LocalJobStates,
    SlurmJobStates,
    StatesUnavailable,
    counts_as_failure,
    hold_reason,
    interruption_word,
    last_line,
    may_be_requeued,
    was_preempted,
)
from brats_ugrip.sweeps.jobs import (
    SubmissionError,
    SubmitSpec,
    error_tail,
    final_checkpoint_complete,
    jobs_folder,
    read_job_result,
    submit_runs,
)
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.lock import MonitorError, SweepLock
from brats_ugrip.sweeps.monitoring.collect import collect_run, is_collected, write_results
from brats_ugrip.sweeps.monitoring.promotion import STOP_KEY, ended_paused, halving_report, promote
from brats_ugrip.sweeps.monitoring.snapshot import (
    HELD_NOTE,
    REQUEUED_AFTER_NOTE,
    ProgressReader,
    SweepSnapshot,
    build_snapshot,
    record_states_unavailable,
)
from brats_ugrip.sweeps.state import AttemptRecord, RunRecord, RunState, SweepState
from brats_ugrip.sweeps.throttle import runs_to_release

PREEMPTED_GRACE_S = 120.0
"""A job PREEMPTED this long ago without a new record was not requeued by SLURM: resume it ourselves."""
NODE_FAIL_GRACE_S = 60.0
"""A job NODE_FAILed this long ago without a new record was not requeued by SLURM: a failure, retried by us.
Sooner, resubmitting would race SLURM's own requeue and run the same run twice."""
SubmitFunction = Callable[..., dict[str, Any]]


@dataclass
class PollReport:
    """What one poll did."""

    changed: list[str] = field(default_factory=list)
    resubmitted: dict[str, str] = field(default_factory=dict)
    adopted: dict[str, str] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    collected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Resubmission:
    run: RunRecord
    reason: str


class SweepMonitor:
    """Follows and repairs one sweep (see the module docstring).

    Args:
        sweep_dir: the sweep directory (holds ``sweep.db``).
        stall_minutes: a running run whose progress file has not changed for this long is flagged STALLED.
        collect_last: also collect ``last.ckpt`` (to ``models/last/``).
        sources: the job-state source of each executor kind (default: sacct for ``slurm``, processes and submitit's
            files for ``local``).
        submit: how runs are submitted (default :func:`brats_ugrip.sweeps.jobs.submit_runs`).
        lock_timeout_s: how long a poll waits for another monitor's poll.
        take_over: follow a sweep owned by another host (that host's monitor must be stopped).
    """

    def __init__(self, sweep_dir: str | os.PathLike[str], *, stall_minutes: float = 60.0, collect_last: bool = False,
                 sources: Sequence[JobStateSource] | None = None, submit: SubmitFunction = submit_runs,
                 lock_timeout_s: float = 600.0, take_over: bool = False):
        self.sweep_dir = Path(sweep_dir)
        db_path = sweep_db_path(self.sweep_dir)
        if not db_path.is_file():
            raise MonitorError(f"{db_path}: not found; is {self.sweep_dir} a sweep directory (made by "
                               "`python sweeps/launch.py GRID --sweep-dir DIR`)?")
        self.state = SweepState(db_path)
        self.state.claim_owner(take_over)  # one host writes sweep.db (see brats_ugrip.sweeps.state)
        self.jobs_folder = jobs_folder(self.sweep_dir)
        self.sources = {s.cluster: s for s in (sources or (SlurmJobStates(), LocalJobStates(self.jobs_folder)))}
        self.submit = submit
        self.lock = SweepLock(layout.lock_path(self.sweep_dir), lock_timeout_s)
        self.stall_minutes = stall_minutes
        self.collect_last = collect_last
        self.progress = ProgressReader()
        self._collected: set[tuple[str, RunState]] = set()
        self._collect_failed: set[tuple[str, RunState]] = set()

    def close(self) -> None:
        self.state.close()

    # --- reading ------------------------------------------------------------------------------------------

    def snapshot(self, notes: list[str] | None = None) -> SweepSnapshot:
        report = halving_report(self.state, self.progress)
        return build_snapshot(self.sweep_dir, self.state, self.progress, self.stall_minutes, notes,
                              halving=report.lines() if report is not None else [])

    # --- one poll -----------------------------------------------------------------------------------------

    def poll(self) -> PollReport:
        """One pass: scheduler states → ``sweep.db``, retries, resumptions, collection, ``results.csv``."""
        started = time.perf_counter()
        report = PollReport()
        with self.lock.hold():
            self._finish_interrupted_submission(report)
            runs = self.state.runs()
            latest = self.state.latest_attempts()
            watched = [r for r in runs if not r.state.is_final and r.run_id in latest]
            statuses = self._statuses(watched, latest, report)
            resubmissions: list[_Resubmission] = []
            for run in watched:
                status = statuses.get(latest[run.run_id].job_id)
                if status is not None:
                    resubmission = self._apply(run, latest[run.run_id], status, report)
                    if resubmission is not None:
                        resubmissions.append(resubmission)
            resubmissions += [_Resubmission(run, why) for run, why in promote(self.state, report.notes)]
            self._resubmit(resubmissions, report)
            self._release(report)
            self._collect(report)
            results = layout.results_csv(self.sweep_dir)
            if report.changed or report.collected or not results.is_file():
                write_results(self.sweep_dir, self.state)
        report.seconds = time.perf_counter() - started
        return report

    def _statuses(self, runs: list[RunRecord], latest: dict[str, AttemptRecord],
                  report: PollReport) -> dict[str, JobStatus]:
        """One query per scheduler for the latest attempt of every run in ``runs``."""
        by_cluster: dict[str, dict[str, Path]] = {}
        submitted: dict[str, float] = {}
        for run in runs:
            cluster = run.submit.get("cluster", "local")
            attempt = latest[run.run_id]
            by_cluster.setdefault(cluster, {})[attempt.job_id] = Path(run.run_dir)
            if attempt.submitted_at is not None:
                submitted[attempt.job_id] = attempt.submitted_at
        statuses: dict[str, JobStatus] = {}
        for cluster, jobs in by_cluster.items():
            source = self.sources.get(cluster)
            if source is None:
                report.notes.append(f"no job-state source for executor {cluster!r}: {len(jobs)} runs not followed")
                continue
            try:
                statuses.update(source.statuses(jobs, submitted))
            except StatesUnavailable as error:  # keep what the database says; conclude nothing about these jobs
                report.notes.append(f"{cluster}: {error}")
                record_states_unavailable(self.state, cluster, time.time())
            else:
                record_states_unavailable(self.state, cluster, None)
        return statuses

    def _apply(self, run: RunRecord, attempt: AttemptRecord, status: JobStatus,
               report: PollReport) -> _Resubmission | None:
        """Write what ``status`` means for ``run``; return a resubmission when the run must be submitted again."""
        now = time.time()
        scheduler_state = status.state
        preempted_long_ago = (was_preempted(scheduler_state) and status.ended_at is not None
                              and now - status.ended_at > PREEMPTED_GRACE_S)
        phase = JobPhase.INTERRUPTED if preempted_long_ago else status.phase
        awaiting_requeue = (may_be_requeued(scheduler_state) and status.ended_at is not None
                            and now - status.ended_at <= NODE_FAIL_GRACE_S)
        if awaiting_requeue:
            phase = JobPhase.REQUEUED
        if phase.is_active:
            if phase == JobPhase.QUEUED:
                target = RunState.REQUEUED if status.requeues else (
                    RunState.RETRYING if attempt.attempt > 1 else RunState.SUBMITTED)
            else:
                target = RunState.REQUEUED if phase == JobPhase.REQUEUED else RunState.RUNNING
            started_at = attempt.started_at or (status.started_at or now if target == RunState.RUNNING else None)
            fields = _held_fields(run, status, phase)
            cause = status.requeued_after or (f"{scheduler_state} on {status.node or 'an unknown node'}"
                                              if awaiting_requeue else None)
            if cause and not fields:  # the dashboard names the node and the cause
                fields = {"reason": f"{REQUEUED_AFTER_NOTE} {cause}: resumes from last.ckpt"}
            self._write(run, attempt, report, target, scheduler_state, status.node, started_at=started_at, **fields)
            return None

        return self._apply_final(run, attempt, status, phase, report)

    def _apply_final(self, run: RunRecord, attempt: AttemptRecord, status: JobStatus, phase: JobPhase,
                     report: PollReport) -> _Resubmission | None:
        """An attempt that ended: the job's own result file first (plain JSON), then the scheduler's word."""
        scheduler_state = status.state
        ended_at = status.ended_at or time.time()
        outcome = read_job_result(run.run_dir, attempt.job_id, attempt.attempt)
        trusted = (phase != JobPhase.COMPLETED and outcome is not None and outcome.succeeded
                   and final_checkpoint_complete(run.run_dir, outcome))
        if phase == JobPhase.COMPLETED or trusted:
            # A job that wrote its success and a complete last.ckpt is done, whatever the scheduler recorded after
            # it (a USR2 during interpreter exit turns a finished job into FAILED 12:0).
            note = (f"completed: the job reported success; the scheduler's {scheduler_state} "
                    f"(exit {status.exit_code}) came after it") if trusted else None
            self._complete(run, attempt, status, report, outcome.result if outcome and outcome.succeeded else None,
                           COMPLETED_WORD if trusted else scheduler_state, ended_at, note)
            return None
        if phase == JobPhase.CANCELLED:
            who = _who_cancelled(status.reason)
            self._write(run, attempt, report, RunState.CANCELLED, scheduler_state, status.node, ended_at=ended_at,
                        reason=run.reason or f"cancelled {who}: not retried on its own; `monitor.py SWEEP_DIR "
                                             f"--retry {run.run_id}` resumes it from last.ckpt")
            return None
        tail = error_tail(attempt.log_path)
        job_error = outcome if outcome is not None and not outcome.succeeded else None
        if job_error is not None and not job_error.retryable:
            self._write_attempt(attempt, scheduler_state, status.node, ended_at=ended_at,
                                error_tail=job_error.traceback_tail or tail)
            self._write(run, attempt, report, RunState.FAILED, scheduler_state, status.node, ended_at=ended_at,
                        reason=f"{job_error.summary} (attempt {attempt.attempt}; not retried: a config or data "
                               "error fails the same way every time; fix it, then --retry)")
            report.failed.append(run.run_id)
            return None
        if phase == JobPhase.INTERRUPTED or (job_error is not None and UNCOMPLETED_MARK in (job_error.message or "")):
            return self._resume_or_fail(run, attempt, status, report, ended_at, tail)
        # A failure (FAILED, OUT_OF_MEMORY, NODE_FAIL…, or a final state this code does not know): retryable.
        self._write_attempt(attempt, scheduler_state, status.node, ended_at=ended_at,
                            error_tail=tail or (job_error.traceback_tail if job_error else None))
        detail = ((job_error.summary if job_error else None) or status.reason or last_line(tail or "")
                  or f"exit code {status.exit_code}")
        failures = sum(counts_as_failure(a.state) for a in self.state.attempts(run.run_id) if a.ended_at is not None)
        reason = f"{scheduler_state} (attempt {attempt.attempt}): {detail}"
        if failures <= run.max_retries:
            return _Resubmission(run, f"retry {failures}/{run.max_retries} after {reason}")
        self._write(run, attempt, report, RunState.FAILED, scheduler_state, status.node, ended_at=ended_at,
                    reason=f"{reason}; no retries left ({run.max_retries})")
        report.failed.append(run.run_id)
        return None

    def _complete(self, run: RunRecord, attempt: AttemptRecord, status: JobStatus, report: PollReport,
                  result: dict[str, Any] | None, job_state: str, ended_at: float, note: str | None) -> None:
        best, last = layout.best_checkpoint(run.run_dir), layout.last_checkpoint(run.run_dir)
        final = RunState.PAUSED if ended_paused(result, run.run_dir) else RunState.COMPLETED  # stopped at a rung
        self._write(run, attempt, report, final, job_state, status.node, ended_at=ended_at,
                    started_at=attempt.started_at or status.started_at, reason=note,
                    metrics=dict(result) if result is not None else dict(run.metrics),
                    best_checkpoint=str(best) if best.is_file() else None,
                    last_checkpoint=str(last) if last.is_file() else None)

    def _resume_or_fail(self, run: RunRecord, attempt: AttemptRecord, status: JobStatus, report: PollReport,
                        ended_at: float, tail: str | None) -> _Resubmission | None:
        """A timeout or preemption not requeued by its job: resume when the attempt wrote a newer last.ckpt."""
        since = attempt.started_at or status.started_at or attempt.submitted_at or 0.0
        last = layout.last_checkpoint(run.run_dir)
        progressed = last.is_file() and last.stat().st_mtime > since
        word = interruption_word(status.state)
        self._write_attempt(attempt, word, status.node, ended_at=ended_at, error_tail=tail)
        if progressed:
            return _Resubmission(run, f"{word} (not requeued): resuming from last.ckpt")
        self._write(run, attempt, report, RunState.FAILED, word, status.node, ended_at=ended_at,
                    reason=f"{word} without a new last.ckpt: one epoch does not fit the time limit "
                           "(raise executor.time, then --retry)")
        report.failed.append(run.run_id)
        return None

    def _write_attempt(self, attempt: AttemptRecord, job_state: str, node: str | None, **fields: Any) -> None:
        changes = {"state": job_state, **({"node": node} if node else {}), **fields}
        changes = {k: v for k, v in changes.items() if getattr(attempt, k) != v}
        if changes:
            self.state.update_attempt(attempt.run_id, attempt.attempt, **changes)

    def _write(self, run: RunRecord, attempt: AttemptRecord, report: PollReport, run_state: RunState, job_state: str,
               node: str | None, *, started_at: float | None = None, ended_at: float | None = None,
               **run_fields: Any) -> None:
        """Update the attempt and the run where they differ from what ``sweep.db`` holds (one transaction)."""
        with self.state.transaction():
            attempt_fields: dict[str, Any] = {}
            if started_at is not None:
                attempt_fields["started_at"] = started_at
            if ended_at is not None:
                attempt_fields["ended_at"] = ended_at
            self._write_attempt(attempt, job_state, node, **attempt_fields)
            wanted: dict[str, Any] = {"state": run_state, **run_fields}
            if started_at is not None and run.started_at is None:
                wanted["started_at"] = started_at
            if ended_at is not None:
                wanted["ended_at"] = ended_at
            changes = {k: v for k, v in wanted.items() if getattr(run, k) != v}
            if changes:
                self.state.update_run(run.run_id, **changes)
        if run.state != run_state:
            report.changed.append(run.run_id)

    # --- submission ---------------------------------------------------------------------------------------

    def _resubmit(self, resubmissions: list[_Resubmission], report: PollReport) -> None:
        """Submit runs again, one job array per resource request, recording each attempt and its reason."""
        groups: dict[str, list[_Resubmission]] = {}
        for item in resubmissions:
            groups.setdefault(SubmitSpec.from_dict(item.run.submit).key, []).append(item)
        for items in groups.values():
            spec = SubmitSpec.from_dict(items[0].run.submit)
            runs = [item.run for item in items]
            try:
                jobs = self._submit_announced(runs, spec, resubmission=True)
            except SubmissionError as error:
                for item in items:
                    self.state.update_run(item.run.run_id, state=RunState.FAILED, ended_at=time.time(),
                                          reason=f"{item.reason}; resubmission refused: {error}")
                    report.failed.append(item.run.run_id)
                    report.changed.append(item.run.run_id)
                continue
            with self.state.transaction():
                for item in items:
                    self.state.update_run(item.run.run_id, reason=item.reason)
            for item in items:
                report.resubmitted[item.run.run_id] = jobs[item.run.run_id].job_id
                report.changed.append(item.run.run_id)

    def _release(self, report: PollReport) -> None:
        """Submit PENDING runs as the sweep's ``max_running`` cap frees places (sweeps/throttle.py), in grid order."""
        groups: dict[str, list[RunRecord]] = {}
        for run in runs_to_release(self.state):
            groups.setdefault(SubmitSpec.from_dict(run.submit).key, []).append(run)
        for runs in groups.values():
            try:
                jobs = self._submit_announced(runs, SubmitSpec.from_dict(runs[0].submit), resubmission=False)
            except SubmissionError as error:  # the scheduler refused: they stay PENDING, the next poll tries again
                report.notes.append(f"runs waiting for max_running not submitted: {error}")
                continue
            for run in runs:
                report.resubmitted[run.run_id] = jobs[run.run_id].job_id
                report.changed.append(run.run_id)

    def _submit_announced(self, runs: list[RunRecord], spec: SubmitSpec, resubmission: bool) -> dict[str, Any]:
        """Submit with the intent written first (see :meth:`_finish_interrupted_submission`)."""
        intent = layout.intent_path(self.sweep_dir)
        atomic_write_json(intent, {"time": time.time(), "attempts": {r.run_id: r.attempts for r in runs},
                                   "resubmission": resubmission})
        try:
            return self.submit(self.state, runs, spec, self.jobs_folder, resubmission=resubmission)
        finally:
            intent.unlink(missing_ok=True)

    def _finish_interrupted_submission(self, report: PollReport) -> None:
        """A monitor died while submitting: record the jobs it submitted (found in submitit's folder by their
        run directory) so that they are not submitted again; runs without such a job are handled as usual."""
        intent_path = layout.intent_path(self.sweep_dir)
        try:
            intent = json.loads(intent_path.read_text())
        except FileNotFoundError:
            return
        except json.JSONDecodeError:
            intent_path.unlink(missing_ok=True)
            return
        unrecorded = {}
        for run_id, attempts in intent.get("attempts", {}).items():
            if self.state.has_run(run_id):
                run = self.state.get_run(run_id)
                if run.attempts == attempts:
                    unrecorded[str(Path(run.run_dir).resolve())] = run
        if unrecorded:
            for job_id, run_dir in _submitted_jobs(self.jobs_folder, since=float(intent["time"]) - 1.0):
                run = unrecorded.pop(run_dir, None)
                if run is None:
                    continue
                self.state.record_submission(
                    run.run_id, job_id, log_path=str(JobPaths(self.jobs_folder, job_id, 0).stderr),
                    submitted_at=float(intent["time"]),
                    state=RunState.RETRYING if intent.get("resubmission") else RunState.SUBMITTED)
                report.adopted[run.run_id] = job_id
                report.changed.append(run.run_id)
        intent_path.unlink(missing_ok=True)

    # --- collection ---------------------------------------------------------------------------------------

    def _collect(self, report: PollReport) -> None:
        for run in self.state.runs([RunState.COMPLETED, RunState.PAUSED]):  # paused runs are soup ingredients too
            # A paused run's best.ckpt may change when it continues: checked each poll (two stat calls).
            key = (run.run_id, run.state)
            if run.state == RunState.COMPLETED and key in self._collected or key in self._collect_failed:
                continue
            if is_collected(self.sweep_dir, run):
                self._collected.add(key)
                continue
            try:
                collect_run(self.sweep_dir, run, self.collect_last)
            except (CheckpointError, OSError) as error:
                self._collect_failed.add(key)  # tried again by the next monitor started
                self.state.update_run(run.run_id, reason=f"collection failed: {error}")
                report.notes.append(f"{run.run_id}: collection failed: {error}")
                continue
            self._collected.add(key)
            report.collected.append(run.run_id)

    # --- actions ------------------------------------------------------------------------------------------

    def _select(self, run_ids: Sequence[str]) -> list[RunRecord]:
        runs = self.state.runs()
        if list(run_ids) == ["all"]:
            return runs
        by_id = {r.run_id: r for r in runs}
        unknown = [run_id for run_id in run_ids if run_id not in by_id]
        if unknown:
            raise MonitorError(f"{self.sweep_dir}: no run {', '.join(map(repr, unknown))} in this sweep; "
                               f"its runs are e.g. {', '.join(list(by_id)[:5])}")
        return [by_id[run_id] for run_id in run_ids]

    def cancel(self, run_ids: Sequence[str]) -> list[str]:
        """Cancel runs (``["all"]``: every unfinished run): their jobs are cancelled and they become CANCELLED.
        Returns the ids of the runs cancelled (finished runs are left as they are)."""
        with self.lock.hold():
            runs = [r for r in self._select(run_ids) if not r.state.is_final]
            latest = self.state.latest_attempts()
            by_cluster: dict[str, list[str]] = {}
            for run in runs:
                if run.state.is_active and run.run_id in latest:
                    by_cluster.setdefault(run.submit.get("cluster", "local"), []).append(latest[run.run_id].job_id)
            now = time.time()
            with self.state.transaction():  # first the database: a monitor polling next must not retry them
                for run in runs:
                    self.state.update_run(run.run_id, state=RunState.CANCELLED, ended_at=now,
                                          reason="cancelled with monitor.py --cancel")
                    if run.run_id in latest and latest[run.run_id].ended_at is None:
                        self.state.update_attempt(run.run_id, latest[run.run_id].attempt, state=CANCELLED_WORD,
                                                  ended_at=now)
            for cluster, job_ids in by_cluster.items():
                source = self.sources.get(cluster)
                if source is not None:
                    source.cancel(job_ids)
            write_results(self.sweep_dir, self.state)
        return [r.run_id for r in runs]

    def retry(self, run_ids: Sequence[str]) -> dict[str, str]:
        """Submit runs again now (they resume from their ``last.ckpt``); returns the new job id of each.

        Raises:
            MonitorError: a run is queued or running (cancel it first) or completed.
        """
        with self.lock.hold():
            runs = self._select(run_ids)
            if list(run_ids) == ["all"]:
                runs = [r for r in runs if r.state in (RunState.FAILED, RunState.CANCELLED, RunState.TIMEOUT)]
            for run in runs:
                if run.state.is_active:
                    raise MonitorError(f"run {run.run_id} is {run.state.value}: cancel it first "
                                       f"(monitor.py SWEEP_DIR --cancel {run.run_id})")
                if run.state == RunState.COMPLETED:
                    raise MonitorError(f"run {run.run_id} is COMPLETED; to train it again, use a new sweep directory")
            submitted: dict[str, str] = {}
            groups: dict[str, list[RunRecord]] = {}
            for run in runs:
                groups.setdefault(SubmitSpec.from_dict(run.submit).key, []).append(run)
            for group in groups.values():
                for resubmission in (True, False):
                    part = [r for r in group if (r.attempts > 0) == resubmission]
                    if part:
                        jobs = self._submit_announced(part, SubmitSpec.from_dict(part[0].submit), resubmission)
                        submitted.update({run_id: job.job_id for run_id, job in jobs.items()})
            with self.state.transaction():
                for run_id in submitted:
                    self.state.update_run(run_id, reason="resubmitted with monitor.py --retry")
        return submitted


def _who_cancelled(reason: str | None) -> str:
    """Who or what cancelled a job, from the job-state source's reason."""
    if (reason or "").startswith("by uid"):
        return f"by the user ({reason}, scancel)"
    if reason == GONE_WHILE_PENDING:
        return "outside the monitor before it started (its job is gone from the queue and from accounting)"
    return "outside the monitor (scancel, or the job was killed)"


def _held_fields(run: RunRecord, status: JobStatus, phase: JobPhase) -> dict[str, Any]:
    """The run's reason while its job is held (``scontrol hold``): it waits for a release, not for resources, and
    stays the scheduler's (never resubmitted); the note goes once the hold is released."""
    held = hold_reason(status.reason) if phase == JobPhase.QUEUED else None
    if held is not None:
        return {"reason": f"{HELD_NOTE}: {held} ({status.reason}); it starts after `scontrol release "
                          f"{status.job_id}`"}
    if (run.reason or "").startswith(HELD_NOTE):
        return {"reason": None}
    return {}


def _submitted_jobs(jobs_folder: Path, since: float) -> Iterator[tuple[str, str]]:
    """(job id, run directory) of the jobs whose submitit folder appeared after ``since``.

    The run directory is read from the submitted pickle's opcodes (``pickletools``), never by unpickling it: the
    monitor runs no code from the sweep directory."""
    root = JobPaths.get_first_id_independent_folder(jobs_folder)
    for folder in root.iterdir() if root.is_dir() else ():
        try:
            if not folder.is_dir() or folder.name.startswith(".") or folder.stat().st_mtime < since:
                continue
        except OSError:
            continue
        pickle_path = JobPaths(jobs_folder, folder.name, 0).submitted_pickle
        run_dir = pickled_string_after(pickle_path, "run_dir")
        if run_dir is not None:
            yield folder.name, str(Path(run_dir).resolve())


def pickled_string_after(path: Path, key: str) -> str | None:
    """The first string that follows the string ``key`` in a pickle's opcode stream (a dict's value for that key),
    read with ``pickletools.genops``: a static scan that builds no object and imports nothing. None when the file
    is missing, truncated or holds no such pair."""
    import pickletools

    try:
        data = path.read_bytes()
    except OSError:
        return None
    memo: dict[int, str] = {}
    memo_count = 0  # MEMOIZE numbers every memoized object, strings or not
    previous: str | None = None
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name == "MEMOIZE" or name.endswith("PUT"):
                index = memo_count if name == "MEMOIZE" else int(arg)
                memo_count += name == "MEMOIZE"
                if previous is not None:
                    memo[index] = previous
                continue
            value = arg if isinstance(arg, str) and "UNICODE" in name else (
                memo.get(int(arg)) if name.endswith("GET") else None)
            if previous == key and value is not None:
                return value
            previous = value
    except Exception:  # a truncated or foreign file (genops raises ValueError and others): nothing to read
        return None
    return None


def follow(sweep_dir: str | os.PathLike[str], *, poll_s: float = 2.0, timeout_s: float | None = None,
           **monitor_options: Any) -> dict[str, RunState]:
    """Poll a sweep as the monitor does (retries, resumptions, collection) until every run has ended; returns the
    final state of each run. The live dashboard without a screen: for scripts and tests.

    Raises:
        TimeoutError: ``timeout_s`` passed with runs unfinished (they keep running).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    monitor = SweepMonitor(sweep_dir, **monitor_options)
    try:
        while True:
            monitor.poll()
            runs = monitor.state.runs()
            if all(run.state.is_final for run in runs):
                return {run.run_id: run.state for run in runs}
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"runs unfinished after {timeout_s:.0f} s: "
                                   f"{sorted(r.run_id for r in runs if not r.state.is_final)}")
            time.sleep(poll_s)
    finally:
        monitor.close()


def resume_paused(monitor: SweepMonitor, run_ids: Sequence[str]) -> dict[str, str]:
    """Continue PAUSED runs (``["all"]``: every one) to ``trainer.max_epochs`` from their ``last.ckpt``, whatever
    their rank; returns the new job id of each. They no longer stop at rungs (a manual decision, not a promotion).

    Raises:
        MonitorError: a chosen run is not PAUSED.
    """
    with monitor.lock.hold():
        runs = monitor._select(run_ids)
        if list(run_ids) == ["all"]:
            runs = [r for r in runs if r.state == RunState.PAUSED]
        for run in runs:
            if run.state != RunState.PAUSED:
                raise MonitorError(f"run {run.run_id} is {run.state.value}, not PAUSED: --resume-paused continues "
                                   "paused runs only (--retry resubmits failed ones)")
        with monitor.state.transaction():
            for run in runs:
                monitor.state.update_run(run.run_id, submit={**run.submit, STOP_KEY: None})
        runs = [monitor.state.get_run(run.run_id) for run in runs]
        groups: dict[str, list[RunRecord]] = {}
        for run in runs:
            groups.setdefault(SubmitSpec.from_dict(run.submit).key, []).append(run)
        submitted: dict[str, str] = {}
        for group in groups.values():
            jobs = monitor._submit_announced(group, SubmitSpec.from_dict(group[0].submit), resubmission=True)
            submitted.update({run_id: job.job_id for run_id, job in jobs.items()})
        with monitor.state.transaction():
            for run_id in submitted:
                monitor.state.update_run(run_id, reason="resumed with monitor.py --resume-paused: continues to "
                                                        "max_epochs")
    return submitted
