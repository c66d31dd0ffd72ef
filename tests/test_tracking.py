"""Experiment tracking around a sweep: what the launcher hands W&B, syncing offline runs (``wandb sync`` is not
reachable here: the command it would run and the bookkeeping are checked), and the sweep report (its numbers
against ``results.csv``), on a ``sweep.db`` and run directories written by hand: no training."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from brats_ugrip.config import load_config
from brats_ugrip.errors import ConfigError
from brats_ugrip.sweeps import monitor as monitor_cli
from brats_ugrip.sweeps import wandb_sync
from brats_ugrip.sweeps.run_ids import param_tags
from brats_ugrip.sweeps.state import RunRecord, RunState, SweepState, run_dir_path, sweep_db_path
from brats_ugrip.sweeps.wandb_sync import SYNCED_FILE, read_synced, sync_sweep

WANDB = "/opt/bin/wandb"


# --- what runs hand W&B ------------------------------------------------------------------------------------


def test_tags_are_the_varied_key_values_within_wandbs_limit():
    tags = param_tags({"optim.lr": 0.001, "data.fold": 0, "data.roi_size": [64, 64, 64],
                       "data.datalist": "/very/long/" + "x" * 80 + ".json"})
    assert tags[:3] == ["optim.lr=0.001", "data.fold=0", "data.roi_size=64x64x64"]
    assert len(tags[3]) == 64 and tags[3].startswith("data.datalist=xxx")  # W&B refuses tags over 64 characters


def test_logging_keys_are_validated_with_their_path():
    base = {"data": {"datalist": "d.json"}}
    config = load_config(base=base, overrides={"logging.group": "ssa", "logging.tags": ["optim.lr=0.001"],
                                               "logging.varied": ["optim.lr"]})
    assert config.logging.mode == "offline"  # every run, on SLURM too, unless a grid or config says online
    assert config.logging.group == "ssa" and config.logging.tags == ["optim.lr=0.001"]
    for override, key in (({"logging.tags": ["x" * 65]}, "logging.tags[0]"), ({"logging.tags": "a"}, "logging.tags"),
                          ({"logging.group": ""}, "logging.group"),
                          ({"logging.varied": ["optim."]}, "logging.varied[0]"),
                          ({"logging.entity": "me"}, "logging.entity")):
        with pytest.raises(ConfigError) as error:
            load_config(base=base, overrides=override)
        assert error.value.key_path == key


# --- syncing offline runs ----------------------------------------------------------------------------------


def _segment(run_dir: Path, started: str, wandb_id: str, data: bytes = b"records") -> Path:
    """An attempt's offline W&B folder, as wandb names it: offline-run-<start time>-<id>/run-<id>.wandb."""
    folder = run_dir / "wandb" / f"offline-run-{started}-{wandb_id}"
    folder.mkdir(parents=True)
    (folder / f"run-{wandb_id}.wandb").write_bytes(data)
    return folder


def _add_runs(sweep_dir: Path, states: dict[str, RunState]) -> None:
    with SweepState(sweep_db_path(sweep_dir)) as state:
        records = [RunRecord(run_id=run_id, config={"data": {"fold": 0}}, params={"optim.lr": float(i)},
                             run_dir=str(run_dir_path(sweep_dir, run_id)), state=run_state)
                   for i, (run_id, run_state) in enumerate(states.items())]
        state.add_runs(records)


class Recorder:
    """A ``wandb sync`` stand-in: records each command and answers ``status``."""

    def __init__(self, status: int = 0):
        self.commands: list[list[str]] = []
        self.status = status

    def __call__(self, command: list[str]) -> int:
        self.commands.append(command)
        return self.status


def test_sync_sends_each_offline_segment_once(tmp_path):
    _add_runs(tmp_path, {"a": RunState.COMPLETED, "b": RunState.RUNNING, "c": RunState.FAILED, "d": RunState.COMPLETED})
    a1 = _segment(run_dir_path(tmp_path, "a"), "20260101_100000", "ida")
    a2 = _segment(run_dir_path(tmp_path, "a"), "20260101_120000", "ida")  # resumed after a requeue
    b1 = _segment(run_dir_path(tmp_path, "b"), "20260101_100000", "idb")
    b2 = _segment(run_dir_path(tmp_path, "b"), "20260102_080000", "idb")  # the running attempt's
    c1 = _segment(run_dir_path(tmp_path, "c"), "20260101_100000", "idc")
    # d logged nothing to W&B (logging.mode: disabled)

    runner = Recorder()
    report = sync_sweep(tmp_path, runner=runner, executable=WANDB)
    # One command per run, its segments oldest first; the running attempt's segment waits.
    assert runner.commands == [[WANDB, "sync", "--include-synced", str(a1), str(a2)],
                               [WANDB, "sync", "--include-synced", str(b1)],
                               [WANDB, "sync", "--include-synced", str(c1)]]
    assert report.waiting == ["runs/b/wandb/offline-run-20260102_080000-idb"] and not report.failed
    synced = json.loads((tmp_path / SYNCED_FILE).read_text())["segments"]
    assert sorted(synced) == ["runs/a/wandb/offline-run-20260101_100000-ida",
                              "runs/a/wandb/offline-run-20260101_120000-ida",
                              "runs/b/wandb/offline-run-20260101_100000-idb",
                              "runs/c/wandb/offline-run-20260101_100000-idc"]
    record = synced["runs/a/wandb/offline-run-20260101_120000-ida"]
    assert record["run_id"] == "a" and record["wandb_id"] == "ida" and record["size"] == len(b"records")
    assert not list(tmp_path.glob(f".{SYNCED_FILE}.*"))  # written atomically: no temporary file left

    runner = Recorder()
    again = sync_sweep(tmp_path, runner=runner, executable=WANDB)
    assert runner.commands == [] and again.up_to_date == 4 and again.synced == {}

    # Run a is resumed once more, b finishes, c's old segment was appended to: only the new data goes.
    a3 = _segment(run_dir_path(tmp_path, "a"), "20260103_090000", "ida")
    with SweepState(sweep_db_path(tmp_path)) as state:
        state.update_run("b", state=RunState.COMPLETED)
    log = c1 / "run-idc.wandb"
    log.write_bytes(b"records and more")
    runner = Recorder()
    sync_sweep(tmp_path, runner=runner, executable=WANDB)
    assert runner.commands == [[WANDB, "sync", "--include-synced", str(a3)],
                               [WANDB, "sync", "--include-synced", str(b2)],
                               [WANDB, "sync", "--include-synced", str(c1)]]
    assert read_synced(tmp_path)["runs/c/wandb/offline-run-20260101_100000-idc"]["size"] == len(b"records and more")


def test_a_failed_sync_records_nothing_and_is_tried_again(tmp_path):
    _add_runs(tmp_path, {"a": RunState.COMPLETED, "b": RunState.COMPLETED})
    a1 = _segment(run_dir_path(tmp_path, "a"), "20260101_100000", "ida")
    b1 = _segment(run_dir_path(tmp_path, "b"), "20260101_100000", "idb")
    failing = Recorder(status=1)
    report = sync_sweep(tmp_path, runner=failing, executable=WANDB)
    assert len(failing.commands) == 2 and set(report.failed) == {"a", "b"} and read_synced(tmp_path) == {}
    runner = Recorder()
    sync_sweep(tmp_path, runner=runner, executable=WANDB)
    assert runner.commands == [[WANDB, "sync", "--include-synced", str(a1)],
                               [WANDB, "sync", "--include-synced", str(b1)]]


def test_monitor_sync_flag(tmp_path, monkeypatch, capsys):
    _add_runs(tmp_path, {"a": RunState.COMPLETED})
    a1 = _segment(run_dir_path(tmp_path, "a"), "20260101_100000", "ida")
    runner = Recorder()
    monkeypatch.setattr(wandb_sync, "run_command", runner)
    assert monitor_cli.main([str(tmp_path), "--sync"]) == 0
    assert runner.commands == [[wandb_sync.wandb_command(), "sync", "--include-synced", str(a1)]]
    assert "1 offline segments of 1 runs sent" in capsys.readouterr().out
    assert monitor_cli.main([str(tmp_path), "--sync"]) == 0 and len(runner.commands) == 1
    runner.status = 1
    os.utime(a1 / "run-ida.wandb", ns=(1, 1))  # changed since it was sent: sent again, and this time it fails
    assert monitor_cli.main([str(tmp_path), "--sync"]) == 1
