"""The sweep-wide cap (grid key ``max_running``, sweeps/throttle.py): the launcher submits up to the cap, the
monitor releases the rest in grid order as runs end, across job arrays."""
from __future__ import annotations

import time

import pytest
import yaml
from test_monitor import ScriptedScheduler, _records, _write_checkpoint, _write_result

from brats_ugrip.errors import ConfigError
from brats_ugrip.sweeps import launch
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.monitoring.engine import SweepMonitor
from brats_ugrip.sweeps.state import RunState, SweepState
from brats_ugrip.sweeps.throttle import check_cap, get_cap, set_cap


def test_cap_must_be_a_positive_integer():
    assert check_cap(None) is None and check_cap(3) == 3
    for bad in (0, -1, 2.5, "4", True):
        with pytest.raises(ConfigError, match="max_running: expected a positive integer"):
            check_cap(bad)


def _finish(sweep_dir, scheduler, state, run_id):
    job_id = state.latest_attempt(run_id).job_id
    _write_checkpoint(sweep_dir / "runs" / run_id, "best.ckpt")
    _write_checkpoint(sweep_dir / "runs" / run_id, "last.ckpt")
    _write_result(sweep_dir, run_id, job_id, {"status": "success", "result": {"status": "completed", "epochs": 4}})
    scheduler.set(job_id, "COMPLETED", started_at=time.time() - 5, ended_at=time.time())


def test_monitor_releases_pending_runs_up_to_the_cap_in_grid_order(tmp_path):
    scheduler = ScriptedScheduler()
    records = _records(tmp_path, lrs=(0.001, 0.003, 0.01), folds=(0, 1))  # 6 runs, two "arrays" of 3
    for record in records[3:]:
        record.submit = {"cluster": "local", "parameters": {"cpus_per_task": 2}}
    with SweepState(sweep_db_path(tmp_path)) as state:
        state.add_runs(records)
        set_cap(state, 2)
    monitor = SweepMonitor(tmp_path, sources=[scheduler], submit=scheduler.submit)
    try:
        report = monitor.poll()
        order = [r.run_id for r in records]
        assert list(report.resubmitted) == order[:2]  # the first two of the grid, nothing more
        state = monitor.state
        assert state.counts() == {RunState.SUBMITTED: 2, RunState.PENDING: 4}
        assert monitor.poll().resubmitted == {}  # still 2 in flight: nothing released
        _finish(tmp_path, scheduler, state, order[0])
        report = monitor.poll()
        assert list(report.resubmitted) == [order[2]] and state.get_run(order[0]).state == RunState.COMPLETED
        for run_id in order[1:3]:
            _finish(tmp_path, scheduler, state, run_id)
        report = monitor.poll()
        assert list(report.resubmitted) == order[3:5]  # across the second array too: the cap is the sweep's
        assert sum(state.counts().get(s, 0) for s in RunState.active()) == 2
        assert all(state.get_run(r).state == RunState.SUBMITTED for r in order[3:5])  # first attempts, not retries
        assert [s[0] for s in scheduler.submissions] == order[:5]  # each submitted once
    finally:
        monitor.close()


def test_launch_submits_up_to_the_cap_and_records_it(tmp_path, monkeypatch, phantom_dir, tiny_run_base):
    from brats_ugrip.data import make_datalist, save_datalist

    datalist = tmp_path / "datalist.json"
    save_datalist(make_datalist(phantom_dir, n_folds=2, seed=0), datalist)
    submitted = []

    def fake_submit_runs(state, runs, spec, folder, resubmission=False):
        for run in runs:
            submitted.append(run.run_id)
            state.record_submission(run.run_id, f"{len(submitted)}", log_path=None)
        return {run.run_id: None for run in runs}

    monkeypatch.setattr(launch, "submit_runs", fake_submit_runs)
    grid = {"name": "capped", "base": tiny_run_base(datalist), "grid": {"optim.lr": [0.001, 0.003, 0.01, 0.03]},
            "max_running": 3,
            "executor": {"cluster": "local"}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    plan = launch.plan_launch(path, tmp_path / "sweep")
    assert plan.max_running == 3
    launch.submit_plan(plan)
    assert submitted == ["lr=0.001", "lr=0.003", "lr=0.01"]
    with SweepState(sweep_db_path(tmp_path / "sweep")) as state:
        assert get_cap(state) == 3 and state.get_run("lr=0.03").state == RunState.PENDING
    bad = {**grid, "max_running": 0}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="max_running"):
        launch.plan_launch(path, tmp_path / "sweep2")
