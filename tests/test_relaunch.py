"""Relaunch safety: a relaunch whose grid changes existing runs' resolved configs refuses and names the changed
keys, unless told to add them as new runs (--new-runs) or to replace them (--force)."""
from __future__ import annotations

import pytest
import yaml

from brats_ugrip.data import make_datalist, save_datalist
from brats_ugrip.errors import BratsUgripError
from brats_ugrip.sweeps import launch
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.state import RunState, SweepState


def _grid(tmp_path, datalist, max_epochs: int):
    grid = {"name": "relaunch", "base": {"data": {"datalist": str(datalist), "roi_size": [32, 32, 32]},
                                         "model": {"name": "segresnet", "init_filters": 8},
                                         "trainer": {"max_epochs": max_epochs, "accelerator": "cpu"},
                                         "logging": {"mode": "disabled"}},
            "grid": {"optim.lr": [0.001, 0.01]}, "executor": {"cluster": "local"}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_changed_base_refuses_naming_keys_then_new_runs_or_force(tmp_path, phantom_dir):
    datalist = tmp_path / "datalist.json"
    save_datalist(make_datalist(phantom_dir, 3, 0), datalist)
    sweep = tmp_path / "sweep"
    first = launch.plan_launch(_grid(tmp_path, datalist, 4), sweep)
    with SweepState(sweep_db_path(sweep)) as state:  # as a first launch recorded them; one was submitted
        state.add_runs(first.runs)
        state.record_submission(first.runs[0].run_id, "123")
    changed = launch.plan_launch(_grid(tmp_path, datalist, 5), sweep)  # max_epochs 4 → 5 in the base
    assert changed.changed == {r.run_id: ["trainer.max_epochs"] for r in first.runs}
    with pytest.raises(BratsUgripError, match=r"changes the config of 2 runs(.|\n)*trainer\.max_epochs"):
        launch.resolve_changes(changed)
    with pytest.raises(BratsUgripError, match="queued or running; cancel them first"):
        launch.resolve_changes(changed, force=True)
    launch.resolve_changes(changed, new_runs=True)
    ids = [r.run_id for r in changed.runs]
    assert all(run_id.startswith(("lr=0.001-c", "lr=0.01-c")) for run_id in ids), ids
    assert [r.run_id for r in changed.to_submit] == ids  # new runs; the old ones are left as they are
    # --force on runs not queued: the config is replaced and the run is PENDING again.
    with SweepState(sweep_db_path(sweep)) as state:
        state.update_run(first.runs[0].run_id, state=RunState.FAILED)
        replanned = launch.plan_launch(_grid(tmp_path, datalist, 5), sweep)
        launch.resolve_changes(replanned, force=True)
        state.replace_config(replanned.runs[0])
        run = state.get_run(first.runs[0].run_id)
        assert run.state == RunState.PENDING and run.config["trainer"]["max_epochs"] == 5 and run.attempts == 1
    assert launch.plan_launch(_grid(tmp_path, datalist, 5), sweep).changed == {first.runs[1].run_id:
                                                                               ["trainer.max_epochs"]}
