"""Successive halving on the real single-node SLURM dev cluster: 3 configurations × 1 fold, rungs 1 and 3
(eta 3). The monitor is killed (SIGKILL) once a run has paused and restarted; the sweep still ends with exactly
one promotion, two PAUSED runs, the promoted one resumed from its checkpoint, no epoch trained twice and no job
submitted twice; --resume-paused then continues a paused run from its checkpoint through sbatch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_halving_sweep import asha_grid, check_halving, check_resumed, monitor_cli

from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.state import RunState, SweepState

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_halving_on_slurm_with_a_monitor_restart(slurm_cluster, slurm_job_dir: Path, phantom_dir, tiny_run_base,
                                                 launch_sweep):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    executor = {"cluster": "slurm", "partition": "debug", "time": 20, "cpus_per_task": 1}
    sweep_dir = launch_sweep(asha_grid(slurm_job_dir, phantom_dir, tiny_run_base, executor), slurm_job_dir, env)
    log = slurm_job_dir / "monitor0.log"
    with open(log, "w") as handle:
        first = subprocess.Popen([sys.executable, str(REPO / "sweeps" / "monitor.py"), str(sweep_dir), "--interval",
                                  "2"], stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    state = SweepState(sweep_db_path(sweep_dir))
    deadline = time.time() + 600
    while not any(r.state == RunState.PAUSED for r in state.runs()):  # mid-sweep: a rung reached, more to come
        assert first.poll() is None, log.read_text()
        assert time.time() < deadline, [(r.run_id, r.state) for r in state.runs()]
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    state.close()
    restarted = monitor_cli(sweep_dir, env, "--interval", "2")
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]  # all completed or paused
    winner, paused = check_halving(sweep_dir)
    with SweepState(sweep_db_path(sweep_dir)) as state:
        for attempt in state.attempts(winner):
            assert slurm_cluster.state(attempt.job_id) == "COMPLETED"
    answer = monitor_cli(sweep_dir, env, "--resume-paused", paused[0])
    assert answer.returncode == 0 and "continues to max_epochs" in answer.stdout, answer.stderr
    assert monitor_cli(sweep_dir, env, "--interval", "2").returncode == 0
    check_resumed(sweep_dir, paused[0])
