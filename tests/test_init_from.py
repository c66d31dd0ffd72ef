"""Two-stage sweeps: a fine-tuning grid's finetune.init_from names a run of a base sweep, resolved and checked
before anything is submitted (sweeps/init_from.py through the ParameterManager)."""
from __future__ import annotations

import json

import pytest

from brats_ugrip.errors import ConfigError
from brats_ugrip.sweeps.grid import ParameterManager
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.monitoring.collect import sha256_file
from brats_ugrip.sweeps.state import RunRecord, RunState, SweepState


@pytest.fixture
def base_sweep(tmp_path):
    """A base sweep with one completed, collected run ``lr=0.003`` and one still running ``lr=0.01``."""
    sweep = tmp_path / "base"
    (sweep / "models").mkdir(parents=True)
    with SweepState(sweep_db_path(sweep)) as state:
        for run_id in ("lr=0.003", "lr=0.01"):
            state.add_runs([RunRecord(run_id, {"optim": {"lr": 0.003}}, {}, str(sweep / "runs" / run_id))])
        state.update_run("lr=0.003", state=RunState.COMPLETED)
        state.update_run("lr=0.01", state=RunState.RUNNING)
    checkpoint = sweep / "models" / "lr=0.003.ckpt"
    checkpoint.write_bytes(b"weights of the base run")  # never unpickled by the resolver
    (sweep / "models" / "lr=0.003.json").write_text(json.dumps({"sha256": sha256_file(checkpoint)}))
    return sweep


def _finetune_grid(fold_datalist, init_from):
    return {"name": "ft", "base": {"data": {"datalist": fold_datalist, "roi_size": [32, 32, 32]},
                                   "model": {"name": "segresnet", "init_filters": 8}},
            "set": {"finetune.init_from": init_from},
            "grid": {"optim.lr": [0.001, 0.0003], "finetune.reset_last": [0, 1],
                     "data.augment_intensity": [0.05, 0.2]},
            "zip": [{"finetune.freeze.all_but_last": [None, 4]}], "seeds": [0, 1]}


def test_finetuning_grid_resolves_init_from_a_run_of_the_base_sweep(fold_datalist, base_sweep):
    runs = ParameterManager(_finetune_grid(fold_datalist, {"sweep": str(base_sweep), "run": "lr=0.003"})).runs()
    assert len(runs) == 2 * 2 * 2 * 2 * 2
    expected = str((base_sweep / "models" / "lr=0.003.ckpt").resolve())
    assert {r.config.finetune.init_from for r in runs} == {expected}
    assert {r.config.data.augment_intensity for r in runs} == {0.05, 0.2}
    assert {r.config.finetune.freeze.all_but_last for r in runs} == {None, 4}
    # The collected checkpoint's path works the same way.
    by_path = ParameterManager(_finetune_grid(fold_datalist, str(base_sweep / "models" / "lr=0.003.ckpt"))).runs()
    assert by_path[0].config.finetune.init_from == expected


@pytest.mark.parametrize("reference, message", [
    ({"sweep": "nowhere", "run": "lr=0.003"}, "not a sweep directory"),
    ({"sweep": "BASE", "run": "lr=1"}, "has no run 'lr=1'"),
    ({"sweep": "BASE", "run": "lr=0.01"}, "is RUNNING, not COMPLETED"),
    ({"sweep": "BASE", "run": "lr=0.003", "epoch": 3}, "expected a checkpoint path or"),
    ("missing.ckpt", "not found"),
])
def test_bad_references_fail_before_submission_naming_the_key(fold_datalist, base_sweep, reference, message):
    if isinstance(reference, dict) and reference["sweep"] == "BASE":
        reference = {**reference, "sweep": str(base_sweep)}
    with pytest.raises(ConfigError, match=message) as error:
        ParameterManager(_finetune_grid(fold_datalist, reference)).runs()
    assert error.value.key_path == "finetune.init_from"


def test_a_changed_collected_checkpoint_is_refused(fold_datalist, base_sweep):
    (base_sweep / "models" / "lr=0.003.ckpt").write_bytes(b"something else")
    with pytest.raises(ConfigError, match="does not match the SHA-256"):
        ParameterManager(_finetune_grid(fold_datalist, {"sweep": str(base_sweep), "run": "lr=0.003"})).runs()
