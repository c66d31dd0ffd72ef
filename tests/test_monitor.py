"""The sweep monitor: sacct parsing, state merging, retries, recovery after a kill, the lock, collection, results,
summary and the CLI's --once/--json output.

The fast tests drive the monitor with a scripted scheduler (job states given by the test, submissions recorded in
the real ``sweep.db``); the slow test runs a real local sweep (submitit's local executor, real training), kills
the monitor mid-sweep and restarts two at once.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.text import Text
from submitit.core.utils import DelayedSubmission, JobPaths

from brats_ugrip.checkpoints import save_model_checkpoint
from brats_ugrip.slurm.sacct import expand_task_ids, parse_sacct, sacct_command
from brats_ugrip.sweeps import monitor as monitor_cli
from brats_ugrip.sweeps.job_states import JobStatus, LocalJobStates
from brats_ugrip.sweeps.jobs import SubmitSpec, TrainingJob
from brats_ugrip.sweeps.launch import jobs_folder
from brats_ugrip.sweeps.layout import INTENT_FILE, collected_paths, run_dir_path, sweep_db_path
from brats_ugrip.sweeps.monitoring.collect import (
    copy_verified,
    is_collected,
    read_collected,
    sha256_file,
    sweep_summary,
    verify_collected,
)
from brats_ugrip.sweeps.monitoring.dashboard import Column, ViewOptions, grid_text, parse_filter, render, select_runs
from brats_ugrip.sweeps.monitoring.engine import PREEMPTED_GRACE_S, MonitorError, SweepMonitor
from brats_ugrip.sweeps.monitoring.report import plot_learning_curves, read_curve
from brats_ugrip.sweeps.monitoring.snapshot import ProgressReader
from brats_ugrip.sweeps.state import RunRecord, RunState, SweepState

REPO = Path(__file__).resolve().parents[1]

# What `sacct -X -n -P --duplicates -o JobID,State,NodeList,ElapsedRaw,ExitCode,Start,End,Reason` printed on the
# dev cluster: a finished array task, a job requeued once then running, a failure, a scancel, and pending tasks.
SACCT_OUTPUT = """\
1_0|COMPLETED|localhost|2|0:0|2026-11-25T13:18:21|2026-11-25T13:18:23|None
4|REQUEUED|localhost|36|0:0|2026-11-25T13:18:25|2026-11-25T13:19:01|None
4|RUNNING|localhost|27|0:0|2026-11-25T13:19:13|Unknown|BeginTime
5|FAILED|localhost|2|1:0|2026-11-25T13:19:41|2026-11-25T13:19:43|None
6|CANCELLED by 0|localhost|3|0:15|2026-11-25T13:19:43|2026-11-25T13:19:46|None
7_[2-4,6%2]|PENDING|None assigned|0|0:0|Unknown|Unknown|JobArrayTaskLimit
7_0|RUNNING|localhost|5|0:0|2026-11-25T13:22:06|Unknown|None
7_3|RUNNING|localhost|1|0:0|2026-11-25T13:22:07|Unknown|None
"""


# --- a scripted scheduler ------------------------------------------------------------------------------------


class ScriptedScheduler:
    """A job-state source whose answers the test sets, and a submit function recording attempts in ``sweep.db``
    as ``brats_ugrip.sweeps.jobs.submit_runs`` does (no processes are started)."""

    cluster = "local"

    def __init__(self) -> None:
        self.states: dict[str, JobStatus] = {}
        self.submissions: list[tuple[str, str]] = []
        self.cancelled: list[str] = []
        self.next_id = 9000
        self._lock = threading.Lock()

    def statuses(self, jobs, submitted=None):
        return {job_id: self.states[job_id] for job_id in jobs if job_id in self.states}

    def cancel(self, job_ids):
        self.cancelled.extend(job_ids)

    def submit(self, state, runs, spec, folder, *, resubmission=False):
        jobs = {}
        with self._lock:
            for run in runs:
                self.next_id += 1
                job_id = str(self.next_id)
                self.submissions.append((run.run_id, job_id))
                jobs[run.run_id] = SimpleNamespace(job_id=job_id)
        with state.transaction():
            for run_id, job in jobs.items():
                state.record_submission(run_id, job.job_id, log_path=str(JobPaths(folder, job.job_id, 0).stderr),
                                        state=RunState.RETRYING if resubmission else RunState.SUBMITTED)
        return jobs

    def set(self, job_id: str, state: str, **fields) -> None:
        self.states[job_id] = JobStatus(job_id, state, **fields)


def _records(sweep_dir: Path, lrs=(0.001, 0.01), folds=(0, 1), max_retries=1, cluster="local") -> list[RunRecord]:
    records = []
    for fold in folds:
        for lr in lrs:
            run_id = f"fold={fold}-lr={lr}"
            run_dir = run_dir_path(sweep_dir, run_id)
            config = {"data": {"fold": fold}, "optim": {"lr": lr}, "trainer": {"max_epochs": 4}, "run_dir": str(run_dir)}
            records.append(RunRecord(run_id=run_id, config=config, params={"optim.lr": lr, "data.fold": fold},
                                     run_dir=str(run_dir), submit={"cluster": cluster, "parameters": {}},
                                     max_retries=max_retries))
    return records


@pytest.fixture
def sweep(tmp_path):
    """A sweep of 4 runs (2 lrs × 2 folds, max_retries 1), all submitted, followed by a scripted scheduler."""
    scheduler = ScriptedScheduler()
    with SweepState(sweep_db_path(tmp_path)) as state:
        records = _records(tmp_path)
        state.add_runs(records)
        state.set_meta("name", "scripted")
        scheduler.submit(state, records, SubmitSpec("local"), jobs_folder(tmp_path))
    monitor = SweepMonitor(tmp_path, sources=[scheduler], submit=scheduler.submit, stall_minutes=5)
    yield SimpleNamespace(dir=tmp_path, scheduler=scheduler, monitor=monitor,
                          job={r.run_id: str(9001 + i) for i, r in enumerate(records)})
    monitor.close()


def _write_checkpoint(run_dir: Path, name: str = "best.ckpt", dice: float = 0.8, fold: int = 0) -> Path:
    path = run_dir / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {"TC": dice - 0.05, "WT": dice + 0.05, "ET": dice, "mean": dice}
    save_model_checkpoint(path, {"conv.weight": torch.randn(4, 4, 3, 3, 3)},
                          {"model": {"name": "segresnet", "kwargs": {"init_filters": 8}}, "fold": fold,
                           "val_metrics": metrics, "val_epoch": 3, "epoch": 4, "init_id": "abc"})
    return path


def _write_result(sweep_dir: Path, run_id: str, job_id: str, outcome: dict) -> None:
    """The job's own result file, as TrainingJob writes it (plain JSON in the run directory)."""
    path = run_dir_path(sweep_dir, run_id) / "job_results" / f"{job_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"job_id": job_id, "attempt": 0, "finished_at": time.time(), **outcome}))


def _error(error_type: str, message: str, retryable: bool = True) -> dict:
    return {"status": "error", "error_type": error_type, "message": message, "retryable": retryable,
            "traceback_tail": f"Traceback (most recent call last):\n{error_type}: {message}"}


def _write_log(sweep_dir: Path, job_id: str, text: str) -> None:
    path = JobPaths(jobs_folder(sweep_dir), job_id, 0).stderr
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _complete(sweep, run_id: str, dice: float, job_id: str | None = None) -> None:
    """Make a run's job complete as training would: checkpoint, result pickle, sacct COMPLETED."""
    job_id = job_id or sweep.job[run_id]
    run_dir = run_dir_path(sweep.dir, run_id)
    fold = int(run_id.split("-")[0].split("=")[1])
    _write_checkpoint(run_dir, dice=dice, fold=fold)
    metrics = {"TC": dice - 0.05, "WT": dice + 0.05, "ET": dice, "mean": dice}
    _write_result(sweep.dir, run_id, job_id, {"status": "success", "result": {
        "status": "completed", "best_val_dice": dice, "best_epoch": 3, "val_metrics": metrics, "epochs": 4}})
    sweep.scheduler.set(job_id, "COMPLETED", node="gpu01", started_at=time.time() - 60, ended_at=time.time())


# --- sacct --------------------------------------------------------------------------------------------------


def test_parse_sacct_histories_states_and_pending_arrays():
    records = parse_sacct(SACCT_OUTPUT)
    assert [r.state for r in records["4"]] == ["REQUEUED", "RUNNING"]  # oldest first
    assert records["6"][0].state == "CANCELLED" and records["6"][0].exit_code == "0:15"
    assert records["5"][0].state == "FAILED" and records["5"][0].node == "localhost"
    assert records["4"][1].end is None and records["4"][0].end - records["4"][0].start == 36
    # The compressed pending record covers tasks 2, 3, 4, 6; task 3 has its own record, which wins.
    assert {k for k in records if k.startswith("7_")} == {"7_0", "7_2", "7_3", "7_4", "7_6"}
    assert records["7_3"][0].state == "RUNNING" and records["7_4"][0].state == "PENDING"
    assert records["7_4"][0].node is None and records["7_4"][0].reason == "JobArrayTaskLimit"
    assert expand_task_ids("0-3,7,9-10%4") == [0, 1, 2, 3, 7, 9, 10]


def test_one_sacct_call_asks_each_array_once():
    command = sacct_command([f"12_{i}" for i in range(1000)] + ["7", "12_5"])
    assert command[command.index("-j") + 1] == "7,12"
    assert "--duplicates" in command and "-X" in command


# --- merging scheduler states --------------------------------------------------------------------------------


def test_states_are_merged_into_the_database(sweep):
    a, b, c, d = sweep.job.values()
    sweep.scheduler.set(a, "RUNNING", node="gpu01", started_at=1000.0)
    sweep.scheduler.set(b, "PENDING")
    sweep.scheduler.set(c, "PENDING", requeues=1)  # requeued after a timeout, waiting to start again
    sweep.scheduler.set(d, "REQUEUED", node="gpu02")
    report = sweep.monitor.poll()
    state = sweep.monitor.state
    runs = {r.run_id: r for r in state.runs()}
    assert [runs[k].state for k in sweep.job] == [RunState.RUNNING, RunState.SUBMITTED, RunState.REQUEUED,
                                                   RunState.REQUEUED]
    first = state.latest_attempt("fold=0-lr=0.001")
    assert first.state == "RUNNING" and first.node == "gpu01" and first.started_at == 1000.0
    assert sorted(report.changed) == sorted(["fold=0-lr=0.001", "fold=1-lr=0.001", "fold=1-lr=0.01"])
    # Nothing changes: a second poll writes nothing.
    assert sweep.monitor.poll().changed == []
    assert (sweep.dir / "results.csv").is_file()


def test_completed_run_gets_metrics_and_a_verified_model(sweep):
    run_id = "fold=0-lr=0.01"
    _complete(sweep, run_id, 0.75)
    report = sweep.monitor.poll()
    assert report.collected == [run_id]
    run = sweep.monitor.state.get_run(run_id)
    assert run.state == RunState.COMPLETED and run.metrics["val_metrics"]["ET"] == pytest.approx(0.75)
    assert run.best_checkpoint.endswith("best.ckpt")
    target, meta_path = collected_paths(sweep.dir, run_id)
    meta = read_collected(sweep.dir, run_id)
    source = run_dir_path(sweep.dir, run_id) / "checkpoints" / "best.ckpt"
    assert target.read_bytes() == source.read_bytes()
    assert meta["sha256"] == sha256_file(source) and meta["size"] == source.stat().st_size
    assert meta["fold"] == 0 and meta["val_metrics"]["mean"] == pytest.approx(0.75) and meta["init_id"] == "abc"
    assert verify_collected(sweep.dir, run_id)
    assert sweep.monitor.poll().collected == []  # collected once
    import pandas as pd

    results = pd.read_csv(sweep.dir / "results.csv").set_index("run_id")
    assert results.loc[run_id, "state"] == "COMPLETED" and results.loc[run_id, "dice_ET"] == pytest.approx(0.75)
    assert results.loc[run_id, "optim.lr"] == pytest.approx(0.01) and results.loc[run_id, "fold"] == 0
    assert results.loc[run_id, "model_path"] == str(target.resolve())
    assert set(results.index) == set(sweep.job) and results["dice_mean"].notna().sum() == 1


def test_failing_run_is_retried_then_failed_while_others_complete(sweep):
    bad, good = "fold=0-lr=0.001", "fold=1-lr=0.01"
    _write_log(sweep.dir, sweep.job[bad], "loading data\nTraceback (most recent call last):\nRuntimeError: CUDA out "
                                          "of memory. Tried to allocate 2.00 GiB\n")
    _write_result(sweep.dir, bad, sweep.job[bad],
                  _error("RuntimeError", "CUDA out of memory. Tried to allocate 2.00 GiB"))
    sweep.scheduler.set(sweep.job[bad], "OUT_OF_MEMORY", ended_at=time.time())
    sweep.scheduler.set(sweep.job[good], "RUNNING")
    report = sweep.monitor.poll()
    retry_job = report.resubmitted[bad]
    run = sweep.monitor.state.get_run(bad)
    assert run.state == RunState.RETRYING and run.attempts == 2
    assert "retry 1/1" in run.reason and "CUDA out of memory" in run.reason
    first = sweep.monitor.state.attempt(bad, 1)
    assert first.state == "OUT_OF_MEMORY" and "CUDA out of memory" in first.error_tail
    # The retry fails too: no retries left.
    _write_log(sweep.dir, retry_job, "ValueError: bad learning rate\n")
    sweep.scheduler.set(retry_job, "FAILED", exit_code="1:0")
    _complete(sweep, good, 0.8)
    report = sweep.monitor.poll()
    assert report.resubmitted == {} and report.failed == [bad]
    run = sweep.monitor.state.get_run(bad)
    assert run.state == RunState.FAILED and "no retries left" in run.reason and "bad learning rate" in run.reason
    assert [a.job_id for a in sweep.monitor.state.attempts(bad)] == [sweep.job[bad], retry_job]
    assert sweep.monitor.state.attempt(bad, 2).error_tail.strip() == "ValueError: bad learning rate"
    assert sweep.monitor.state.get_run(good).state == RunState.COMPLETED
    assert [s for s in sweep.scheduler.submissions if s[0] == good] == [(good, sweep.job[good])]
    # The dashboard shows the reason.
    snapshot = sweep.monitor.snapshot()
    row = next(r for r in snapshot.runs if r.run_id == bad)
    assert row.label == "FAILED" and row.attempt == 2 and row.max_attempts == 2 and "bad learning rate" in row.reason


def test_timeout_not_requeued_resumes_only_after_progress(sweep):
    moved, stuck = "fold=0-lr=0.001", "fold=0-lr=0.01"
    for run_id in (moved, stuck):
        sweep.scheduler.set(sweep.job[run_id], "RUNNING", started_at=time.time() - 100)
    sweep.monitor.poll()
    _write_checkpoint(run_dir_path(sweep.dir, moved), "last.ckpt")  # written during the attempt
    old = _write_checkpoint(run_dir_path(sweep.dir, stuck), "last.ckpt")
    os.utime(old, (time.time() - 1000, time.time() - 1000))  # from before the attempt started
    for run_id in (moved, stuck):
        sweep.scheduler.set(sweep.job[run_id], "TIMEOUT", ended_at=time.time())
    report = sweep.monitor.poll()
    assert list(report.resubmitted) == [moved]
    assert "resuming from last.ckpt" in sweep.monitor.state.get_run(moved).reason
    stuck_run = sweep.monitor.state.get_run(stuck)
    assert stuck_run.state == RunState.FAILED and "one epoch does not fit the time limit" in stuck_run.reason
    # A resumption is not a failure: the resumed run still has its retry.
    retry_job = report.resubmitted[moved]
    sweep.scheduler.set(retry_job, "NODE_FAIL")
    assert moved in sweep.monitor.poll().resubmitted


def test_preempted_run_waits_for_slurm_then_resumes_itself(sweep):
    """PREEMPTED: SLURM requeues the job (the run is REQUEUED until it runs again); a job still PREEMPTED after the
    grace period was not requeued, so the monitor resumes it from last.ckpt, and that is not a failure."""
    run_id = "fold=0-lr=0.001"
    job = sweep.job[run_id]
    sweep.scheduler.set(job, "RUNNING", started_at=time.time() - 100)
    sweep.monitor.poll()
    _write_checkpoint(run_dir_path(sweep.dir, run_id), "last.ckpt")
    sweep.scheduler.set(job, "PREEMPTED", ended_at=time.time())
    assert sweep.monitor.poll().resubmitted == {}
    assert sweep.monitor.state.get_run(run_id).state == RunState.REQUEUED
    sweep.scheduler.set(job, "PREEMPTED", ended_at=time.time() - PREEMPTED_GRACE_S - 1)
    report = sweep.monitor.poll()
    assert list(report.resubmitted) == [run_id]
    assert "PREEMPTED (not requeued): resuming from last.ckpt" in sweep.monitor.state.get_run(run_id).reason
    assert sweep.monitor.state.attempt(run_id, 1).state == "PREEMPTED"
    sweep.scheduler.set(report.resubmitted[run_id], "NODE_FAIL")  # the resumed run still has its one retry
    assert run_id in sweep.monitor.poll().resubmitted


def test_unknown_jobs_and_sacct_errors_change_nothing(sweep):
    from brats_ugrip.slurm.sacct import SacctError

    class Broken(ScriptedScheduler):
        def statuses(self, jobs, submitted=None):
            raise SacctError("sacct failed (exit 1): slurmdbd: connection refused")

    before = {r.run_id: r.state for r in sweep.monitor.state.runs()}
    report = sweep.monitor.poll()  # the scripted scheduler knows no job yet
    assert report.changed == [] and report.resubmitted == {}
    broken = SweepMonitor(sweep.dir, sources=[Broken()], submit=sweep.scheduler.submit)
    report = broken.poll()
    assert "connection refused" in report.notes[0] and report.changed == []
    assert {r.run_id: r.state for r in broken.state.runs()} == before
    assert "connection refused" in broken.snapshot(report.notes).notes[0]
    broken.close()


# --- kill, restart, two monitors ----------------------------------------------------------------------------


def test_two_monitors_polling_at_once_submit_a_failed_run_once(sweep):
    bad = "fold=1-lr=0.001"
    sweep.scheduler.set(sweep.job[bad], "FAILED")
    errors = []

    def poll_many():  # each monitor in its own thread, with its own database connection, as separate processes
        try:
            monitor = SweepMonitor(sweep.dir, sources=[sweep.scheduler], submit=sweep.scheduler.submit)
            for _ in range(5):
                monitor.poll()
            monitor.close()
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=poll_many) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    resubmissions = [s for s in sweep.scheduler.submissions if s[0] == bad]
    assert len(resubmissions) == 2  # the launch's attempt and exactly one retry
    assert sweep.monitor.state.get_run(bad).attempts == 2


def test_lock_is_exclusive(sweep):
    other = SweepMonitor(sweep.dir, sources=[sweep.scheduler], submit=sweep.scheduler.submit, lock_timeout_s=0.3)
    with sweep.monitor.lock.hold():
        with pytest.raises(MonitorError, match="another monitor has held the lock"):
            other.poll()
    other.poll()  # free again
    other.close()


def test_monitor_killed_during_a_submission_adopts_the_submitted_job(sweep):
    """sbatch accepted the job but the monitor died before recording it: the next monitor records the job it
    finds in submitit's folder instead of submitting the run again."""
    bad = "fold=0-lr=0.001"
    sweep.scheduler.set(sweep.job[bad], "FAILED")
    run = sweep.monitor.state.get_run(bad)
    (sweep.dir / INTENT_FILE).write_text(json.dumps({"time": time.time() - 5, "attempts": {bad: run.attempts},
                                                     "resubmission": True}))
    orphan = "4242"
    JobPaths(jobs_folder(sweep.dir), orphan).folder.mkdir(parents=True)
    DelayedSubmission(TrainingJob(run.run_dir, run.config)).dump(JobPaths(jobs_folder(sweep.dir), orphan).submitted_pickle)
    report = sweep.monitor.poll()
    assert report.adopted == {bad: orphan} and report.resubmitted == {}
    assert sweep.monitor.state.latest_attempt(bad).job_id == orphan
    assert sweep.monitor.state.get_run(bad).state == RunState.RETRYING
    assert not (sweep.dir / INTENT_FILE).exists()
    assert [s for s in sweep.scheduler.submissions if s[0] == bad] == [(bad, sweep.job[bad])]


class _Trap:
    """A pickle that, when loaded, writes a marker file (what an attacker with write access could plant)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_monitor_never_unpickles_sweep_files(tmp_path):
    """Booby-trapped result and submitted pickles in submitit's folder: `monitor --once` (real local job states,
    an interrupted submission to adopt) reads JSON only, so the trap's marker never appears."""
    marker = tmp_path / "executed"
    sweep_dir = tmp_path / "sweep"
    records = _records(sweep_dir, lrs=(0.001,), folds=(0, 1))
    dead_job, adopted_job = "999999999", "888888888"  # pids that no process has: the local controllers are gone
    with SweepState(sweep_db_path(sweep_dir)) as state:
        state.add_runs(records)
        state.set_meta("name", "trap")
        state.record_submission(records[0].run_id, dead_job)
    for job_id in (dead_job, adopted_job):
        paths = JobPaths(jobs_folder(sweep_dir), job_id, 0)
        paths.folder.mkdir(parents=True)
        paths.result_pickle.write_bytes(pickle.dumps(("success", _Trap(marker))))
        paths.submitted_pickle.write_bytes(pickle.dumps(_Trap(marker)))
    (sweep_dir / INTENT_FILE).write_text(json.dumps({"time": time.time() - 5, "attempts": {records[1].run_id: 0},
                                                     "resubmission": False}))
    # Sanity: the trap works when unpickled.
    pickle.loads(pickle.dumps(_Trap(tmp_path / "sanity")))
    assert (tmp_path / "sanity").exists()
    assert monitor_cli.main([str(sweep_dir), "--once"]) == 0
    assert not marker.exists()
    with SweepState(sweep_db_path(sweep_dir)) as state:
        run = state.get_run(records[0].run_id)
    # Without its JSON result the job counts as killed (a retry), not as the pickle's "success".
    assert run.state == RunState.RETRYING and "without a result" in run.reason


def test_job_success_with_a_complete_checkpoint_wins_over_the_scheduler(sweep):
    """USR2 during interpreter exit: sacct says FAILED 12:0 after the job wrote its success and a complete
    last.ckpt. Such a run is COMPLETED with no retry spent; without the complete checkpoint it is a failure."""
    done, broken = "fold=0-lr=0.001", "fold=0-lr=0.01"
    for run_id in (done, broken):
        _write_result(sweep.dir, run_id, sweep.job[run_id], {"status": "success", "result": {
            "status": "completed", "best_val_dice": 0.7, "epochs": 4}})
        sweep.scheduler.set(sweep.job[run_id], "FAILED", exit_code="12:0", ended_at=time.time())
    run_dir = run_dir_path(sweep.dir, done)
    _write_checkpoint(run_dir, "best.ckpt")
    _write_checkpoint(run_dir, "last.ckpt")  # its metadata says epoch 4 = the result's epochs
    report = sweep.monitor.poll()
    run = sweep.monitor.state.get_run(done)
    assert run.state == RunState.COMPLETED and run.attempts == 1 and done not in report.resubmitted
    assert "reported success" in run.reason and "12:0" in run.reason and run.metrics["best_val_dice"] == 0.7
    assert sweep.monitor.state.latest_attempt(done).state == "COMPLETED"
    assert broken in report.resubmitted  # no last.ckpt: the success alone is not trusted


def test_config_and_data_errors_fail_at_once_other_errors_are_retried(sweep):
    data, oom = "fold=0-lr=0.001", "fold=1-lr=0.001"
    _write_result(sweep.dir, data, sweep.job[data], _error("DataError", "case BraTS-001: t1c.nii.gz is missing",
                                                           retryable=False))
    _write_result(sweep.dir, oom, sweep.job[oom], _error("OutOfMemoryError", "CUDA out of memory"))
    for run_id in (data, oom):
        sweep.scheduler.set(sweep.job[run_id], "FAILED", exit_code="1:0", ended_at=time.time())
    report = sweep.monitor.poll()
    run = sweep.monitor.state.get_run(data)
    assert run.state == RunState.FAILED and run.attempts == 1 and report.failed == [data]
    assert run.reason.startswith("DataError: case BraTS-001: t1c.nii.gz is missing") and "not retried" in run.reason
    assert list(report.resubmitted) == [oom]


def test_restarted_monitor_rebuilds_everything(sweep):
    """A new monitor (new process) knows nothing but sweep.db, the scheduler and the run directories."""
    done, failed = "fold=0-lr=0.001", "fold=0-lr=0.01"
    _complete(sweep, done, 0.7)
    sweep.scheduler.set(sweep.job[failed], "FAILED")
    sweep.monitor.close()
    fresh = SweepMonitor(sweep.dir, sources=[sweep.scheduler], submit=sweep.scheduler.submit)
    report = fresh.poll()
    assert report.collected == [done] and list(report.resubmitted) == [failed]
    (collected_paths(sweep.dir, done)[0]).unlink()  # a model lost: the next monitor collects it again
    fresh.close()
    again = SweepMonitor(sweep.dir, sources=[sweep.scheduler], submit=sweep.scheduler.submit)
    assert again.poll().collected == [done] and verify_collected(sweep.dir, done)
    again.close()


# --- actions ------------------------------------------------------------------------------------------------


def test_cancel_and_retry(sweep):
    a, b = "fold=0-lr=0.001", "fold=0-lr=0.01"
    sweep.scheduler.set(sweep.job[a], "RUNNING")
    sweep.monitor.poll()
    with pytest.raises(MonitorError, match="cancel it first"):
        sweep.monitor.retry([a])
    with pytest.raises(MonitorError, match="no run 'nope'"):
        sweep.monitor.cancel(["nope"])
    assert sweep.monitor.cancel([a]) == [a]
    assert sweep.scheduler.cancelled == [sweep.job[a]]
    assert sweep.monitor.state.get_run(a).state == RunState.CANCELLED
    sweep.scheduler.set(sweep.job[a], "CANCELLED")
    sweep.monitor.poll()
    assert sweep.monitor.state.get_run(a).reason == "cancelled with monitor.py --cancel"
    submitted = sweep.monitor.retry([a])
    assert sweep.monitor.state.latest_attempt(a).job_id == submitted[a]
    assert sweep.monitor.state.get_run(a).state == RunState.RETRYING
    assert sorted(sweep.monitor.cancel(["all"])) == sorted(sweep.job)
    assert all(r.state == RunState.CANCELLED for r in sweep.monitor.state.runs())
    assert b in [r.run_id for r in sweep.monitor.state.runs([RunState.CANCELLED])]


# --- collection -------------------------------------------------------------------------------------------


def test_copy_is_verified_and_tampering_is_detected(tmp_path):
    source = tmp_path / "a.bin"
    source.write_bytes(os.urandom(3 << 20))
    sha, size = copy_verified(source, tmp_path / "out" / "a.bin")
    assert size == 3 << 20 and sha == sha256_file(source) == sha256_file(tmp_path / "out" / "a.bin")
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temporary file left


def test_collected_model_checks(sweep):
    run_id = "fold=1-lr=0.01"
    _complete(sweep, run_id, 0.6)
    sweep.monitor.poll()
    run = sweep.monitor.state.get_run(run_id)
    assert is_collected(sweep.dir, run)
    target = collected_paths(sweep.dir, run_id)[0]
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    assert not verify_collected(sweep.dir, run_id)  # same size, other bytes: only the hash sees it
    _write_checkpoint(run_dir_path(sweep.dir, run_id), dice=0.9)  # the source changed since
    assert not is_collected(sweep.dir, run)


def test_collect_last_too(sweep):
    run_id = "fold=1-lr=0.001"
    _complete(sweep, run_id, 0.66)
    last = _write_checkpoint(run_dir_path(sweep.dir, run_id), "last.ckpt", dice=0.6)
    with_last = SweepMonitor(sweep.dir, sources=[sweep.scheduler], submit=sweep.scheduler.submit, collect_last=True)
    assert with_last.poll().collected == [run_id]
    meta = read_collected(sweep.dir, run_id)
    copied = sweep.dir / "models" / "last" / f"{run_id}.ckpt"
    assert meta["last"]["path"] == str(copied.resolve()) and meta["last"]["sha256"] == sha256_file(last)
    assert sorted(p.name for p in (sweep.dir / "models").glob("*.ckpt")) == [f"{run_id}.ckpt"]  # souping's folder
    with_last.close()


# --- results and summary -----------------------------------------------------------------------------------


def _curve_csv(run_dir: Path, values: list[float]) -> None:
    lines = ["epoch,step,train/loss_epoch,val/dice_mean"]
    for epoch, value in enumerate(values):
        lines += [f"{epoch},{epoch},0.5,", f"{epoch},{epoch},,{value}"]
    lines.append(f"{len(values) - 1},{len(values) - 1},,{values[-1]}")  # a resumed run logs its epoch again
    (run_dir / "csv").mkdir(parents=True, exist_ok=True)
    (run_dir / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_summary_best_per_fold_mean_std_and_curves(sweep):
    dice = {"fold=0-lr=0.001": 0.70, "fold=0-lr=0.01": 0.80, "fold=1-lr=0.001": 0.60, "fold=1-lr=0.01": 0.76}
    for run_id, value in dice.items():
        _complete(sweep, run_id, value)
        _curve_csv(run_dir_path(sweep.dir, run_id), [value / 2, value])
    sweep.monitor.poll()
    summary = sweep_summary(sweep.dir, sweep.monitor.state)
    best = summary.best_per_fold.set_index("fold")
    assert best.loc[0, "run_id"] == "fold=0-lr=0.01" and best.loc[1, "run_id"] == "fold=1-lr=0.01"
    per_lr = summary.per_value["optim.lr"].set_index("optim.lr")
    assert per_lr.loc[0.01, "mean"] == pytest.approx(np.mean([0.80, 0.76]))
    assert per_lr.loc[0.01, "std"] == pytest.approx(np.std([0.80, 0.76], ddof=1))
    assert per_lr.loc[0.001, "n_folds"] == 2 and list(per_lr.index) == [0.01, 0.001]  # best first
    assert summary.per_config.iloc[0]["optim.lr"] == 0.01
    assert summary.curves_png is None  # the figure is the report's: plot_learning_curves draws it
    png = plot_learning_curves(sweep.dir, sweep.monitor.state.runs())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = read_curve(run_dir_path(sweep.dir, "fold=0-lr=0.01"))
    assert list(curve["epoch"]) == [1, 2] and list(curve["val_dice"]) == pytest.approx([0.40, 0.80])


# --- view and dashboard -------------------------------------------------------------------------------------


def test_progress_eta_and_stall(sweep):
    running, quiet = "fold=0-lr=0.001", "fold=1-lr=0.001"
    now = time.time()
    for run_id in (running, quiet):
        sweep.scheduler.set(sweep.job[run_id], "RUNNING", started_at=now - 3600)
        progress = {"status": "running", "epoch": 3, "max_epochs": 4, "best_val_dice": 0.5, "best_epoch": 2,
                    "epoch_seconds": 100.0, "host": "gpu07", "gpu": "NVIDIA A100"}
        path = run_dir_path(sweep.dir, run_id) / "progress.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(progress))
    os.utime(run_dir_path(sweep.dir, quiet) / "progress.json", (now - 900, now - 900))  # 15 min > 5 min
    sweep.monitor.poll()
    rows = {r.run_id: r for r in sweep.monitor.snapshot().runs}
    assert rows[running].eta_s == pytest.approx(100.0) and rows[running].fraction == pytest.approx(0.75)
    assert rows[running].gpu == "NVIDIA A100" and not rows[running].stalled
    assert rows[quiet].stalled and rows[quiet].label == "RUNNING STALLED"
    assert sweep.monitor.snapshot().counts == {"SUBMITTED": 2, "RUNNING": 2, "STALLED": 1}
    text = _plain(render(sweep.monitor.snapshot(), ViewOptions(filters=[parse_filter("state=stalled", [])])))
    rows = [line for line in text.splitlines() if line.startswith("fold=")]
    assert len(rows) == 1 and rows[0].startswith(quiet) and "RUNNING STALLED" in rows[0]
    assert "████████░░ 3/4" in rows[0] and "gpu07 · NVIDIA A100" in rows[0] and "1m40s" in rows[0]  # ETA


def test_progress_reader_rereads_only_changed_files(tmp_path):
    reader = ProgressReader()
    (tmp_path / "progress.json").write_text(json.dumps({"epoch": 1}))
    assert reader.read(tmp_path)[0] == {"epoch": 1}
    (tmp_path / "progress.json").write_text(json.dumps({"epoch": 22}))
    assert reader.read(tmp_path)[0] == {"epoch": 22}
    assert reader.read(tmp_path / "missing") == (None, None)


def test_filters_sorting_and_errors(sweep):
    _complete(sweep, "fold=0-lr=0.01", 0.9)
    _complete(sweep, "fold=1-lr=0.001", 0.5)
    sweep.monitor.poll()
    snapshot = sweep.monitor.snapshot()
    keys = snapshot.varied_keys
    assert keys == ["data.fold", "optim.lr"]  # as sweep.db keeps them (sorted, like the parts of run ids)
    by_lr = select_runs(snapshot, ViewOptions(filters=[parse_filter("lr=0.01", keys)]))
    assert [r.run_id for r in by_lr] == ["fold=0-lr=0.01", "fold=1-lr=0.01"]
    both = [parse_filter("data.fold=1", keys), parse_filter("state=completed,failed", keys)]
    assert [r.run_id for r in select_runs(snapshot, ViewOptions(filters=both))] == ["fold=1-lr=0.001"]
    assert [r.best_dice for r in select_runs(snapshot, ViewOptions(sort="dice"))][:2] == [0.9, 0.5]
    assert select_runs(snapshot, ViewOptions(sort="state"))[0].state == "SUBMITTED"
    from brats_ugrip.errors import BratsUgripError

    with pytest.raises(BratsUgripError, match="not varied in this sweep.*one of: fold, lr"):
        parse_filter("model=x", keys)
    with pytest.raises(BratsUgripError, match="unknown state BOGUS"):
        parse_filter("state=bogus", keys)


def test_grid_text_fits_the_width():
    columns = [Column("run", flexible=True), Column("n", "right"), Column("note", flexible=True)]
    rows = [["a-very-long-run-identifier-" * 3, "7", "x" * 50], ["b", "12", "ok"]]
    lines = grid_text(columns, rows, width=60).plain.splitlines()
    assert max(len(line) for line in lines) <= 60
    assert lines[2].startswith("a-very-long") and "…" in lines[2]
    assert lines[3].startswith("b ") and lines[3].rstrip().endswith("12  ok")  # right-aligned count
    assert len(grid_text(columns, rows).plain.splitlines()[2]) > 100  # no width: nothing cut
    styled = grid_text(columns, [["a", Text("9", style="red"), Text("fine", style="green")]])
    assert {(styled.plain[s.start:s.end], str(s.style)) for s in styled.spans} >= {
        ("run", "bold"), ("n", "bold"), ("note", "bold"), ("9", "red"), ("fine", "green")}  # styles on their cells


def _plain(renderable, width: int = 250) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, file=open(os.devnull, "w"))
    console.print(renderable)
    return console.export_text()


def test_live_frame_fits_the_terminal(tmp_path):
    scheduler = ScriptedScheduler()
    with SweepState(sweep_db_path(tmp_path)) as state:
        records = _records(tmp_path, lrs=[0.001 * i for i in range(1, 31)], folds=range(5))
        state.add_runs(records)
    monitor = SweepMonitor(tmp_path, sources=[scheduler], submit=scheduler.submit)
    snapshot = monitor.snapshot()
    frame = _plain(render(snapshot, ViewOptions(), height=40, width=120), width=120).splitlines()
    rows = [line for line in frame if line.startswith("fold=")]
    assert len(frame) <= 40 and max(len(line) for line in frame) <= 120
    assert frame[-1].startswith(f"… {150 - len(rows)} more runs") and f"showing {len(rows)} of 150 runs" in frame[3]
    compact = _plain(render(snapshot, ViewOptions(compact=True), width=120), width=120).splitlines()
    assert len(compact) == 3 + 2 + 30 + 5  # header, heading and rule, one row per lr and per fold
    assert compact[3].split()[:4] == ["parameter", "value", "runs", "PENDING"]
    assert compact[5].split()[:4] == ["fold", "0", "30", "30"] and compact[10].split()[:4] == ["lr", "0.001", "5", "5"]
    monitor.close()


# --- local jobs ---------------------------------------------------------------------------------------------


def test_local_job_states_from_processes_and_result_files(tmp_path):
    import submitit

    folder = tmp_path / "jobs" / "%j"
    executor = submitit.AutoExecutor(folder, cluster="local")
    executor.update_parameters(timeout_min=5)
    running = executor.submit(time.sleep, 30)  # builtins: the job process cannot import this test module
    failing = executor.submit(int, "not a number")
    source = LocalJobStates(folder)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    deadline = time.time() + 60
    while not failing.done() and time.time() < deadline:
        time.sleep(0.2)
    statuses = source.statuses({running.job_id: run_dir, failing.job_id: run_dir})
    assert statuses[running.job_id].state == "PENDING"  # alive, but its run has not started (no job.json)
    # A job that ended without writing its result file (submitit's pickle is never read): killed or crashed.
    assert statuses[failing.job_id].state == "FAILED" and "without a result" in statuses[failing.job_id].reason
    (run_dir / "job_results").mkdir()
    (run_dir / "job_results" / f"{failing.job_id}.json").write_text(json.dumps(
        {"job_id": failing.job_id, "attempt": 1, "finished_at": 1.0, **_error("ValueError", "bad value\nmore")}))
    status = source.statuses({failing.job_id: run_dir})[failing.job_id]
    assert status.state == "FAILED" and status.reason == "ValueError: bad value" and status.ended_at == 1.0
    (run_dir / "job.json").write_text(json.dumps({"job_id": running.job_id, "started_at": 123.0}))
    assert source.statuses({running.job_id: run_dir})[running.job_id].state == "RUNNING"
    source.cancel([running.job_id])
    running._process.wait(timeout=30)  # reaped here; a zombie would count as ended too
    status = source.statuses({running.job_id: run_dir})[running.job_id]
    assert status.state == "FAILED" and "without a result" in status.reason and status.started_at == 123.0


# --- CLI ----------------------------------------------------------------------------------------------------


def test_cli_once_and_json(sweep, capsys):
    _complete(sweep, "fold=0-lr=0.01", 0.85)
    sweep.scheduler.set(sweep.job["fold=0-lr=0.001"], "FAILED")
    sweep.scheduler.set(sweep.monitor.poll().resubmitted["fold=0-lr=0.001"], "FAILED")
    sweep.monitor.poll()
    with sweep.monitor.state.transaction():  # the rest finished too, so the CLI's own poll has nothing to ask
        for run in sweep.monitor.state.runs():
            if not run.state.is_final:
                sweep.monitor.state.update_run(run.run_id, state=RunState.CANCELLED)
    assert monitor_cli.main([str(sweep.dir), "--once", "--sort", "dice"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "sweep scripted" in lines[0] and "COMPLETED 1  FAILED 1  CANCELLED 2" in lines[1]
    assert "best: fold=0-lr=0.01  Dice 0.8500 @3" in out
    first_row = lines[5]
    assert first_row.startswith("fold=0-lr=0.01") and "COMPLETED" in first_row and "0.8500" in first_row
    assert monitor_cli.main([str(sweep.dir), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["counts"] == {"COMPLETED": 1, "FAILED": 1, "CANCELLED": 2}
    assert state["best"]["run_id"] == "fold=0-lr=0.01"
    rows = {r["run_id"]: r for r in state["runs"]}
    assert rows["fold=0-lr=0.01"]["metrics"]["val_metrics"]["mean"] == pytest.approx(0.85)
    assert rows["fold=0-lr=0.001"]["attempt"] == 2
    assert monitor_cli.main([str(sweep.dir), "--once", "--compact", "--filter", "state=CANCELLED"]) == 0
    compact = capsys.readouterr().out.splitlines()
    assert compact[3] == "showing 2 of 4 runs"
    table = compact[4:]
    assert table[0].split() == ["parameter", "value", "runs", "CANCELLED", "STALLED", "best", "Dice", "mean", "best",
                                "Dice"]
    rows = [line.split()[:4] for line in table[2:]]  # the two cancelled runs: fold 1, one per lr
    assert rows == [["fold", "1", "2", "2"], ["lr", "0.001", "1", "1"], ["lr", "0.01", "1", "1"]]


def test_cli_errors_exit_2(tmp_path):
    missing = subprocess.run([sys.executable, str(REPO / "sweeps" / "monitor.py"), str(tmp_path), "--once"],
                             capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and "sweep.db: not found" in " ".join(missing.stderr.split())  # rich wraps
    with SweepState(sweep_db_path(tmp_path)) as state:
        state.add_runs(_records(tmp_path))
    bad = subprocess.run([sys.executable, str(REPO / "sweeps" / "monitor.py"), str(tmp_path), "--once",
                          "--filter", "batch=2"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "not varied in this sweep" in " ".join(bad.stderr.split())


# --- a real local sweep: failure, retries, a killed monitor, two monitors at once ------------------------------


@pytest.mark.slow
def test_local_sweep_monitor_killed_and_restarted(tmp_path, retry_grid, launch_sweep):
    grid, bad = retry_grid(tmp_path, {"cluster": "local", "array_parallelism": 2})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    sweep_dir = launch_sweep(grid, tmp_path, env)
    bad.unlink()  # the run on this datalist now fails at start with a DataError: not retried
    monitor_command = [sys.executable, str(REPO / "sweeps" / "monitor.py"), str(sweep_dir), "--interval", "1"]
    logs = [tmp_path / f"monitor{i}.log" for i in range(3)]

    def start_monitor(log: Path) -> subprocess.Popen:
        with open(log, "w") as handle:
            return subprocess.Popen(monitor_command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env)

    first = start_monitor(logs[0])
    state = SweepState(sweep_db_path(sweep_dir))
    deadline = time.time() + 600
    while not any(r.state in (RunState.RETRYING, RunState.COMPLETED) for r in state.runs()):
        assert first.poll() is None, logs[0].read_text()
        assert time.time() < deadline, [(r.run_id, r.state) for r in state.runs()]
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)  # killed mid-sweep, at any point of a poll
    first.wait()
    monitors = [start_monitor(log) for log in logs[1:]]  # two at once
    codes = [m.wait(timeout=900) for m in monitors]
    runs = {r.run_id: r for r in state.runs()}
    bad_id = next(run_id for run_id in runs if "bad" in run_id)
    assert codes == [1, 1], [log.read_text()[-2000:] for log in logs]  # not every run completed: exit 1
    assert runs.pop(bad_id).state == RunState.FAILED
    assert all(r.state == RunState.COMPLETED and r.attempts == 1 for r in runs.values())
    attempts = state.attempts(bad_id)
    assert len(attempts) == 1 and "bad.json" in (attempts[0].error_tail or "")
    reason = state.get_run(bad_id).reason
    assert reason.startswith("DataError: ") and "bad.json" in reason and "not retried" in reason
    # Nothing was submitted twice: the jobs submitit's folder holds (one submitted pickle each) are the attempts.
    submitted = {p.name.removesuffix("_submitted.pkl") for p in (sweep_dir / "jobs").glob("*/*_submitted.pkl")}
    assert submitted == {a.job_id for a in state.attempts()} and len(submitted) == 3
    for run_id in runs:
        assert verify_collected(sweep_dir, run_id)
    import pandas as pd

    results = pd.read_csv(sweep_dir / "results.csv").set_index("run_id")
    assert results.loc[bad_id, "state"] == "FAILED" and results["dice_mean"].notna().sum() == 2
    state.close()


# --- reused job ids -----------------------------------------------------------------------------------------

# `sacct -X -n -P --duplicates -o JobID,State,NodeList,ElapsedRaw,ExitCode,Start,End,Reason,Submit` lines captured
# on the dev cluster (job 4: requeued once, then completed; array 1: three tasks completed). The reuse is built
# from them: after a controller reset a new job 4 and a new array 1 were submitted at 07:00, and sacct answers
# for the old jobs and the new ones together (resetting the shared dev cluster's controller to capture it live
# would have killed other engineers' jobs).
SACCT_REUSED = """\
1_0|COMPLETED|localhost|1|0:0|2026-12-02T05:50:36|2026-12-02T05:50:37|None|2026-12-02T05:50:35
1_1|COMPLETED|localhost|1|0:0|2026-12-02T05:50:36|2026-12-02T05:50:37|None|2026-12-02T05:50:35
4|REQUEUED|localhost|49|0:0|2026-12-02T05:50:41|2026-12-02T05:51:30|None|2026-12-02T05:50:40
4|COMPLETED|localhost|12|0:0|2026-12-02T05:51:41|2026-12-02T05:51:53|BeginTime|2026-12-02T05:51:30
4|RUNNING|localhost|30|0:0|2026-12-02T07:00:02|Unknown|None|2026-12-02T07:00:00
1_[0-1]|PENDING|None assigned|0|0:0|Unknown|Unknown|Priority|2026-12-02T07:00:01
"""


def _at(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()  # sacct prints local time, as parse_sacct reads it


def _controller_holds_all(job_ids, timeout_s):
    """The controller's answer after the reset: the new sweep's jobs, submitted since, are all pending there (the
    live squeue must not be asked about these recorded ids)."""
    from brats_ugrip.slurm.squeue import ControllerJob

    return {job_id: ControllerJob("PENDING", "Priority") for job_id in job_ids}


def test_sacct_records_of_an_older_job_with_the_same_id_are_ignored():
    from brats_ugrip.slurm.sacct import records_since
    from brats_ugrip.sweeps.job_states import SlurmJobStates

    records = parse_sacct(SACCT_REUSED)
    assert [r.state for r in records["1_0"]] == ["COMPLETED", "PENDING"]  # the new pending tasks are not lost
    assert records["4"][0].submit == _at("2026-12-02T05:50:40")
    ours = _at("2026-12-02T06:59:59")  # noted just before sbatch
    assert [r.state for r in records_since(records["4"], ours)] == ["RUNNING"]
    assert records_since(records["4"], None) == records["4"]
    source = SlurmJobStates(query=lambda ids, timeout: parse_sacct(SACCT_REUSED), controller=_controller_holds_all)
    statuses = source.statuses({"4": Path("a"), "1_0": Path("b"), "1_1": Path("c")},
                               {"4": ours, "1_0": ours, "1_1": ours})
    assert statuses["4"].state == "RUNNING" and statuses["4"].requeues == 0
    assert statuses["4"].started_at == _at("2026-12-02T07:00:02")
    assert statuses["1_0"].state == statuses["1_1"].state == "PENDING"
    # Without our submit times, the old job 4's requeue would be counted as this job's.
    assert source.statuses({"4": Path("a")})["4"].requeues == 1


def test_monitor_does_not_take_an_old_job_for_a_new_one(tmp_path):
    """The issue's case: after a controller reset, runs still PENDING were marked COMPLETED with the old jobs'
    times. With submit times recorded, the old records are ignored and the runs stay SUBMITTED."""
    from brats_ugrip.sweeps.job_states import SlurmJobStates

    old_only = "\n".join(line for line in SACCT_REUSED.splitlines() if "07:00" not in line) + "\n"
    with SweepState(sweep_db_path(tmp_path)) as state:
        records = _records(tmp_path, lrs=(0.001,), folds=(0, 1), cluster="slurm")
        state.add_runs(records)
        state.record_submission(records[0].run_id, "4", submitted_at=_at("2026-12-02T06:59:59"))
        state.record_submission(records[1].run_id, "1_1", submitted_at=_at("2026-12-02T06:59:59"))
        assert state.latest_attempt(records[1].run_id).array_task_id == 1
    monitor = SweepMonitor(tmp_path, sources=[SlurmJobStates(query=lambda ids, timeout: parse_sacct(old_only),
                                                             controller=_controller_holds_all)])
    try:
        monitor.poll()
        assert {r.state for r in monitor.state.runs()} == {RunState.SUBMITTED}
        assert all(a.ended_at is None for a in monitor.state.attempts())
    finally:
        monitor.close()
