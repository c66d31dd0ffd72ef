"""A sweep with the local executor (no SLURM), end to end; local slots; relaunching adds only new runs."""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from brats_ugrip.data import make_datalist, save_datalist
from brats_ugrip.sweeps import launch
from brats_ugrip.sweeps.jobs import local_slot, read_job_info
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.monitoring.engine import follow
from brats_ugrip.sweeps.state import RunState, SweepState
from brats_ugrip.training import read_progress


def _grid(tmp_path: Path, phantom_dir: Path, lrs: list[float]) -> Path:
    datalist = tmp_path / "datalist.json"
    if not datalist.exists():
        save_datalist(make_datalist(phantom_dir, 3, 0), datalist)
    grid = {
        "name": "local_demo",
        "base": {
            "data": {"datalist": str(datalist), "roi_size": [32, 32, 32], "batch_size": 1,
                     "cache_dir": str(tmp_path / "cache")},
            "model": {"name": "segresnet", "init_filters": 8},
            "trainer": {"max_epochs": 2, "accelerator": "cpu", "limit_train_batches": 2, "limit_val_batches": 1,
                        "cudnn_benchmark": False},
            "inference": {"sw_batch_size": 1, "overlap": 0.0},
            "logging": {"mode": "disabled"},
        },
        "grid": {"optim.lr": lrs, "data.fold": [0]},
        "executor": {"cluster": "local", "array_parallelism": 1, "time": 20},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


@pytest.mark.slow
def test_local_sweep_end_to_end(tmp_path, phantom_dir):
    grid = _grid(tmp_path, phantom_dir, [0.001, 0.01])
    sweep = tmp_path / "sweep"
    plan = launch.plan_launch(grid, sweep)
    jobs = launch.submit_plan(plan)
    assert sorted(jobs) == ["fold=0-lr=0.001", "fold=0-lr=0.01"]
    with SweepState(sweep_db_path(sweep)) as state:
        assert {r.state for r in state.runs()} == {RunState.SUBMITTED}
        final = follow(sweep, poll_s=0.5, timeout_s=600)  # what the launcher's monitor does, without a screen
        assert set(final.values()) == {RunState.COMPLETED}, final
        spans = []
        for run in state.runs():
            run_dir = Path(run.run_dir)
            assert run.attempts == 1 and run.metrics["status"] == "completed" and run.metrics["epochs"] == 2
            assert Path(run.best_checkpoint) == run_dir / "checkpoints" / "best.ckpt"
            assert Path(run.best_checkpoint).is_file() and Path(run.last_checkpoint).is_file()
            attempt = state.latest_attempt(run.run_id)
            assert attempt.state == "COMPLETED" and attempt.started_at is not None and attempt.ended_at is not None
            info = read_job_info(run_dir)
            assert info["job_id"] == attempt.job_id and info["cluster"] == "local" and info["start_epoch"] == 0
            progress = read_progress(run_dir)
            assert progress["status"] == "completed" and progress["epoch"] == 2
            assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == run.params["optim.lr"]
            spans.append((info["started_at"], datetime.fromisoformat(progress["finished_at"]).timestamp()))
        # array_parallelism: 1 → one run trains at a time (the other waits for the slot)
        (start_a, end_a), (start_b, end_b) = sorted(spans)
        assert start_b >= end_a - 1.0

    # The same grid again: nothing new. One more learning rate: only that run is new.
    assert launch.plan_launch(grid, sweep).to_submit == []
    assert launch.submit_plan(launch.plan_launch(grid, sweep)) == {}
    bigger = launch.plan_launch(_grid(tmp_path, phantom_dir, [0.001, 0.01, 0.003]), sweep)
    assert [r.run_id for r in bigger.to_submit] == ["fold=0-lr=0.003"]


def test_local_slots_let_one_holder_at_a_time(tmp_path):
    events: list[str] = []

    def second() -> None:
        with local_slot(tmp_path, 1, poll_s=0.05):
            events.append("second in")

    with local_slot(tmp_path, 1) as index:
        assert index == 0
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        events.append("first out")
    thread.join(timeout=5)
    assert events == ["first out", "second in"]
    with local_slot(tmp_path, 2) as a, local_slot(tmp_path, 2) as b:
        assert {a, b} == {0, 1}


def test_dry_run_reads_sweep_states_and_runs_get_their_dir(tmp_path, phantom_dir, capsys):
    """A dry run on an existing sweep shows its states; each run config names its run directory and its W&B name,
    group and tags."""
    grid = _grid(tmp_path, phantom_dir, [0.001])
    sweep = tmp_path / "sweep"
    plan = launch.plan_launch(grid, sweep)
    with SweepState(sweep_db_path(sweep)) as state:
        state.add_runs(plan.runs)
        state.record_submission(plan.runs[0].run_id, "4242")
    assert launch.main([str(grid), "--sweep-dir", str(sweep), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "SUBMITTED" in out and "nothing to submit" in out
    record = json.loads(json.dumps(plan.runs[0].config))
    assert record["run_dir"] == str((sweep / "runs" / "fold=0-lr=0.001").resolve())
    # W&B: name = run id, group = sweep, tags = the varied key=value, and which keys were varied.
    assert record["logging"] == {"project": "brats-ugrip", "run_name": "fold=0-lr=0.001", "mode": "disabled",
                                 "group": "local_demo", "job_type": None, "tags": ["optim.lr=0.001", "data.fold=0"],
                                 "varied": ["optim.lr", "data.fold"]}
