"""Successive halving in a sweep (sweeps/monitoring/promotion.py): the grid's schedule, pauses at rungs, promotions in
sweep.db, --resume-paused, a monitor killed mid-promotion, the report. Driven by the scripted scheduler of
tests/test_monitor.py; expected promotions worked out by hand from ASHA's rule (top ⌊n/eta⌋ of those at a rung,
at least one once the rung is closed; a configuration scored on the mean of its folds)."""
from __future__ import annotations

import json
import time

import pytest
from test_grid import _error, _grid
from test_monitor import ScriptedScheduler, _write_checkpoint, _write_result

from brats_ugrip.sweeps.grid import ParameterManager
from brats_ugrip.sweeps.halving import HalvingSchedule
from brats_ugrip.sweeps.jobs import SubmitSpec, jobs_folder
from brats_ugrip.sweeps.layout import run_dir_path, sweep_db_path
from brats_ugrip.sweeps.monitoring.engine import MonitorError, SweepMonitor, resume_paused
from brats_ugrip.sweeps.monitoring.promotion import halving_report, set_schedule
from brats_ugrip.sweeps.state import RunRecord, RunState, SweepState

SCHEDULE = HalvingSchedule(metric="val/dice_mean", min_epochs=1, eta=3, max_epochs=9)  # rungs 1, 3, 9
LRS = (0.1, 0.2, 0.3)


# --- the grid's schedule ------------------------------------------------------------------------------------


def test_schedule_sets_max_epochs_and_is_validated(fold_datalist):
    manager = ParameterManager(_grid(fold_datalist, schedule={"kind": "asha", "min_epochs": 2, "eta": 3, "max_epochs": 18}))
    assert manager.schedule.rungs == [2, 6, 18]
    assert {run.config.trainer.max_epochs for run in manager.runs()} == {18}
    assert _error(_grid(fold_datalist, schedule={"kind": "hyperband"})).key_path == "schedule.kind"
    assert _error(_grid(fold_datalist, schedule={"kind": "asha", "etaa": 3})).key_path == "schedule.etaa"
    assert _error(_grid(fold_datalist, schedule={"kind": "asha", "eta": 1})).key_path == "schedule.eta"
    assert _error(_grid(fold_datalist, schedule={"kind": "asha", "metric": "loss"})).key_path == "schedule.metric"
    # val_every 2: rung 3 (1 × 3) would have no validation score
    bad = _grid(fold_datalist, schedule={"kind": "asha", "min_epochs": 1, "eta": 3, "max_epochs": 9})
    bad["base"]["trainer"]["val_every"] = 2
    error = _error(bad)
    assert error.key_path == "schedule.min_epochs" and "val_every" in str(error)
    varied = _grid(fold_datalist, schedule={"kind": "asha"})
    varied["grid"]["trainer.max_epochs"] = [5, 10]
    assert _error(varied).key_path == "schedule.max_epochs"


# --- a scripted sweep ---------------------------------------------------------------------------------------


@pytest.fixture
def asha(tmp_path):
    """3 configurations (lr) × 2 folds, rungs 1, 3, 9 (eta 3), all submitted to stop at epoch 1."""
    scheduler = ScriptedScheduler()
    with SweepState(sweep_db_path(tmp_path)) as state:
        records = []
        for fold in (0, 1):
            for lr in LRS:
                run_id = f"fold={fold}-lr={lr}"
                run_dir = run_dir_path(tmp_path, run_id)
                records.append(RunRecord(
                    run_id=run_id, run_dir=str(run_dir), params={"optim.lr": lr, "data.fold": fold},
                    config={"data": {"fold": fold}, "optim": {"lr": lr}, "trainer": {"max_epochs": 9},
                            "run_dir": str(run_dir)},
                    submit={"cluster": "local", "parameters": {}, "stop_at_epoch": 1}, max_retries=1))
        state.add_runs(records)
        state.set_meta("name", "asha")
        set_schedule(state, SCHEDULE)
        scheduler.submit(state, records, SubmitSpec("local"), jobs_folder(tmp_path))
    monitor = SweepMonitor(tmp_path, sources=[scheduler], submit=scheduler.submit)
    yield type("Asha", (), {"dir": tmp_path, "scheduler": scheduler, "monitor": monitor})
    monitor.close()


def _stop(asha, run_id: str, epochs: int, score: float, status: str = "paused") -> None:
    """The run's latest job ends as training does at a rung: best.ckpt, result, progress file, COMPLETED."""
    state = asha.monitor.state
    job_id = state.latest_attempt(run_id).job_id
    run_dir = run_dir_path(asha.dir, run_id)
    _write_checkpoint(run_dir, dice=score)
    latest = {"mean": score}
    _write_result(asha.dir, run_id, job_id, {"status": "success", "result": {
        "status": status, "epochs": epochs, "latest_val_metrics": latest, "val_metrics": latest,
        "best_val_dice": score}})
    (run_dir / "progress.json").write_text(json.dumps({"status": status, "epoch": epochs, "epoch_seconds": 36.0,
                                                       "val_metrics": latest}))
    asha.scheduler.set(job_id, "COMPLETED", started_at=time.time() - 60, ended_at=time.time())


def _rows(asha, table: str) -> list[tuple]:
    return [tuple(r) for r in asha.monitor.state._db.execute(f"SELECT * FROM {table}").fetchall()]


def _run(asha, run_id: str) -> RunRecord:
    return asha.monitor.state.get_run(run_id)


def test_promotion_waits_for_no_straggler_and_judges_the_mean_of_folds(asha):
    # lr=0.2 has the best single fold (0.9) but the worse mean (0.6 < lr=0.3's 0.75)
    for run_id, score in {"fold=0-lr=0.2": 0.9, "fold=1-lr=0.2": 0.3, "fold=0-lr=0.3": 0.8,
                          "fold=1-lr=0.3": 0.7}.items():
        _stop(asha, run_id, 1, score)
    before = len(asha.scheduler.submissions)
    report = asha.monitor.poll()
    # 2 configurations at rung 1: ⌊2/3⌋ = 0 promoted, and lr=0.1 still trains towards it (rung open)
    assert _rows(asha, "promotions") == [] and report.resubmitted == {}
    assert {r.run_id for r in asha.monitor.state.runs([RunState.PAUSED])} == {"fold=0-lr=0.2", "fold=1-lr=0.2",
                                                                             "fold=0-lr=0.3", "fold=1-lr=0.3"}
    assert len(_rows(asha, "rung_scores")) == 4
    _stop(asha, "fold=0-lr=0.1", 1, 0.5)  # the third configuration reports with one fold: ⌊3/3⌋ = 1
    report = asha.monitor.poll()
    assert [(config, rung) for config, rung, *_ in _rows(asha, "promotions")] == [('{"optim.lr": 0.3}', 0)]
    assert set(report.resubmitted) == {"fold=0-lr=0.3", "fold=1-lr=0.3"}  # every fold of it goes on
    assert len(asha.scheduler.submissions) == before + 2
    for run_id in report.resubmitted:
        run = _run(asha, run_id)
        assert run.state == RunState.RETRYING and run.submit["stop_at_epoch"] == 3 and "promoted" in run.reason
    assert _run(asha, "fold=0-lr=0.2").state == RunState.PAUSED  # paused, not failed
    assert (asha.dir / "models" / "fold=0-lr=0.2.ckpt").is_file()  # a paused run is a soup ingredient
    assert asha.monitor.poll().resubmitted == {}  # nothing twice


def test_a_closed_rung_promotes_at_least_one_and_the_last_rung_completes(asha):
    scores = {0.1: 0.5, 0.2: 0.6, 0.3: 0.7}
    for fold in (0, 1):
        for lr, score in scores.items():
            _stop(asha, f"fold={fold}-lr={lr}", 1, score)
    asha.monitor.poll()  # lr=0.3 to epoch 3
    for fold in (0, 1):
        _stop(asha, f"fold={fold}-lr=0.3", 3, 0.8)
    report = asha.monitor.poll()
    # rung 3 holds 1 configuration: ⌊1/3⌋ = 0, but nothing else can reach it (closed), so it goes on to 9
    assert set(report.resubmitted) == {"fold=0-lr=0.3", "fold=1-lr=0.3"}
    assert _run(asha, "fold=0-lr=0.3").submit["stop_at_epoch"] == 9
    for fold in (0, 1):
        _stop(asha, f"fold={fold}-lr=0.3", 9, 0.85, status="completed")
    asha.monitor.poll()
    states = {r.run_id: r.state for r in asha.monitor.state.runs()}
    assert states == {**{f"fold={f}-lr={lr}": RunState.PAUSED for f in (0, 1) for lr in (0.1, 0.2)},
                      "fold=0-lr=0.3": RunState.COMPLETED, "fold=1-lr=0.3": RunState.COMPLETED}
    assert sorted(row[1] for row in _rows(asha, "rung_scores") if row[0] == "fold=0-lr=0.3") == [0, 1, 2]
    report = halving_report(asha.monitor.state)
    assert report.configs[0].config == '{"optim.lr": 0.3}' and report.configs[0].rung_epochs == 9
    assert report.configs[0].promoted_from == [1, 3]
    # GPU-hours: 36 s per epoch, 1 GPU: 4 runs × 1 epoch + 2 runs × 9 epochs = 22 epochs; the grid 6 × 9 = 54
    assert report.gpu_hours == pytest.approx(22 * 36 / 3600)
    assert report.full_grid_gpu_hours == pytest.approx(54 * 36 / 3600)
    assert "41%" in report.lines()[0]


class Killed(BaseException):
    """The monitor process dies (not an error it handles)."""


def test_a_monitor_killed_after_recording_a_promotion_neither_loses_nor_repeats_it(asha):
    for fold in (0, 1):
        for lr, score in {0.1: 0.5, 0.2: 0.6, 0.3: 0.7}.items():
            _stop(asha, f"fold={fold}-lr={lr}", 1, score)
    submit = asha.scheduler.submit

    def dies_before_sbatch(*args, **kwargs):
        raise Killed

    asha.monitor.submit = dies_before_sbatch
    with pytest.raises(Killed):
        asha.monitor.poll()
    assert len(_rows(asha, "promotions")) == 1  # recorded, its runs still PAUSED with their next stop
    assert _run(asha, "fold=0-lr=0.3").state == RunState.PAUSED
    before = len(asha.scheduler.submissions)
    restarted = SweepMonitor(asha.dir, sources=[asha.scheduler], submit=submit)
    second = SweepMonitor(asha.dir, sources=[asha.scheduler], submit=submit)
    try:
        assert set(restarted.poll().resubmitted) == {"fold=0-lr=0.3", "fold=1-lr=0.3"}
        assert second.poll().resubmitted == {}
    finally:
        restarted.close()
        second.close()
    assert len(asha.scheduler.submissions) == before + 2 and len(_rows(asha, "promotions")) == 1


def test_resume_paused_continues_chosen_runs_to_max_epochs(asha):
    for fold in (0, 1):
        for lr, score in {0.1: 0.5, 0.2: 0.6, 0.3: 0.7}.items():
            _stop(asha, f"fold={fold}-lr={lr}", 1, score)
    asha.monitor.poll()
    with pytest.raises(MonitorError, match="not PAUSED"):
        resume_paused(asha.monitor, ["fold=0-lr=0.3"])  # promoted, already running
    assert set(resume_paused(asha.monitor, ["fold=0-lr=0.1"])) == {"fold=0-lr=0.1"}
    run = _run(asha, "fold=0-lr=0.1")
    assert run.state == RunState.RETRYING and run.submit["stop_at_epoch"] is None and "resume-paused" in run.reason
    assert set(resume_paused(asha.monitor, ["all"])) == {"fold=1-lr=0.1", "fold=0-lr=0.2", "fold=1-lr=0.2"}
    assert asha.monitor.state.runs([RunState.PAUSED]) == []


def test_a_plain_sweep_has_no_halving(tmp_path):
    with SweepState(sweep_db_path(tmp_path)) as state:
        assert halving_report(state) is None


# --- promote: predicted -------------------------------------------------------------------------------------


def test_promote_is_validated_and_plain_by_default(fold_datalist):
    assert ParameterManager(_grid(fold_datalist, schedule={"kind": "asha"})).schedule.promote == "score"
    manager = ParameterManager(_grid(fold_datalist, schedule={"kind": "asha", "promote": "predicted"}))
    assert manager.schedule.promote == "predicted" and manager.schedule.to_dict()["promote"] == "predicted"
    error = _error(_grid(fold_datalist, schedule={"kind": "asha", "promote": "extrapolated"}))
    assert error.key_path == "schedule.promote" and str(error).startswith("grid.yaml: schedule.promote: ")
    assert "score, predicted" in str(error) and "'extrapolated'" in str(error)


PREDICTED = HalvingSchedule(metric="val/dice_mean", min_epochs=3, eta=2, max_epochs=12, promote="predicted")
# At rung 3 (eta 2: ⌊4/2⌋ = 2 go on): fast and steady lead on the score reached (0.70, 0.69); slow follows the
# pow3 law 0.9 − 0.7/t (0.200, 0.550, 0.667; 0.842 at epoch 12: the best end); flat stays at 0.40.
CURVES = {0.1: [0.70, 0.70, 0.70], 0.2: [0.69, 0.69, 0.69], 0.3: [0.9 - 0.7 / t for t in (1, 2, 3)],
          0.4: [0.40, 0.40, 0.40]}


@pytest.fixture
def predicted_sweep(tmp_path):
    """4 configurations (lr) × 1 fold, rungs 3, 6, 12, ``promote: predicted``; each run paused at epoch 3 with
    its validation curve in progress.json."""
    scheduler = ScriptedScheduler()
    with SweepState(sweep_db_path(tmp_path)) as state:
        records = [RunRecord(run_id=f"lr={lr}", run_dir=str(run_dir_path(tmp_path, f"lr={lr}")),
                             params={"optim.lr": lr, "data.fold": 0},
                             config={"data": {"fold": 0}, "optim": {"lr": lr}, "trainer": {"max_epochs": 12}},
                             submit={"cluster": "local", "parameters": {}, "stop_at_epoch": 3}, max_retries=1)
                   for lr in CURVES]
        state.add_runs(records)
        set_schedule(state, PREDICTED)
        scheduler.submit(state, records, SubmitSpec("local"), jobs_folder(tmp_path))
    monitor = SweepMonitor(tmp_path, sources=[scheduler], submit=scheduler.submit)
    sweep = type("Sweep", (), {"dir": tmp_path, "scheduler": scheduler, "monitor": monitor})
    for lr, curve in CURVES.items():
        _stop(sweep, f"lr={lr}", 3, curve[-1])
        progress = run_dir_path(tmp_path, f"lr={lr}") / "progress.json"
        written = json.loads(progress.read_text())
        written["val_curve"] = [[epoch, {"mean": value}] for epoch, value in zip((1, 2, 3), curve)]
        progress.write_text(json.dumps(written))
    yield sweep
    monitor.close()


def test_the_predicted_rule_promotes_the_late_bloomer_and_the_summary_shows_predictions(predicted_sweep):
    from io import StringIO

    from rich.console import Console

    from brats_ugrip.sweeps.monitor import print_halving

    report = predicted_sweep.monitor.poll()
    assert any(note.startswith('promoted {"optim.lr": 0.1} from epoch 3 (score 0.7000, predicted 0.7000 at epoch 12)')
               for note in report.notes), report.notes
    promoted = {config for config, *_ in _rows(predicted_sweep, "promotions")}
    assert promoted == {'{"optim.lr": 0.1}', '{"optim.lr": 0.3}'}  # the leader and the late bloomer, not lr=0.2
    assert set(report.resubmitted) == {"lr=0.1", "lr=0.3"}
    assert _run(predicted_sweep, "lr=0.3").submit["stop_at_epoch"] == 6
    predictions = {row[0]: row for row in _rows(predicted_sweep, "predictions")}
    assert len(predictions) == 4 and all(row[1] == 0 and row[4] == 3 for row in predictions.values())
    assert predictions['{"optim.lr": 0.1}'][2] == pytest.approx(0.70)  # flat: its level
    assert predictions['{"optim.lr": 0.3}'][2] > 0.70  # rising: above the flat leader
    assert predicted_sweep.monitor.poll().resubmitted == {}  # nothing twice; the same predictions again
    assert {row[0]: row[2] for row in _rows(predicted_sweep, "predictions")} == {k: v[2] for k, v in
                                                                                predictions.items()}
    halving = halving_report(predicted_sweep.monitor.state)
    assert {c.config: c.predicted for c in halving.configs}['{"optim.lr": 0.1}'] == {3: pytest.approx(0.70)}
    assert "predicted at max_epochs" in halving.lines()[0]
    out = StringIO()
    print_halving(halving, Console(file=out, width=250))
    text = out.getvalue()
    assert "predicted at 12" in text and "3: 0.7000" in text and "3: 0.4000" in text
