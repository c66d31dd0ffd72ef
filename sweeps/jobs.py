"""Running training runs as submitit jobs (local processes or SLURM job arrays), for the sweep launcher and the monitor.

- :class:`TrainingJob` is the callable every job runs: the training entry ``train(config, run_dir)`` in the run's
  directory. It is a ``submitit.helpers.Checkpointable``: when SLURM signals a timeout or a preemption
  (USR2, ``signal_delay_s`` before the end), submitit calls :meth:`TrainingJob.checkpoint` and requeues the job,
  which then resumes from ``run_dir/checkpoints/last.ckpt`` (timeouts at most ``max_num_timeout`` times,
  preemptions always).
- The job's outcome goes to ``run_dir/job_results/<job id>.json`` (:func:`write_job_result`, atomic JSON): success
  with training's result, or the error's type, message, traceback tail and whether a retry can help (config and
  data errors cannot). The monitor reads only that file (:func:`read_job_result`), never submitit's result pickle:
  nothing of a sweep directory is unpickled by the monitor or the collector.
- A USR2 that arrives after training returned (the job finishing inside its signal window) is logged in one line
  and ignored; one that interrupts a write is logged in one line instead of a traceback, and the job requeues.
- :class:`SubmitSpec` is one resource request (executor kind and its submitit parameters); runs with equal specs
  go into one job array (one ``sbatch``) through :func:`submit_runs`, which records each attempt in ``sweep.db``.
"""
from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError

from brats_ugrip.atomic import atomic_write_json, atomic_write_yaml
from brats_ugrip.errors import BratsUgripError, CheckpointError, ConfigError, DataError
from brats_ugrip.sweeps import layout
from brats_ugrip.sweeps.state import RunRecord, RunState, SweepState

CLUSTERS = ("local", "slurm")
# A run's job.json (sweeps/layout.py) is updated by each of its jobs when it starts training: the latest start's
# job id, cluster, node, pid, start time and start_epoch (the epoch it resumes from, 0 for a fresh start), and
# starts: every start, oldest first (a requeued job starts again under the same job id).
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError)
"""Errors that the same job raises again on every try (bad config, missing or malformed case): never retried."""
_log = logging.getLogger(__name__)


def jobs_folder(sweep_dir: str | os.PathLike[str]) -> Path:
    """submitit's folder of a sweep: ``SWEEP_DIR/jobs/<job id>/`` holds each job's pickles and logs."""
    return layout.jobs_dir(sweep_dir) / "%j"


class SubmissionError(BratsUgripError):
    """The scheduler refused a submission (its own message is included); nothing of that group was submitted."""


@dataclass(frozen=True)
class SubmitSpec:
    """One resource request: how a group of runs is submitted.

    Args:
        cluster: ``"local"`` (processes on this machine) or ``"slurm"``.
        parameters: for SLURM, the sbatch parameters under submitit's names (``time`` in minutes, ``mem``,
            ``partition``, ``gpus_per_node``, ``ntasks_per_node``, ``cpus_per_task``, ``array_parallelism``,
            ``signal_delay_s``, ``setup``, ``additional_parameters``…); for local, ``timeout_min``,
            ``gpus_per_node``, ``tasks_per_node`` and ``setup``.
        max_num_timeout: how many times a job that hits its time limit is requeued.
        local_slots: local executor only: how many runs train at the same time (the others wait for a slot).

    A run's ``submit`` dict may also hold ``stop_at_epoch`` (a successive-halving rung, set by the launcher and the
    monitor's promotions, ``sweeps/monitoring/promotion.py``): its job stops there, paused. It is not part of the spec (runs
    stopping at different rungs share an array).
    """

    cluster: str
    parameters: dict[str, Any] = field(default_factory=dict)
    max_num_timeout: int = 3
    local_slots: int = 1

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise BratsUgripError(f"executor.cluster: expected one of {list(CLUSTERS)}, got {self.cluster!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "parameters": dict(self.parameters), "max_num_timeout": self.max_num_timeout,
                "local_slots": self.local_slots}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubmitSpec:
        return cls(data["cluster"], dict(data.get("parameters", {})), int(data.get("max_num_timeout", 3)),
                   int(data.get("local_slots", 1)))

    @property
    def key(self) -> str:
        """Equal keys ⇔ same resources: such runs share one job array."""
        return json.dumps(self.to_dict(), sort_keys=True, default=str)

    def sbatch_script(self, folder: str | os.PathLike[str], array_size: int | None = None) -> str:
        """The sbatch file submitit writes for this spec (SLURM only), e.g. for a dry run or ``sbatch --test-only``."""
        from submitit.slurm.slurm import _make_sbatch_string  # submitit's own writer: what is shown is what runs

        if self.cluster != "slurm":
            raise BratsUgripError("sbatch_script: only a slurm executor writes sbatch files")
        command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
        return _make_sbatch_string(command=command, folder=folder, map_count=array_size, **self.parameters)


def make_executor(spec: SubmitSpec, folder: str | os.PathLike[str]) -> submitit.AutoExecutor:
    """A submitit ``AutoExecutor`` for ``spec``, writing pickles and logs under ``folder`` (may contain ``%j``)."""
    cluster = spec.cluster
    executor = submitit.AutoExecutor(folder, cluster=cluster, **{f"{cluster}_max_num_timeout": spec.max_num_timeout})
    # SLURM parameters are under sbatch's names (slurm_*); local ones under the shared names, but for setup.
    executor.update_parameters(**{f"{cluster}_{key}" if cluster == "slurm" or key == "setup" else key: value
                                  for key, value in spec.parameters.items()})
    return executor


def sbatch_test_only(spec: SubmitSpec, folder: str | os.PathLike[str], array_size: int) -> None:
    """Ask SLURM whether it would accept this request (``sbatch --test-only``: nothing is submitted).

    Raises:
        SubmissionError: with sbatch's own message (e.g. an invalid partition or account).
    """
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as handle:
        handle.write(spec.sbatch_script(folder, array_size))
    try:
        result = subprocess.run(["sbatch", "--test-only", handle.name], capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(handle.name)
    if result.returncode != 0:
        raise SubmissionError(f"SLURM refuses the request: {result.stderr.strip() or result.stdout.strip()}")


def submit_runs(state: SweepState, runs: Sequence[RunRecord], spec: SubmitSpec, folder: str | os.PathLike[str],
                *, resubmission: bool = False) -> dict[str, submitit.Job]:
    """Submit ``runs`` (all with resources ``spec``) as one job array and record each attempt in ``state``.

    On SLURM this is a single ``sbatch`` (a plain job when there is only one run); locally each run is one
    process and at most ``spec.local_slots`` of them train at a time. Attempts are recorded only after the
    scheduler accepted the whole array, in one transaction: a refused submission records nothing.

    Args:
        folder: submitit's folder for pickles and logs; ``%j`` is replaced by each job id.
        resubmission: the runs were submitted before (the monitor's retries): their state becomes RETRYING.

    Returns:
        The submitit job of each run, by run id.

    Raises:
        SubmissionError: the scheduler refused the submission (its message is included).
    """
    if not runs:
        return {}
    executor = make_executor(spec, folder)
    slots_dir = str(Path(submitit.core.utils.JobPaths.get_first_id_independent_folder(folder)) / ".local_slots")
    local_slots = (slots_dir, spec.local_slots) if spec.cluster == "local" else None
    for run in runs:  # the run directory shows its config from the moment the run is submitted
        atomic_write_yaml(layout.config_path(run.run_dir), run.config)
    jobs: dict[str, submitit.Job] = {}
    submitted_at = time.time()  # before sbatch: no record of this submission in accounting is older
    try:
        # clean_env: a launcher running inside a SLURM job must not pass that job's SLURM_* variables on.
        # redirect_stderr: submitit prints sbatch's complaint itself; it is in the error raised below.
        with submitit.helpers.clean_env(), redirect_stderr(io.StringIO()), executor.batch():
            for run in runs:
                jobs[run.run_id] = executor.submit(TrainingJob(run.run_dir, run.config, local_slots,
                                                               attempt=run.attempts + 1,
                                                               stop_at_epoch=run.submit.get("stop_at_epoch")))
    except FailedJobError as error:
        names = ", ".join(r.run_id for r in runs[:3]) + (", …" if len(runs) > 3 else "")
        raise SubmissionError(f"{spec.cluster} refused the submission of {len(runs)} runs ({names}); none of "
                              f"them was submitted:\n{str(error).strip()}") from error
    with state.transaction():
        for run_id, job in jobs.items():
            state.record_submission(run_id, job.job_id, submitted_at=submitted_at, log_path=str(job.paths.stderr),
                                    state=RunState.RETRYING if resubmission else RunState.SUBMITTED)
    return jobs


def job_environment() -> submitit.JobEnvironment | None:
    """The submitit job this process runs in, or None outside submitit."""
    try:
        return submitit.JobEnvironment()
    except RuntimeError:
        return None


@contextmanager
def local_slot(slots_dir: str | os.PathLike[str], slots: int, poll_s: float = 1.0) -> Iterator[int]:
    """Hold one of ``slots`` file locks in ``slots_dir`` (waiting for one to free up); yields its index.

    The kernel releases a lock when its holder dies, so a killed job never keeps its slot.
    """
    slots_dir = Path(slots_dir)
    slots_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(slots):
            handle = open(slots_dir / f"slot{index}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(poll_s)


class TrainingJob(submitit.helpers.Checkpointable):
    """One training run as a submitit job: ``train(config, run_dir)``, resumable after requeue.

    It links the job's logs into ``run_dir/logs/`` and records the job id and node in ``run_dir/job.json`` before
    training; training writes ``run_dir/config.yaml`` (also written at submission), ``run_dir/progress.json`` and
    ``run_dir/checkpoints/{best,last}.ckpt``, and resumes from ``last.ckpt``. The job's outcome (success or the
    error, classified) goes to ``run_dir/job_results/<job id>.json``. Under SLURM, training turns Lightning's own
    auto-requeue off (``SLURMEnvironment(auto_requeue=False)``): requeueing is submitit's. Jobs touch only their
    run directory (never ``sweep.db``, which may sit on a file system SQLite cannot lock).

    Args:
        run_dir: the run's directory (``SWEEP_DIR/runs/<run_id>``).
        config: the resolved training config, as a plain dict.
        local_slots: ``(slots_dir, n)`` for local jobs: train only while holding one of ``n`` slots.
        attempt: the attempt number ``sweep.db`` gives this submission (written into the result file).
        stop_at_epoch: stop (paused) after this many epochs, a successive-halving rung (None: ``max_epochs``).
    """

    def __init__(self, run_dir: str | os.PathLike[str], config: dict[str, Any],
                 local_slots: tuple[str, int] | None = None, attempt: int = 0, stop_at_epoch: int | None = None):
        self.run_dir = str(run_dir)
        self.config = config
        self.local_slots = local_slots
        self.attempt = attempt
        self.stop_at_epoch = stop_at_epoch

    def __call__(self) -> dict[str, Any]:
        run_dir = Path(self.run_dir)
        env = job_environment()
        if env is not None and env.num_tasks > 1:  # one task per GPU: torch.distributed's variables for Lightning
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        # Waiting for a slot comes first: a waiting job has not imported torch yet, so it holds little memory.
        with local_slot(*self.local_slots) if self.local_slots else nullcontext():
            from brats_ugrip.training import train

            writer = env is None or env.global_rank == 0
            if writer:  # job.json appears once the run really starts
                self._prepare_run_dir(run_dir, env)
            interrupted = _watch_requeue_signal()
            try:
                sweep = layout.sweep_of_run(run_dir)
                result = train(self.config, run_dir, stop_at_epoch=self.stop_at_epoch,
                               shared_cache=layout.case_cache(sweep) if sweep is not None else None)
            except Exception as error:
                if interrupted:  # submitit requeued the job from inside a write; the traceback is only noise
                    _log.warning("%s arrived during %s (%s): the job is requeued and resumes from last.ckpt, "
                                 "which atomic saving kept intact", interrupted[0], _where(error), type(error).__name__)
                    raise SystemExit(-1) from None
                if writer and env is not None:
                    write_job_result(run_dir, env.job_id, self.attempt, error=error)
                raise
            _ignore_late_signals()
            if writer and env is not None:
                write_job_result(run_dir, env.job_id, self.attempt, result=result)
            return result

    def __setstate__(self, state: dict[str, Any]) -> None:  # jobs pickled before ``attempt``/``stop_at_epoch``
        self.__dict__.update({"attempt": 0, "stop_at_epoch": None, **state})

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on timeout or preemption, before the requeue: training saves ``last.ckpt`` at each
        epoch's end, so the requeued job is this same call, which resumes from there."""
        return submitit.helpers.DelayedSubmission(TrainingJob(self.run_dir, self.config, self.local_slots,
                                                              attempt=self.attempt, stop_at_epoch=self.stop_at_epoch))

    def _prepare_run_dir(self, run_dir: Path, env: submitit.JobEnvironment | None) -> None:
        """Link this job's logs into ``run_dir/logs/`` and add this start to ``run_dir/job.json``."""
        run_dir.mkdir(parents=True, exist_ok=True)
        start: dict[str, Any] = {"job_id": env.job_id if env else None, "cluster": env.cluster if env else None,
                                 "node": socket.gethostname(), "pid": os.getpid(), "started_at": time.time(),
                                 "start_epoch": _completed_epochs(layout.last_checkpoint(run_dir))}
        if env is not None:
            logs = layout.job_logs_dir(run_dir)
            logs.mkdir(exist_ok=True)
            for source, name in ((env.paths.stdout, f"{env.job_id}.out"), (env.paths.stderr, f"{env.job_id}.err")):
                link = logs / name
                if not link.is_symlink() and not link.exists():
                    try:
                        link.symlink_to(source)
                    except OSError:  # a file system without symlinks: the logs stay in submitit's folder only
                        pass
        starts = (read_job_info(run_dir) or {}).get("starts", [])
        atomic_write_json(layout.job_info_path(run_dir), {**start, "starts": [*starts, start]})


def _completed_epochs(last: Path) -> int | None:
    """Epochs held by ``last.ckpt``, which training resumes from (0 without one, None if it is unreadable).
    Not progress.json's count: that is written just before the checkpoint, so it can be one ahead."""
    from brats_ugrip.checkpoints import checkpoint_meta, load_checkpoint

    if not last.is_file():
        return 0
    try:
        return int(checkpoint_meta(load_checkpoint(last, mmap=True), last)["epoch"])
    except (CheckpointError, KeyError):
        return None


def _watch_requeue_signal() -> list[str]:
    """Wrap submitit's USR2 handler (main thread only) so that the job learns whether it requeued the job: the
    returned list gets the signal's name once the handler has asked for the requeue (then the job exits)."""
    fired: list[str] = []
    previous = signal.getsignal(signal.SIGUSR2)
    if not callable(previous):
        return fired

    def handler(signum: int, frame: Any) -> None:
        try:
            previous(signum, frame)
        except SystemExit:  # submitit requeued the job and exits: remember it, whatever the exit unwinds through
            fired.append(signal.Signals(signum).name)
            raise

    try:
        signal.signal(signal.SIGUSR2, handler)
    except ValueError:  # not the main thread
        pass
    return fired


def _ignore_late_signals() -> None:
    """Training has returned: a USR2 from now on (the time limit's warning arriving during shutdown) must not
    requeue a finished run or print a traceback; it is logged in one line."""
    def late(signum: int, frame: Any) -> None:
        _log.warning("%s arrived after training finished: ignored (the run is complete)", signal.Signals(signum).name)

    try:
        signal.signal(signal.SIGUSR2, late)
    except ValueError:
        pass


def _where(error: BaseException) -> str:
    """Where an exception was raised, as ``file:line in function`` of its innermost frame."""
    frames = traceback.extract_tb(error.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else "shutdown"


def job_result_path(run_dir: str | os.PathLike[str], job_id: str) -> Path:
    """``run_dir/job_results/<job id>.json``: the outcome of one job of the run (job ids are digits and ``_``)."""
    if not re.fullmatch(r"[0-9A-Za-z_.-]+", str(job_id)):
        raise BratsUgripError(f"job id {job_id!r}: not a scheduler job id")
    return layout.job_result_path(run_dir, job_id)


@dataclass(frozen=True)
class JobResult:
    """What a job wrote about its own outcome (see :func:`write_job_result`).

    ``status`` is ``"success"`` (``result``: training's result) or ``"error"`` (``error_type``, ``message``,
    ``traceback_tail``, and ``retryable``: False for config and data errors, which fail the same way every time).
    """

    job_id: str
    attempt: int
    status: str
    finished_at: float
    result: dict[str, Any] = field(default_factory=dict)
    error_type: str | None = None
    message: str | None = None
    traceback_tail: str | None = None
    retryable: bool = True

    @property
    def succeeded(self) -> bool:
        return self.status == "success"

    @property
    def summary(self) -> str:
        """``ErrorType: message`` (first line of the message) for an error, ``success`` otherwise."""
        if self.succeeded:
            return "success"
        first = (self.message or "").strip().splitlines()
        return f"{self.error_type}: {first[0] if first else ''}"[:300]


def write_job_result(run_dir: str | os.PathLike[str], job_id: str, attempt: int, *,
                     result: dict[str, Any] | None = None, error: BaseException | None = None) -> Path:
    """Write the job's outcome as JSON, atomically: ``result`` (success) or ``error`` (classified)."""
    payload: dict[str, Any] = {"job_id": str(job_id), "attempt": int(attempt), "finished_at": time.time()}
    if error is None:
        payload.update(status="success", result=_plain(result or {}))
    else:
        tail = "".join(traceback.format_exception(type(error), error, error.__traceback__)).splitlines()[-20:]
        payload.update(status="error", error_type=type(error).__name__, message=str(error)[:4000],
                       traceback_tail="\n".join(tail), retryable=not isinstance(error, DETERMINISTIC_ERRORS))
    return atomic_write_json(job_result_path(run_dir, job_id), payload)


def read_job_result(run_dir: str | os.PathLike[str], job_id: str, attempt: int | None = None) -> JobResult | None:
    """The outcome job ``job_id`` wrote in ``run_dir`` (plain JSON, never a pickle), or None: before it ended, or
    when the file belongs to another submission (another attempt number: a reused job id) or is malformed."""
    try:
        data = json.loads(job_result_path(run_dir, job_id).read_text())
        found = JobResult(job_id=str(data["job_id"]), attempt=int(data.get("attempt", 0)), status=str(data["status"]),
                          finished_at=float(data["finished_at"]), result=dict(data.get("result") or {}),
                          error_type=data.get("error_type"), message=data.get("message"),
                          traceback_tail=data.get("traceback_tail"), retryable=bool(data.get("retryable", True)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if found.job_id != str(job_id) or found.status not in ("success", "error"):
        return None
    if attempt and found.attempt and found.attempt != attempt:
        return None
    return found


def final_checkpoint_complete(run_dir: str | os.PathLike[str], result: JobResult) -> bool:
    """Whether ``run_dir/checkpoints/last.ckpt`` is readable and holds every epoch the successful job reported."""
    epochs = _completed_epochs(layout.last_checkpoint(run_dir))
    wanted = result.result.get("epochs")
    return epochs is not None and epochs > 0 and (not isinstance(wanted, int) or epochs >= wanted)


def _plain(value: Any) -> dict[str, Any]:
    """Training's result as JSON-friendly data (paths and numbers as JSON gives them)."""
    plain = json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
    return plain if isinstance(plain, dict) else {"result": plain}


def read_job_info(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``run_dir/job.json`` as written by the latest job of the run, or None before any job started."""
    path = layout.job_info_path(run_dir)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def error_tail(log_path: str | os.PathLike[str] | None, lines: int = 20) -> str | None:
    """The last ``lines`` lines of a job's error log (None if there is none)."""
    if not log_path:
        return None
    path = Path(log_path)
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 64 * 1024))
        text = handle.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) or None


def scheduler_available(cluster: str) -> bool:
    """Whether ``cluster`` can run jobs here (``slurm`` needs ``sbatch`` on the PATH)."""
    return cluster == "local" or shutil.which("sbatch") is not None
