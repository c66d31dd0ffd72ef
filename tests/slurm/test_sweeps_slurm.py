"""Sweeps on the real single-node SLURM dev cluster: one array per resource request, timeout → requeue → resume,
preemption → requeue → resume, two tasks training one run (DDP), a failing run, scancel, a partition SLURM refuses.

Each run trains a tiny SegResNet on 48³ phantoms for a few epochs (CPU), so every test takes a minute or a few.
"""
from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from brats_ugrip.checkpoints import checkpoint_meta, load_checkpoint
from brats_ugrip.data import Datalist
from brats_ugrip.heldout import HeldOutSet, checkpoint_settings
from brats_ugrip.sweeps import launch
from brats_ugrip.sweeps.jobs import SubmissionError, read_job_info
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.monitoring.engine import follow
from brats_ugrip.sweeps.state import RunState, SweepState
from brats_ugrip.training import read_progress

pytestmark = pytest.mark.slow
WAIT_S = 900  # generous: CI machines have 2 cores shared by every job of the array


def _launch(grid: Path, sweep_dir: Path):
    plan = launch.plan_launch(grid, sweep_dir)
    return plan, launch.submit_plan(plan)


def _wait(sweep_dir: Path, jobs, timeout_s: float = WAIT_S) -> dict[str, RunState]:
    """Follow the sweep as the launcher's monitor does (the users' code path), until every run has ended."""
    return follow(sweep_dir, poll_s=1.0, timeout_s=timeout_s)



def test_grid_is_one_array_and_completes(slurm_cluster, make_grid, slurm_job_dir, slurm_calls):
    grid = make_grid("array", {"optim.lr": [0.001, 0.003, 0.01]}, executor={"array_parallelism": 3})
    sweep = slurm_job_dir / "sweep"
    plan, jobs = _launch(grid, sweep)
    assert len(slurm_calls.submissions()) == 1
    array_ids = {job.job_id.split("_")[0] for job in jobs.values()}
    assert len(array_ids) == 1 and sorted(j.job_id.split("_")[1] for j in jobs.values()) == ["0", "1", "2"]

    final = _wait(sweep, jobs)
    assert set(final.values()) == {RunState.COMPLETED}, final
    with SweepState(sweep_db_path(sweep)) as state:
        for run in state.runs():
            assert run.state == RunState.COMPLETED and run.attempts == 1
            assert Path(run.best_checkpoint).is_file() and Path(run.last_checkpoint).is_file()
            assert 0 <= run.metrics["best_val_dice"] <= 1 and run.metrics["epochs"] == 2
            attempt = state.latest_attempt(run.run_id)
            assert attempt.state == "COMPLETED" and attempt.node == "localhost"
            # sacct's Start and End have whole seconds; the submission time is ours, to the microsecond.
            assert attempt.ended_at >= attempt.started_at >= int(attempt.submitted_at)
            assert slurm_cluster.wait_until_final(attempt.job_id) == "COMPLETED"
            assert slurm_cluster.history(attempt.job_id) == ["COMPLETED"]
            run_dir = Path(run.run_dir)
            assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == run.params["optim.lr"]
            assert read_progress(run_dir)["status"] == "completed"
            assert (run_dir / "logs" / f"{attempt.job_id}.err").resolve() == Path(attempt.log_path)

    # Launching the same grid again submits nothing: every run is finished.
    again, jobs = _launch(grid, sweep)
    assert jobs == {} and len(slurm_calls.submissions()) == 1


def test_timeout_requeues_and_resumes_without_restarting_epochs(slurm_cluster, make_grid, slurm_job_dir):
    """The run hits its time limit: SLURM signals USR2, submitit checkpoints and requeues, the job starts again
    and resumes from last.ckpt.

    To hit the limit at a known point on machines of any speed, the job starts with 10 minutes and, once it has
    saved an epoch, its limit is lowered to what it has used plus 1–2 minutes: with ``--signal=USR2@90`` SLURM
    then signals at its next time-limit check (every 30 s). Once the job is requeued, the limit goes back up so
    that the rest of the run finishes. The number of epochs is sized from this machine's speed so that the run
    is still training when the signal comes, whatever the machine.
    """
    # ~150 s of training after the first epoch: the signal comes within ~60 s, with room for a calibration
    # measured while the machine was busier than during the run.
    sweep, jobs, run_dir, max_epochs = _start_sized_run(
        slurm_cluster, make_grid, slurm_job_dir, "timeout", seconds_after_first_epoch=150, min_epochs=6,
        executor={"signal_delay_s": 90, "max_num_timeout": 4})
    (job,) = jobs.values()
    limit_min = _elapsed_seconds(job.job_id) // 60 + 2  # 60–120 s left: ≤ the 90 s delay + the 30 s check period
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", f"TimeLimit={limit_min}"], check=True)
    deadline = time.monotonic() + WAIT_S
    while "REQUEUED" not in slurm_cluster.history(job.job_id):
        assert time.monotonic() < deadline, slurm_cluster.history(job.job_id)
        assert slurm_cluster.state(job.job_id) != "COMPLETED", f"the run ended before its limit ({max_epochs} epochs)"
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "TimeLimit=10"], check=True)

    final = _wait(sweep, jobs)
    assert final == {"lr=0.003": RunState.COMPLETED}
    assert slurm_cluster.wait_until_final(job.job_id) == "COMPLETED"
    history = slurm_cluster.history(job.job_id)
    assert history[0] == "REQUEUED" and history[-1] == "COMPLETED", history
    _assert_resumed_within_one_attempt(sweep, run_dir, job.job_id, max_epochs, "timed-out")


def test_preempted_run_is_requeued_and_resumes(slurm_cluster, make_grid, slurm_job_dir):
    """A job in the ``urgent`` partition needs the whole node: SLURM preempts the run (``PreemptMode=REQUEUE``,
    ``GraceTime=30``), sends it USR2 at once (``preempt_send_user_signal``), submitit checkpoints and requeues it,
    and once the urgent job is done the run resumes from last.ckpt within the same attempt."""
    # time 20: submitit calls a signal a timeout, not a preemption, once the job ran min(80 %, limit - 10 min).
    sweep, jobs, run_dir, max_epochs = _start_sized_run(
        slurm_cluster, make_grid, slurm_job_dir, "preempt", seconds_after_first_epoch=60, min_epochs=5,
        executor={"time": 20})
    (job,) = jobs.values()
    urgent = subprocess.run(["sbatch", "--parsable", "--partition=urgent", "--exclusive", "--time=5",
                             f"--output={slurm_job_dir / 'urgent.out'}", "--wrap", "sleep 2"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert slurm_cluster.wait_until_final(urgent, timeout_s=300) == "COMPLETED"
    assert slurm_cluster.history(job.job_id)[0] in ("REQUEUED", "PREEMPTED"), slurm_cluster.history(job.job_id)

    final = _wait(sweep, jobs)
    assert final == {"lr=0.003": RunState.COMPLETED}
    assert slurm_cluster.wait_until_final(job.job_id) == "COMPLETED"
    _assert_resumed_within_one_attempt(sweep, run_dir, job.job_id, max_epochs, "preempted")


def test_two_tasks_train_one_run_together(slurm_cluster, make_grid, slurm_job_dir):
    """``executor.tasks_per_node: 2`` (no GPUs): one job of two tasks that train the run together (DDP over gloo,
    as GPUs would over NCCL); the checkpoint's validation covers the whole fold, not one task's share."""
    grid = make_grid("ddp", {"optim.lr": [0.003]}, executor={"tasks_per_node": 2}, trainer={"val_every": 1})
    sweep = slurm_job_dir / "sweep"
    _, jobs = _launch(grid, sweep)
    (job,) = jobs.values()
    assert _wait(sweep, jobs) == {"lr=0.003": RunState.COMPLETED}
    assert slurm_cluster.wait_until_final(job.job_id) == "COMPLETED"
    run_dir = Path(launch.plan_launch(grid, sweep).runs[0].run_dir)
    assert "Starting with 2 processes" in (run_dir / "logs" / f"{job.job_id}.err").read_text()
    assert len(read_job_info(run_dir)["starts"]) == 1  # one record per job start, written by rank 0
    meta = checkpoint_meta(load_checkpoint(run_dir / "checkpoints" / "best.ckpt"))
    held_out = HeldOutSet.from_fold(Datalist.load(slurm_job_dir / "datalist.json"), 0)
    assert meta["val_fingerprint"] == held_out.fingerprint(checkpoint_settings(meta))
    progress = read_progress(run_dir)
    assert progress["status"] == "completed" and progress["epoch"] == 2


def _start_sized_run(slurm_cluster, make_grid, slurm_job_dir: Path, name: str, seconds_after_first_epoch: float,
                     min_epochs: int, executor: dict) -> tuple[Path, dict, Path, int]:
    """Launch a one-run sweep sized from this machine's speed to train ``seconds_after_first_epoch`` after its
    first epoch, and wait for its first last.ckpt (not progress.json's epoch count: that is written just before
    the checkpoint). Returns ``(sweep_dir, jobs, run_dir, max_epochs)``."""
    calibration = make_grid("calibration", {"optim.lr": [0.003]}, trainer={"max_epochs": 2, "val_every": 2})
    epoch_s = _epoch_seconds(calibration, slurm_job_dir / "calibration")
    max_epochs = min(150, max(min_epochs, math.ceil(2 + seconds_after_first_epoch / epoch_s)))
    grid = make_grid(name, {"optim.lr": [0.003]}, executor=executor,
                     trainer={"max_epochs": max_epochs, "val_every": max_epochs})
    sweep = slurm_job_dir / "sweep"
    _, jobs = _launch(grid, sweep)
    (job,) = jobs.values()
    run_dir = Path(launch.plan_launch(grid, sweep).runs[0].run_dir)
    deadline = time.monotonic() + WAIT_S
    while not (run_dir / "checkpoints" / "last.ckpt").is_file():
        assert time.monotonic() < deadline and slurm_cluster.state(job.job_id) in (None, "PENDING", "RUNNING")
        time.sleep(0.5)
    return sweep, jobs, run_dir, max_epochs


def _assert_resumed_within_one_attempt(sweep: Path, run_dir: Path, job_id: str, max_epochs: int, case: str) -> None:
    """The job (submitit's word for why it was signalled: ``case``) started again, resumed from last.ckpt, never
    from epoch 0, and finished every epoch within the run's one attempt."""
    starts = read_job_info(run_dir)["starts"]
    assert len(starts) >= 2 and all(s["job_id"] == job_id for s in starts)
    epochs = [s["start_epoch"] for s in starts]
    assert epochs[0] == 0 and epochs[1] >= 1 and epochs == sorted(epochs), epochs
    log = (run_dir / "logs" / f"{job_id}.err").read_text()
    assert f"this job is {case}" in log and "Restoring states from the checkpoint path at" in log
    progress = read_progress(run_dir)
    assert progress["status"] == "completed" and progress["epoch"] == max_epochs
    with SweepState(sweep_db_path(sweep)) as state:
        run = state.get_run("lr=0.003")
        assert run.state == RunState.COMPLETED and run.attempts == 1 and run.metrics["epochs"] == max_epochs


def _epoch_seconds(grid: Path, run_dir: Path) -> float:
    """Seconds per training epoch of the grid's run on this machine (its second epoch: the first fills caches)."""
    from brats_ugrip.sweeps.grid import ParameterManager
    from brats_ugrip.training import train

    train(ParameterManager.from_file(grid).runs()[0].config, run_dir)
    return max(0.1, read_progress(run_dir)["epoch_seconds"])


def _elapsed_seconds(job_id: str) -> int:
    """How long a running job has run, from sacct (``ElapsedRaw``)."""
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "ElapsedRaw"], capture_output=True,
                         text=True, check=True).stdout.split()
    return int(out[-1])


def test_failing_run_is_failed_with_its_error_and_others_complete(slurm_cluster, make_grid, slurm_job_dir):
    corrupt = slurm_job_dir / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    grid = make_grid("fail", {"finetune.init_from": [None, str(corrupt)]})
    sweep = slurm_job_dir / "sweep"
    _, jobs = _launch(grid, sweep)
    final = _wait(sweep, jobs)
    assert final == {"init_from=none": RunState.COMPLETED, "init_from=corrupt": RunState.FAILED}
    with SweepState(sweep_db_path(sweep)) as state:
        failed = state.get_run("init_from=corrupt")
        assert failed.reason.startswith("FAILED (attempt ") and failed.reason.endswith("no retries left (2)")
        attempt = state.latest_attempt(failed.run_id)
        assert attempt.state == "FAILED" and "CheckpointError" in attempt.error_tail and str(corrupt) in attempt.error_tail
        assert slurm_cluster.wait_until_final(attempt.job_id) == "FAILED"


def test_scancel_marks_runs_cancelled(slurm_cluster, make_grid, slurm_job_dir):
    grid = make_grid("cancel", {"optim.lr": [0.001, 0.01]}, trainer={"max_epochs": 50})
    sweep = slurm_job_dir / "sweep"
    _, jobs = _launch(grid, sweep)
    array_id = next(iter(jobs.values())).job_id.split("_")[0]
    slurm_cluster.wait_for_state(f"{array_id}_0", {"RUNNING"}, timeout_s=120)
    subprocess.run(["scancel", array_id], check=True)
    final = _wait(sweep, jobs, timeout_s=180)
    assert set(final.values()) == {RunState.CANCELLED}
    with SweepState(sweep_db_path(sweep)) as state:
        assert {a.state for a in state.attempts()} == {"CANCELLED"}
        assert all(r.ended_at is not None for r in state.runs())
    assert {slurm_cluster.wait_until_final(job.job_id) for job in jobs.values()} == {"CANCELLED"}
    # cancelled runs are finished: launching again does not resubmit them
    assert _launch(grid, sweep)[1] == {}


def test_partition_slurm_refuses_submits_nothing(slurm_cluster, make_grid, slurm_job_dir, slurm_calls):
    grid = make_grid("bad_partition", {"optim.lr": [0.001, 0.01]}, executor={"partition": "no_such_partition"})
    sweep = slurm_job_dir / "sweep"
    with pytest.raises(SubmissionError, match="(?i)invalid partition"):
        _launch(grid, sweep)
    with SweepState(sweep_db_path(sweep)) as state:
        assert {r.state for r in state.runs()} == {RunState.PENDING} and state.attempts() == []

    # Two arrays, the second refused: checked first with sbatch --test-only, so neither is submitted.
    refused = len(slurm_calls.submissions())  # the refused sbatch call above
    two = make_grid("two_arrays", {"optim.lr": [0.001], "executor.partition": ["debug", "no_such_partition"]})
    sweep_two = slurm_job_dir / "sweep_two"
    with pytest.raises(SubmissionError, match="(?i)invalid partition"):
        _launch(two, sweep_two)
    assert len(slurm_calls.submissions()) == refused and "--test-only" in slurm_calls.path.read_text()
    with SweepState(sweep_db_path(sweep_two)) as state:
        assert state.attempts() == [] and len(state.runs()) == 2

    # The grid fixed, the same sweep directory: the PENDING runs are submitted with the new partition.
    fixed = make_grid("bad_partition", {"optim.lr": [0.001, 0.01]}, executor={"partition": "long"})
    plan = launch.plan_launch(fixed, sweep)
    assert len(plan.to_submit) == 2
    jobs = launch.submit_plan(plan)
    assert len(jobs) == 2 and len(slurm_calls.submissions()) == refused + 1
    with SweepState(sweep_db_path(sweep)) as state:
        assert {r.submit["parameters"]["partition"] for r in state.runs()} == {"long"}
        assert {r.state for r in state.runs()} == {RunState.SUBMITTED}
    subprocess.run(["scancel", next(iter(jobs.values())).job_id.split("_")[0]], check=True)
