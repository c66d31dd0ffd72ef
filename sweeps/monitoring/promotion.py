"""Successive halving in a running sweep, on the monitor's side: rung scores, promotions and paused runs in
``sweep.db``. The rules themselves are :mod:`brats_ugrip.sweeps.halving`'s; this module stores and applies them.

A grid with ``schedule: {kind: asha, ...}`` is launched with the schedule in ``sweep.db``'s meta table and every
run's ``submit["stop_at_epoch"]`` at the first rung; its job stops there cleanly (``train(stop_at_epoch=...)``,
result status "paused") and the monitor makes the run PAUSED. Then, once per poll, under the monitor's lock,
:func:`promote`:

1. records the score of every PAUSED or COMPLETED run at the rung it stopped at (``rung_scores``: the schedule's
   metric from the latest validation, at the rung's last epoch);
2. for each rung from the lowest, computes with :func:`~brats_ugrip.sweeps.halving.promotions` which
   configurations (a run's varied parameters but ``data.fold``) go on, and records each in ``promotions``;
   a rung is closed when every lower rung is and no run is queued, training or about to continue towards it;
3. returns the PAUSED runs of promoted configurations that sit at the rung they were promoted from, with their
   ``stop_at_epoch`` moved to the next rung, for the monitor's resubmission path (which announces its intent
   before ``sbatch``).

Steps 1–3 are one transaction, so a promotion and the new stop epoch of its runs are written together. Every
decision is derived from what ``sweep.db`` holds, never from memory: a monitor killed at any moment and restarted
finds a recorded promotion whose runs are still PAUSED and resubmits them (a promotion is never lost), and a
promotion recorded once is never recorded again (``promotions``' primary key; runs that were resubmitted are no
longer PAUSED, so nothing is submitted twice).

Tables (created on first use: an older ``sweep.db`` gains them when a monitor of this version opens it):

- ``rung_scores(run_id, rung, epochs, score, recorded_at)``: ``rung`` is the rung's index, ``epochs`` its epoch
  count, ``score`` NULL when the run had no validation there;
- ``promotions(config, rung, score, promoted_at)``: ``config`` is the JSON of the configuration's parameters;
- ``predictions(config, rung, predicted, last, points, method, recorded_at)``: with ``promote: predicted``, what
  each configuration at a rung was ranked on in the latest pass (the score predicted at ``max_epochs`` from the
  fold-mean of its runs' ``progress.json`` ``val_curve`` up to the rung; a run without one contributes its rung
  scores), so ``--summary`` shows why a configuration went on or stayed. Every input is cut at the rung's
  epoch, so a pass after a restart computes the same values.
"""
from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from brats_ugrip.sweeps.halving import HalvingSchedule, config_scores, predicted_ranking, predicted_scores, promotions
from brats_ugrip.sweeps.monitoring.snapshot import ProgressReader, _gpus
from brats_ugrip.sweeps.state import RunRecord, RunState, SweepState

SCHEDULE_META = "schedule"
FOLD_KEY = "data.fold"
STOP_KEY = "stop_at_epoch"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rung_scores (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    rung INTEGER NOT NULL,
    epochs INTEGER NOT NULL,
    score REAL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (run_id, rung)
);
CREATE TABLE IF NOT EXISTS promotions (
    config TEXT NOT NULL,
    rung INTEGER NOT NULL,
    score REAL,
    promoted_at REAL NOT NULL,
    PRIMARY KEY (config, rung)
);
CREATE TABLE IF NOT EXISTS predictions (
    config TEXT NOT NULL,
    rung INTEGER NOT NULL,
    predicted REAL,
    last REAL,
    points INTEGER NOT NULL,
    method TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (config, rung)
)
"""


def ensure_tables(state: SweepState) -> None:
    """Create the halving tables if this ``sweep.db`` has none yet (the migration of older files)."""
    with state.transaction() as db:
        for statement in filter(str.strip, _SCHEMA.split(";")):
            db.execute(statement)


def schedule_of(state: SweepState) -> HalvingSchedule | None:
    """The sweep's schedule (written by the launcher), or None for a plain grid."""
    raw = state.get_meta(SCHEDULE_META)
    return HalvingSchedule.from_dict(json.loads(raw)) if raw else None


def set_schedule(state: SweepState, schedule: HalvingSchedule | None) -> None:
    if schedule is not None:
        state.set_meta(SCHEDULE_META, json.dumps(schedule.to_dict(), sort_keys=True))
        ensure_tables(state)


def config_key(run: RunRecord) -> str:
    """A run's configuration: its varied parameters but the fold, as canonical JSON."""
    return json.dumps({k: v for k, v in run.params.items() if k != FOLD_KEY}, sort_keys=True, default=str)


def fold_of(run: RunRecord) -> Any:
    return run.params.get(FOLD_KEY, run.config.get("data", {}).get("fold"))


def stop_epoch(run: RunRecord) -> int:
    """Where the run's current or next attempt stops: its ``stop_at_epoch``, else ``trainer.max_epochs``."""
    stop = run.submit.get(STOP_KEY)
    return int(stop) if stop is not None else int(run.config.get("trainer", {}).get("max_epochs", 0))


def ended_paused(result: dict[str, Any] | None, run_dir: str) -> bool:
    """Whether an attempt that ended cleanly stopped at a rung: training's result (from the job's result file)
    says "paused" (or, without a readable result, the run's progress file does)."""
    if isinstance(result, dict):
        return result.get("status") == "paused"
    progress, _ = ProgressReader().read(run_dir)
    return bool(progress) and progress.get("status") == "paused"


def _position(run: RunRecord, metric: str, reader: ProgressReader) -> tuple[int, float | None] | None:
    """(epochs trained, the metric at the latest validation if it was at that epoch) of a stopped run."""
    name = metric.removeprefix("val/dice_")
    metrics = run.metrics
    if metrics.get("status") == "paused" and isinstance(metrics.get("epochs"), int):
        score = (metrics.get("latest_val_metrics") or {}).get(name)
        return metrics["epochs"], score if isinstance(score, (int, float)) else None
    progress, _ = reader.read(run.run_dir)
    if not progress or not isinstance(progress.get("epoch"), int):
        return None
    score = (progress.get("val_metrics") or {}).get(name)
    return progress["epoch"], score if isinstance(score, (int, float)) else None


def _record_scores(db: sqlite3.Connection, schedule: HalvingSchedule, runs: list[RunRecord], reader: ProgressReader,
                   notes: list[str]) -> dict[str, int]:
    """Record the rung score of each stopped run not recorded yet; returns the rung index each PAUSED run is at."""
    recorded = {(r["run_id"], r["rung"]) for r in db.execute("SELECT run_id, rung FROM rung_scores")}
    at_rung: dict[str, int] = {}
    for run in runs:
        if run.state not in (RunState.PAUSED, RunState.COMPLETED):
            continue
        position = _position(run, schedule.metric, reader)
        rung = schedule.rung_index(position[0]) if position else None
        if rung is None:
            if run.state == RunState.PAUSED:
                notes.append(f"{run.run_id}: paused at no rung of {schedule.rungs} ({position}); not judged")
            continue
        if run.state == RunState.PAUSED:
            at_rung[run.run_id] = rung
        if (run.run_id, rung) not in recorded:
            epochs, score = position
            if score is None:
                notes.append(f"{run.run_id}: no {schedule.metric} at epoch {epochs}; not judged at that rung")
            db.execute("INSERT OR IGNORE INTO rung_scores VALUES (?, ?, ?, ?, ?)",
                              (run.run_id, rung, epochs, score, time.time()))
    return at_rung


def promote(state: SweepState, notes: list[str]) -> list[tuple[RunRecord, str]]:
    """One promotion pass (see the module docstring); returns the runs to resubmit, each with its reason."""
    schedule = schedule_of(state)
    if schedule is None:
        return []
    ensure_tables(state)
    reader = ProgressReader()
    continuing: dict[str, int] = {}
    with state.transaction() as db:
        runs = state.runs()
        at_rung = _record_scores(db, schedule, runs, reader, notes)
        by_id = {run.run_id: run for run in runs}
        rows = db.execute("SELECT run_id, rung, score FROM rung_scores WHERE score IS NOT NULL").fetchall()
        promoted: dict[int, set[str]] = {}
        for row in db.execute("SELECT config, rung FROM promotions"):
            promoted.setdefault(row["rung"], set()).add(row["config"])
        in_flight = [stop_epoch(run) for run in runs if not run.state.is_final]
        lower_closed = True
        for k, rung in enumerate(schedule.rungs[:-1]):
            fold_scores = {(config_key(by_id[r["run_id"]]), fold_of(by_id[r["run_id"]])): r["score"]
                           for r in rows if r["rung"] == k and r["run_id"] in by_id}
            scores, predicted = _ranked_scores(db, schedule, k, fold_scores, runs, reader)
            reached = config_scores(fold_scores)
            closed = lower_closed and not any(stop <= rung for stop in [*in_flight, *continuing.values()])
            for config in promotions(scores, promoted.get(k, set()), schedule.eta, closed, reached):
                db.execute("INSERT OR IGNORE INTO promotions VALUES (?, ?, ?, ?)", (config, k, reached[config],
                                                                                   time.time()))
                promoted.setdefault(k, set()).add(config)
                guess = f", predicted {predicted[config]:.4f} at epoch {schedule.max_epochs}" if predicted else ""
                notes.append(f"promoted {config} from epoch {rung} (score {reached[config]:.4f}{guess})")
            for run_id, run_rung in at_rung.items():
                if run_rung == k and config_key(by_id[run_id]) in promoted.get(k, set()):
                    continuing[run_id] = schedule.rungs[k + 1]
                    state.update_run(run_id, submit={**by_id[run_id].submit, STOP_KEY: schedule.rungs[k + 1]})
            lower_closed = closed
    return [(state.get_run(run_id), f"promoted at epoch {schedule.rungs[at_rung[run_id]]}: continues from last.ckpt "
                                    f"to epoch {stop}") for run_id, stop in continuing.items()]


def fold_curve(run: RunRecord, metric: str, reader: ProgressReader, rung_points: dict[int, float]) -> dict[int, float]:
    """A run's validation curve, epoch → ``metric``: its progress file's ``val_curve``, completed by its recorded
    rung scores (the points a run trained before ``val_curve`` existed still has)."""
    name = metric.removeprefix("val/dice_")
    progress, _ = reader.read(run.run_dir)
    curve = dict(rung_points)
    for entry in (progress or {}).get("val_curve") or []:
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) and isinstance(entry[1], dict):
            value = entry[1].get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                curve[entry[0]] = float(value)
    return curve


def _ranked_scores(db: sqlite3.Connection, schedule: HalvingSchedule, k: int, fold_scores: dict[tuple[str, Any], float],
                   runs: list[RunRecord], reader: ProgressReader) -> tuple[dict[str, float], dict[str, float]]:
    """What rung ``k`` ranks on under the schedule's rule, and each configuration's predicted score (none for the
    plain rule); the predictions are recorded in ``predictions`` (replacing the previous pass's)."""
    if schedule.promote == "score":
        return config_scores(fold_scores), {}
    points: dict[str, dict[int, float]] = {}
    for row in db.execute("SELECT run_id, epochs, score FROM rung_scores WHERE score IS NOT NULL"):
        points.setdefault(row["run_id"], {})[row["epochs"]] = row["score"]
    wanted = set(fold_scores)
    curves = {}
    for run in {run.run_id: run for run in runs}.values():
        key = (config_key(run), fold_of(run))
        if key in wanted:
            curves[key] = fold_curve(run, schedule.metric, reader, points.get(run.run_id, {}))
    predictions = predicted_scores(fold_scores, curves, schedule.rungs[k], schedule.max_epochs)
    for config, prediction in predictions.items():
        db.execute("INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (config, k, prediction.value, prediction.last, prediction.n_points, prediction.method, time.time()))
    values = {config: p.value for config, p in predictions.items()}
    return predicted_ranking(values, config_scores(fold_scores)), values


# --- report -------------------------------------------------------------------------------------------------


@dataclass
class ConfigRung:
    """Where one configuration stands: the highest rung a fold of it reached, its score there, promotions."""

    config: str
    rung_epochs: int | None
    score: float | None
    folds_scored: int
    promoted_from: list[int] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=dict)
    predicted: dict[int, float] = field(default_factory=dict)  # rung epochs → predicted score at max_epochs


@dataclass
class HalvingReport:
    schedule: HalvingSchedule
    configs: list[ConfigRung]
    paused: list[str]
    gpu_hours: float
    full_grid_gpu_hours: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.to_dict(), "configs": [c.__dict__ for c in self.configs],
                "paused": self.paused, "gpu_hours": round(self.gpu_hours, 4),
                "full_grid_gpu_hours": None if self.full_grid_gpu_hours is None else round(self.full_grid_gpu_hours, 4)}

    def lines(self) -> list[str]:
        """Short lines for the dashboard's header."""
        top = sorted(self.configs, key=lambda c: (-(c.rung_epochs or 0), -(c.score or -math.inf)))
        promoted = sum(len(c.promoted_from) for c in self.configs)
        cost = (f"GPU-hours {self.gpu_hours:.2f} of {self.full_grid_gpu_hours:.2f} for the full grid "
                f"({self.gpu_hours / self.full_grid_gpu_hours:.0%})" if self.full_grid_gpu_hours else
                f"GPU-hours {self.gpu_hours:.2f} (full grid: no epoch timed yet)")
        rule = ", ranked on the score predicted at max_epochs" if self.schedule.promote == "predicted" else ""
        head = (f"halving: rungs {self.schedule.rungs} (eta {self.schedule.eta}, {self.schedule.metric}{rule}) · "
                f"{promoted} promotions · {len(self.paused)} paused · {cost}")
        leaders = ", ".join(f"{c.config} @{c.rung_epochs}: {c.score:.4f}" for c in top[:3] if c.score is not None)
        return [head] + ([f"halving leaders: {leaders}"] if leaders else [])


def halving_report(state: SweepState, reader: ProgressReader | None = None) -> HalvingReport | None:
    """Each configuration's rung and score, the promotions, the paused runs, and GPU-hours spent against the
    full grid's (estimated from each run's ``epoch_seconds`` in progress.json: epochs trained × seconds per epoch
    × GPUs; a run without a timed epoch counts at the mean of the others). None for a sweep without a schedule."""
    schedule = schedule_of(state)
    if schedule is None:
        return None
    ensure_tables(state)
    reader = reader or ProgressReader()
    runs = state.runs()
    by_id = {run.run_id: run for run in runs}
    configs: dict[str, ConfigRung] = {}
    for run in runs:
        entry = configs.setdefault(config_key(run), ConfigRung(config_key(run), None, None, 0))
        entry.states[run.state.value] = entry.states.get(run.state.value, 0) + 1
    best_rung: dict[str, int] = {}
    rows = state._db.execute("SELECT run_id, rung, score FROM rung_scores WHERE score IS NOT NULL").fetchall()
    for row in rows:
        if row["run_id"] in by_id:
            key = config_key(by_id[row["run_id"]])
            best_rung[key] = max(best_rung.get(key, -1), row["rung"])
    for key, rung in best_rung.items():
        scores = [r["score"] for r in rows if r["rung"] == rung and r["run_id"] in by_id
                  and config_key(by_id[r["run_id"]]) == key]
        configs[key].rung_epochs, configs[key].score = schedule.rungs[rung], math.fsum(scores) / len(scores)
        configs[key].folds_scored = len(scores)
    for row in state._db.execute("SELECT config, rung FROM promotions ORDER BY rung"):
        if row["config"] in configs:
            configs[row["config"]].promoted_from.append(schedule.rungs[row["rung"]])
    for row in state._db.execute("SELECT config, rung, predicted FROM predictions ORDER BY rung"):
        if row["config"] in configs and row["predicted"] is not None:
            configs[row["config"]].predicted[schedule.rungs[row["rung"]]] = row["predicted"]
    spent, full = _gpu_hours(runs, reader)
    return HalvingReport(schedule, sorted(configs.values(), key=lambda c: (-(c.rung_epochs or 0),
                                                                         -(c.score if c.score is not None else -1))),
                         [r.run_id for r in runs if r.state == RunState.PAUSED], spent, full)


def _gpu_hours(runs: list[RunRecord], reader: ProgressReader) -> tuple[float, float | None]:
    timed: dict[str, tuple[int, float]] = {}
    for run in runs:
        progress, _ = reader.read(run.run_dir)
        if progress and isinstance(progress.get("epoch_seconds"), (int, float)):
            timed[run.run_id] = (int(progress.get("epoch") or 0), float(progress["epoch_seconds"]))
    if not timed:
        return 0.0, None
    mean_s = math.fsum(s for _, s in timed.values()) / len(timed)
    spent = full = 0.0
    for run in runs:
        epochs, seconds = timed.get(run.run_id, (0, mean_s))
        gpus = max(1, _gpus(run))
        spent += epochs * seconds * gpus
        full += int(run.config.get("trainer", {}).get("max_epochs", 0)) * seconds * gpus
    return spent / 3600, full / 3600
