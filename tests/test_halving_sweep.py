"""A successive-halving sweep end to end with the local executor and real (tiny) training: 3 configurations × 1
fold, rungs at epochs 1 and 3 (eta 3). Each run pauses at epoch 1; when the third reports, ⌊3/3⌋ = 1 configuration
is promoted and continues from its last.ckpt to epoch 3, the other two stay PAUSED with their checkpoints
collected; --resume-paused then takes one of them to epoch 3. No epoch is trained twice. The checks are shared
with the SLURM test (tests/slurm/test_halving_slurm.py)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from brats_ugrip.data import make_datalist, save_datalist
from brats_ugrip.sweeps.jobs import read_job_info
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.state import RunState, SweepState

REPO = Path(__file__).resolve().parents[1]


def asha_grid(directory: Path, phantom_dir: Path, base: dict, executor: dict) -> dict:
    datalist = directory / "datalist.json"
    save_datalist(make_datalist(phantom_dir, n_folds=2, seed=0), datalist)
    return {"name": f"asha_{executor['cluster']}", "base": base(datalist),
            "grid": {"optim.lr": [0.0003, 0.003, 0.03], "data.fold": [0]},
            "schedule": {"kind": "asha", "metric": "val/dice_mean", "min_epochs": 1, "eta": 3, "max_epochs": 3},
            "max_retries": 0, "executor": executor}


def trained_epochs(run_dir: str | Path) -> list[int]:
    """The epochs (1-based) with a validation row in the run's Lightning CSV log, in order, repeats kept."""
    with open(Path(run_dir) / "csv" / "metrics.csv") as handle:
        return [int(row["epoch"]) + 1 for row in csv.DictReader(handle) if row.get("val/dice_mean")]


def check_halving(sweep_dir: Path) -> tuple[str, list[str]]:
    """The state after the sweep ended: one configuration promoted and completed, two paused at epoch 1; returns
    (the completed run, the paused runs)."""
    with SweepState(sweep_db_path(sweep_dir)) as state:
        runs = {r.run_id: r for r in state.runs()}
        completed = [r for r in runs.values() if r.state == RunState.COMPLETED]
        paused = sorted(r.run_id for r in runs.values() if r.state == RunState.PAUSED)
        assert len(completed) == 1 and len(paused) == 2, {r.run_id: r.state for r in runs.values()}
        winner = completed[0]
        assert winner.metrics["epochs"] == 3 and winner.attempts == 2
        assert [s["start_epoch"] for s in read_job_info(winner.run_dir)["starts"]] == [0, 1]  # from last.ckpt
        assert trained_epochs(winner.run_dir) == [1, 2, 3]  # each epoch once
        # the curve promote: predicted extrapolates survives the pause: restored from last.ckpt on resume
        progress = json.loads((Path(winner.run_dir) / "progress.json").read_text())
        assert [epoch for epoch, _ in progress["val_curve"]] == [1, 2, 3]
        for run_id in paused:
            run = runs[run_id]
            assert run.metrics["status"] == "paused" and run.metrics["epochs"] == 1 and run.attempts == 1
            assert trained_epochs(run.run_dir) == [1]
            assert (sweep_dir / "models" / f"{run_id}.ckpt").is_file()  # a soup ingredient
        promotions = state._db.execute("SELECT config, rung FROM promotions").fetchall()
        assert [tuple(p) for p in promotions] == [(f'{{"optim.lr": {winner.params["optim.lr"]}}}', 0)]
        scores = {(r["run_id"], r["rung"]) for r in state._db.execute("SELECT run_id, rung FROM rung_scores")}
        assert scores == {*((run_id, 0) for run_id in runs), (winner.run_id, 1)}
        # Nothing submitted twice: submitit's submitted pickles are exactly the recorded attempts.
        submitted = {p.name.removesuffix("_submitted.pkl") for p in (sweep_dir / "jobs").glob("*/*_submitted.pkl")}
        assert submitted == {a.job_id for a in state.attempts()}
    return winner.run_id, paused


def check_resumed(sweep_dir: Path, run_id: str) -> None:
    with SweepState(sweep_db_path(sweep_dir)) as state:
        run = state.get_run(run_id)
        assert run.state == RunState.COMPLETED and run.metrics["epochs"] == 3 and run.attempts == 2
        assert [s["start_epoch"] for s in read_job_info(run.run_dir)["starts"]] == [0, 1]
        assert trained_epochs(run.run_dir) == [1, 2, 3]


def monitor_cli(sweep_dir: Path, env: dict, *args: str, timeout_s: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "sweeps" / "monitor.py"), str(sweep_dir), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.slow
def test_local_halving_sweep(tmp_path, phantom_dir, tiny_run_base, launch_sweep):
    from brats_ugrip.sweeps.monitoring.engine import follow

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    grid = asha_grid(tmp_path, phantom_dir, tiny_run_base, {"cluster": "local", "array_parallelism": 1, "time": 20})
    sweep_dir = launch_sweep(grid, tmp_path, env)
    follow(sweep_dir, poll_s=0.5, timeout_s=900)
    _, paused = check_halving(sweep_dir)
    answer = monitor_cli(sweep_dir, env, "--resume-paused", paused[0])
    assert answer.returncode == 0 and "continues to max_epochs" in answer.stdout, answer.stderr
    follow(sweep_dir, poll_s=0.5, timeout_s=900)
    check_resumed(sweep_dir, paused[0])
    summary = monitor_cli(sweep_dir, env, "--summary")
    assert summary.returncode == 0 and "promotions" in summary.stdout and "paused (1" in summary.stdout, summary
