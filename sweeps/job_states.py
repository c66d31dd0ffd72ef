"""Where the monitor learns what the scheduler did with each job: one :class:`JobStateSource` per executor.

- :class:`SlurmJobStates`: one batched ``sacct`` call per poll for all jobs (``slurm/sacct.py``); ``scancel``.
- :class:`LocalJobStates`: submitit's local executor has no accounting: a job's id is the pid of its controller
  process; the job is finished when its result file exists (``run_dir/job_results/<job id>.json``, plain JSON
  written by the job: submitit's result pickle is never read), running while
  the controller lives (and waiting for a local slot until the run's ``job.json`` names this job), and was killed
  when the controller is gone without a result.

Both speak sacct's vocabulary (PENDING, RUNNING, REQUEUED, COMPLETED, FAILED, TIMEOUT, CANCELLED,
OUT_OF_MEMORY, NODE_FAIL…), so the monitor merges them the same way.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Protocol

from brats_ugrip.slurm.sacct import SacctError, SacctRecord, query_sacct, records_since
from brats_ugrip.slurm.squeue import ControllerJob, query_controller
from brats_ugrip.sweeps.jobs import read_job_info, read_job_result


class JobPhase(Enum):
    """What a scheduler state means for the run it carries: the one mapping from the scheduler's words to what the
    monitor does (:data:`SCHEDULER_STATES`)."""

    QUEUED = "queued"            # waiting for resources
    RUNNING = "running"          # started (or starting, or held in place) and will go on by itself
    REQUEUED = "requeued"        # the scheduler will start it again (after a preemption or a timeout signal)
    COMPLETED = "completed"      # the job's process ended cleanly
    CANCELLED = "cancelled"      # cancelled by a person or a policy
    INTERRUPTED = "interrupted"  # ended by the clock or by another job: resume from last.ckpt, not a failure
    FAILED = "failed"            # ended in error (or in a state this mapping does not know)

    @property
    def is_active(self) -> bool:
        return self in (JobPhase.QUEUED, JobPhase.RUNNING, JobPhase.REQUEUED)


SCHEDULER_STATES: dict[str, JobPhase] = {
    # Every state `sacct --helpstate` lists (SLURM 22.05–24.x), plus squeue's transient ones; the local executor
    # speaks the same words (tests/slurm/test_dev_cluster.py checks this table against the real sacct).
    "PENDING": JobPhase.QUEUED,
    "RUNNING": JobPhase.RUNNING,
    "CONFIGURING": JobPhase.RUNNING,
    "COMPLETING": JobPhase.RUNNING,
    "RESIZING": JobPhase.RUNNING,
    "SIGNALING": JobPhase.RUNNING,
    "STAGE_OUT": JobPhase.RUNNING,
    "SUSPENDED": JobPhase.RUNNING,   # paused in place by the scheduler; it resumes by itself
    "STOPPED": JobPhase.RUNNING,     # SIGSTOPped; it continues on SIGCONT
    "REQUEUED": JobPhase.REQUEUED,
    "REQUEUE_HOLD": JobPhase.REQUEUED,
    "REQUEUE_FED": JobPhase.REQUEUED,
    "RESV_DEL_HOLD": JobPhase.QUEUED,  # held because its reservation was deleted; released by an admin
    "PREEMPTED": JobPhase.REQUEUED,  # SLURM requeues it (PreemptMode=REQUEUE); see PREEMPTED_GRACE_S in monitoring/engine.py
    "COMPLETED": JobPhase.COMPLETED,
    "CANCELLED": JobPhase.CANCELLED,
    "TIMEOUT": JobPhase.INTERRUPTED,
    "DEADLINE": JobPhase.INTERRUPTED,
    "FAILED": JobPhase.FAILED,
    "BOOT_FAIL": JobPhase.FAILED,
    "NODE_FAIL": JobPhase.FAILED,
    "OUT_OF_MEMORY": JobPhase.FAILED,
    "REVOKED": JobPhase.FAILED,     # federation: run by a sibling cluster, unknown here
    "SPECIAL_EXIT": JobPhase.FAILED,
}


HOLD_REASONS: dict[str, str] = {
    # sacct's (and squeue's) Reason of a pending job that waits for a release, not for resources.
    "JobHeldUser": "held by its user (scontrol hold)",
    "JobHeldAdmin": "held by an administrator",
}


def hold_reason(reason: str | None) -> str | None:
    """What a pending job's Reason says when the job is held (it starts only after ``scontrol release``), else
    None: a held job is still queued, so the monitor follows it and never resubmits it."""
    return HOLD_REASONS.get((reason or "").strip())


def job_phase(state: str) -> JobPhase:
    """The phase of a scheduler state word ("CANCELLED by 0" → CANCELLED); unknown words are failures, so a new
    state never leaves a run watched forever."""
    word = state.split(" ")[0].rstrip("+")
    return SCHEDULER_STATES.get(word, JobPhase.FAILED)


COMPLETED_WORD = "COMPLETED"
"""Recorded on an attempt whose job reported success, whatever the scheduler wrote after it."""
CANCELLED_WORD = "CANCELLED"
"""Recorded on an attempt cancelled by the monitor itself."""
NOT_FAILURES = frozenset({"COMPLETED", "CANCELLED", "TIMEOUT", "PREEMPTED"})
"""Final attempt states that do not count against ``max_retries`` (every other final state is a failure)."""
StatesUnavailable = SacctError
"""Raised by a source that could not ask its scheduler (today only SLURM's accounting can fail this way)."""


def counts_as_failure(state: str) -> bool:
    """Whether an attempt that ended in ``state`` counts against the run's ``max_retries``."""
    return state.split(" ")[0].rstrip("+") not in NOT_FAILURES


def was_preempted(state: str) -> bool:
    """A job ended by another job (SLURM requeues it unless its requeue was lost)."""
    return state.split(" ")[0].rstrip("+") == "PREEMPTED"


def may_be_requeued(state: str) -> bool:
    """A job ended by its node (NODE_FAIL): SLURM requeues such a batch job (``JobRequeue=1``, its default), and
    accounting may hear of the requeue seconds after the failure, so the failure is not final at once."""
    return state.split(" ")[0].rstrip("+") == "NODE_FAIL"


OOM_SIGNAL = 125
"""The signal number sacct prints (``0:125``) for a step the cgroup's OOM killer ended: SLURM's dummy SIG_OOM
(253) less the signal flag 128. No real signal has it."""


def _signal_of(derived_exit_code: str | None) -> int | None:
    code, _, number = (derived_exit_code or "").partition(":")
    return int(number) if number.isdigit() and int(number) != 0 else None


def killed_by_signal(derived_exit_code: str | None) -> str | None:
    """The cause sacct's ``DerivedExitCode`` (``code:signal`` of the job's steps) names when a step died of a
    signal: ``0:9`` → killed by SIGKILL (the kernel's OOM killer, or ``kill -9``); ``0:125`` → out of memory in
    its cgroup (:data:`OOM_SIGNAL`); None for a clean exit."""
    number = _signal_of(derived_exit_code)
    if number is None:
        return None
    if number == OOM_SIGNAL:
        return "it ran out of memory: the cgroup's OOM killer ended a step (sacct's 0:125); ask for more mem_gb"
    name = signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"
    why = " (out of memory: the kernel's OOM killer, or kill -9)" if number == signal.SIGKILL else ""
    return f"its process was killed by {name}{why}"


def job_state_word(state: str, derived_exit_code: str | None) -> str:
    """The state to act on: sacct's, except a FAILED job whose step the cgroup's OOM killer ended, which is
    OUT_OF_MEMORY. With submitit the OOM hits the ``srun`` step (``123.0 OUT_OF_MEMORY``), and the batch script
    then fails, so the job's own record (``-X``) reads ``FAILED 1:0`` with DerivedExitCode ``0:125``."""
    if state == "FAILED" and _signal_of(derived_exit_code) == OOM_SIGNAL:
        return "OUT_OF_MEMORY"
    return state


def interruption_word(state: str) -> str:
    """The word recorded for an attempt interrupted without a requeue: PREEMPTED, or TIMEOUT for the clock."""
    return "PREEMPTED" if was_preempted(state) else "TIMEOUT"


UNCOMPLETED_MARK = "timed-out too many times"
"""submitit's message when a job hit its time limit more often than ``max_num_timeout``."""


@dataclass(frozen=True)
class JobStatus:
    """What the scheduler says about one job (all its starts, for a requeued job).

    Args:
        state: the latest state, in sacct's words.
        node: where it runs or ran.
        started_at: its first start (Unix seconds); ended_at: its end, once final.
        requeues: how many times it was requeued (timeouts, preemptions) so far.
        reason: the scheduler's explanation (e.g. sacct's Reason, a local job's exit), if any.
        requeued_after: what ended the start before the latest one when that was a failure the scheduler
            requeued the job after (``NODE_FAIL on node3``), else None.
    """

    job_id: str
    state: str
    node: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: str | None = None
    requeues: int = 0
    reason: str | None = None
    requeued_after: str | None = None

    @property
    def phase(self) -> JobPhase:
        return job_phase(self.state)

    @property
    def is_active(self) -> bool:
        return self.phase.is_active


class JobStateSource(Protocol):
    """The scheduler of one executor kind (``cluster``): job states in one batched query, and cancellation."""

    cluster: str

    def statuses(self, jobs: Mapping[str, Path], submitted: Mapping[str, float] | None = None) -> dict[str, JobStatus]:
        """Status of each job id in ``jobs`` (job id → its run directory); jobs the scheduler does not know (yet)
        are absent. ``submitted`` (job id → when we submitted it) lets a source ignore what it knows of an older
        job that had the same id.

        Raises:
            SacctError: the scheduler could not be asked (then nothing must be concluded about the jobs).
        """
        ...

    def cancel(self, job_ids: list[str]) -> None:
        ...


GONE_WHILE_PENDING = "gone while pending: neither the controller nor accounting holds the job (a scancel of a " \
    "task that never started)"
"""The reason of a job concluded CANCELLED because it vanished before it ever started (see SlurmJobStates)."""


def _ever_started(run_dir: Path, job_id: str) -> bool:
    """Whether a start of ``job_id`` is recorded in the run's ``job.json`` (a job writes it before training)."""
    starts = (read_job_info(run_dir) or {}).get("starts", [])
    return any(start.get("job_id") == job_id for start in starts)


class SlurmJobStates:
    """SLURM jobs through ``sacct`` (one call per poll for all of them) and ``scancel``. When sacct reports jobs
    pending, or does not report some at all, one ``squeue`` asks the controller about them (``slurm/squeue.py``):
    a pending job gets the controller's reason (a hold shows only there), and a job that neither accounting nor
    the controller holds any more, and that never started (no start of it in its run's ``job.json``), was
    cancelled while pending (:data:`GONE_WHILE_PENDING`). A job the controller does not answer about, or that
    started, is left as sacct has it: nothing is concluded from a missing answer.

    Args:
        timeout_s: how long sacct (and squeue) may take.
        query: the sacct query (job ids, timeout → records by job id); the benchmark feeds it a recorded answer.
        controller: the squeue query (job ids, timeout → the jobs the controller holds, by id).
    """

    cluster = "slurm"

    def __init__(self, timeout_s: float = 60,
                 query: Callable[[Iterable[str], float], dict[str, list[SacctRecord]]] = query_sacct,
                 controller: Callable[[Iterable[str], float], dict[str, ControllerJob]] = query_controller):
        self.timeout_s = timeout_s
        self.query = query
        self.controller = controller

    def statuses(self, jobs: Mapping[str, Path], submitted: Mapping[str, float] | None = None) -> dict[str, JobStatus]:
        statuses = {}
        for job_id, history in self.query(list(jobs), self.timeout_s).items():
            # Records of an older job under the same id (controller state lost, ids wrapped) are not ours.
            history = records_since(history, (submitted or {}).get(job_id))
            if not history:
                continue
            # A record before the latest is a start that ended with a requeue: a timeout or preemption
            # (REQUEUED, PREEMPTED) or a failure SLURM requeues after (NODE_FAIL with JobRequeue=1); an earlier
            # COMPLETED is an older job under the same id (without our submit time to tell them apart).
            latest, earlier = history[-1], history[:-1]
            starts = [r.start for r in history if r.start is not None]
            statuses[job_id] = JobStatus(
                job_id=job_id, state=job_state_word(latest.state, latest.derived_exit_code),
                node=latest.node or next((r.node for r in reversed(history) if r.node), None),
                started_at=starts[0] if starts else None,
                ended_at=latest.end, exit_code=latest.exit_code,
                requeues=sum(job_phase(r.state) in (JobPhase.REQUEUED, JobPhase.FAILED) for r in earlier)
                + (latest.state == "REQUEUED"),
                reason=f"by uid {latest.cancelled_by}" if latest.cancelled_by else (
                    killed_by_signal(latest.derived_exit_code) or latest.reason),
                requeued_after=next((f"{r.state} on {r.node or 'an unknown node'}" for r in reversed(earlier)
                                     if job_phase(r.state) == JobPhase.FAILED), None),
            )
        return self._with_controller(statuses, jobs)

    def _with_controller(self, statuses: dict[str, JobStatus], jobs: Mapping[str, Path]) -> dict[str, JobStatus]:
        """The controller's word on jobs sacct reports pending or not at all (see the class docstring)."""
        asked = [job_id for job_id in jobs if job_id not in statuses or statuses[job_id].state == "PENDING"]
        if not asked:
            return statuses
        try:
            held = self.controller(asked, self.timeout_s)
        except SacctError:  # the controller did not answer: sacct's word stands, nothing more is concluded
            return statuses
        merged = dict(statuses)
        for job_id in asked:
            if job_id in held:
                if job_id in statuses:
                    merged[job_id] = replace(statuses[job_id], reason=held[job_id].reason)
            elif not _ever_started(jobs[job_id], job_id):
                merged[job_id] = JobStatus(job_id=job_id, state="CANCELLED", reason=GONE_WHILE_PENDING)
        return merged

    def cancel(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        try:
            answer = subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise SacctError(f"scancel could not be run ({error})") from error
        if answer.returncode != 0:
            raise SacctError(f"scancel {' '.join(job_ids)} failed: {answer.stderr.strip()[-500:]}")


class LocalJobStates:
    """Jobs of submitit's local executor, from their processes and submitit's files (no accounting exists).

    Args:
        jobs_folder: submitit's folder (``SWEEP_DIR/jobs/%j``); kept for callers, the states need only the run
            directories.
    """

    cluster = "local"

    def __init__(self, jobs_folder: str | os.PathLike[str] | None = None):
        self.jobs_folder = None if jobs_folder is None else str(jobs_folder)
        self.node = socket.gethostname()

    def statuses(self, jobs: Mapping[str, Path], submitted: Mapping[str, float] | None = None) -> dict[str, JobStatus]:
        return {job_id: self._status(job_id, Path(run_dir)) for job_id, run_dir in jobs.items()}

    def _status(self, job_id: str, run_dir: Path) -> JobStatus:
        info = read_job_info(run_dir) or {}
        started = str(info.get("job_id")) == job_id
        started_at = info.get("started_at") if started else None
        finished = self._finished(job_id, run_dir, started_at)
        if finished is not None:
            return finished
        if _controller_alive(job_id):
            return JobStatus(job_id, "RUNNING" if started else "PENDING", self.node, started_at)
        # The result may have appeared between the two checks: look again before calling the job killed.
        finished = self._finished(job_id, run_dir, started_at)
        return finished or JobStatus(job_id, "FAILED", self.node, started_at, exit_code="killed",
                                     reason="the job's process ended without a result (killed?)")

    def _finished(self, job_id: str, run_dir: Path, started_at: float | None) -> JobStatus | None:
        outcome = read_job_result(run_dir, job_id)
        if outcome is None:
            return None
        if outcome.succeeded:
            return JobStatus(job_id, "COMPLETED", self.node, started_at, outcome.finished_at, "0:0")
        state = "TIMEOUT" if UNCOMPLETED_MARK in (outcome.message or "") else "FAILED"
        return JobStatus(job_id, state, self.node, started_at, outcome.finished_at, "1:0", reason=outcome.summary)

    def cancel(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            if _controller_alive(job_id):
                # As submitit's LocalJob.cancel: the controller stops its tasks (SIGINT, then SIGKILL).
                os.kill(int(job_id), signal.SIGINT)


def _controller_alive(job_id: str) -> bool:
    """Whether submitit's local controller ``job_id`` (a pid) still runs: not a zombie (finished children of the
    launcher stay zombies until it exits), and a submitit process (a recycled pid belongs to something else)."""
    if not job_id.isdigit():
        return False
    proc = Path("/proc") / job_id
    if Path("/proc/self").is_dir():
        try:
            stat = (proc / "stat").read_text()
            command = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
        state = stat.rsplit(")", 1)[-1].split()[0]
    else:  # no /proc (macOS): ask ps
        answer = subprocess.run(["ps", "-o", "stat=", "-o", "command=", "-p", job_id], capture_output=True, text=True,
                                check=False)
        if answer.returncode != 0 or not answer.stdout.strip():
            return False
        state, _, command = answer.stdout.strip().partition(" ")
    return not state.startswith(("Z", "X")) and "submitit" in command


def last_line(text: str) -> str | None:
    """The last non-empty line of a log or traceback (e.g. ``RuntimeError: CUDA out of memory``), shortened."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else None
