"""The sweep monitor on the real single-node SLURM dev cluster: a run that fails is retried, then FAILED, while
the others complete; the monitor is killed mid-sweep and two are restarted at once; nothing is submitted twice.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from brats_ugrip.data import make_datalist, save_datalist
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.monitoring.collect import verify_collected
from brats_ugrip.sweeps.state import RunState, SweepState

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as handle:  # a file, not a pipe: nothing blocks on unread output
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def test_data_error_fails_at_once_while_others_complete(slurm_cluster, slurm_job_dir: Path, retry_grid,
                                                             launch_sweep):
    grid, bad = retry_grid(slurm_job_dir, {"cluster": "slurm", "partition": "debug", "time": 20, "cpus_per_task": 1,
                                           "signal_delay_s": 30})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    sweep_dir = launch_sweep(grid, slurm_job_dir, env)
    bad.unlink()  # the run on this datalist now fails at start with a DataError, which a retry cannot fix
    state = SweepState(sweep_db_path(sweep_dir))
    first_jobs = {a.run_id: a.job_id for a in state.attempts()}
    assert len({job_id.split("_")[0] for job_id in first_jobs.values()}) == 1  # one array, one sbatch

    monitor = [sys.executable, str(REPO / "sweeps" / "monitor.py"), str(sweep_dir), "--interval", "2"]
    logs = [slurm_job_dir / f"monitor{i}.log" for i in range(3)]
    first = _start(monitor, logs[0], env)
    deadline = time.time() + 600
    while not any(r.state in (RunState.RETRYING, RunState.RUNNING) for r in state.runs()):
        assert first.poll() is None, logs[0].read_text()
        assert time.time() < deadline, [(r.run_id, r.state) for r in state.runs()]
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    restarted = [_start(monitor, log, env) for log in logs[1:]]
    codes = [process.wait(timeout=900) for process in restarted]
    assert codes == [1, 1], [log.read_text()[-3000:] for log in logs]  # not every run completed

    runs = {r.run_id: r for r in state.runs()}
    bad_id = next(run_id for run_id in runs if "bad" in run_id)
    failed = runs.pop(bad_id)
    assert failed.state == RunState.FAILED and failed.reason.startswith("DataError: ") and "not retried" in failed.reason
    attempts = state.attempts(bad_id)  # failed at once: retries are for node failures, OOM, preemption, timeouts
    assert [a.attempt for a in attempts] == [1] and attempts[0].job_id == first_jobs[bad_id]
    for attempt in attempts:  # sacct agrees, and the log's error tail names the missing datalist
        assert slurm_cluster.state(attempt.job_id) == "FAILED" == attempt.state
        assert "bad.json" in attempt.error_tail and attempt.node == "localhost"
    for run_id, run in runs.items():
        assert run.state == RunState.COMPLETED and run.attempts == 1
        assert slurm_cluster.state(first_jobs[run_id]) == "COMPLETED"
        assert verify_collected(sweep_dir, run_id)
    # Nothing submitted twice: the jobs submitit's folder holds (one submitted pickle each) are the recorded attempts.
    submitted = {p.name.removesuffix("_submitted.pkl") for p in (sweep_dir / "jobs").glob("*/*_submitted.pkl")}
    assert submitted == {a.job_id for a in state.attempts()}
    results = pd.read_csv(sweep_dir / "results.csv").set_index("run_id")
    assert results.loc[bad_id, "state"] == "FAILED" and results["dice_mean"].notna().sum() == 2
    state.close()


def test_cancel_and_retry_with_scancel_and_sbatch(slurm_cluster, slurm_job_dir: Path, phantom_dir, launch_sweep):
    datalist = slurm_job_dir / "datalist.json"
    save_datalist(make_datalist(phantom_dir, n_folds=2, seed=0), datalist)
    grid = {
        "name": "monitor_cancel",
        "base": {"data": {"datalist": str(datalist), "roi_size": [32, 32, 32], "batch_size": 1, "num_workers": 0},
                 "model": {"name": "segresnet", "init_filters": 8}, "trainer": {"max_epochs": 1000,
                                                                               "accelerator": "cpu"},
                 "logging": {"mode": "disabled"}},
        "grid": {"optim.lr": [0.001]},
        "executor": {"cluster": "slurm", "partition": "debug", "time": 20, "cpus_per_task": 1},
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    sweep_dir = launch_sweep(grid, slurm_job_dir, env)
    monitor = [sys.executable, str(REPO / "sweeps" / "monitor.py"), str(sweep_dir)]
    state = SweepState(sweep_db_path(sweep_dir))
    first = state.latest_attempt("lr=0.001").job_id

    def run_monitor(*args: str) -> str:
        answer = subprocess.run([*monitor, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert answer.returncode == 0, answer.stdout + answer.stderr
        return answer.stdout

    assert "cancelled 1 runs: lr=0.001" in run_monitor("--cancel", "all")
    assert slurm_cluster.wait_for_state(first, {"CANCELLED"}, timeout_s=60) == "CANCELLED"
    assert state.get_run("lr=0.001").state == RunState.CANCELLED
    assert "resubmitted as job" in run_monitor("--retry", "lr=0.001")
    second = state.latest_attempt("lr=0.001").job_id
    assert second != first and state.get_run("lr=0.001").state == RunState.RETRYING
    assert slurm_cluster.wait_for_state(second, {"PENDING", "RUNNING"}, timeout_s=60)
    assert json.loads(run_monitor("--json"))["runs"][0]["job_id"] == second
    run_monitor("--cancel", "lr=0.001")
    assert slurm_cluster.wait_for_state(second, {"CANCELLED"}, timeout_s=60) == "CANCELLED"
    assert [a.state for a in state.attempts("lr=0.001")] == ["CANCELLED", "CANCELLED"]
    state.close()
