"""Collection and results of a sweep: checkpoints into ``SWEEP_DIR/models/``, ``results.csv``, the summary.

- :func:`collect_run`: a completed run's best checkpoint (``runs/<id>/checkpoints/best.ckpt``, or ``last.ckpt``
  when it never validated) is copied to ``SWEEP_DIR/models/<run_id>.ckpt`` (the folder ``souping/greedy.py
  --ckpts`` takes) through a temporary file, verified by size and SHA-256 against the source, then renamed; the
  metadata goes next to it in ``models/<run_id>.json``, written last (its presence means "collected"). With
  ``include_last``, ``last.ckpt`` goes to ``models/last/<run_id>.ckpt`` the same way.
- :func:`results_table` / :func:`write_results`: one row per run with every parameter, its state and its final
  metrics per region (validation Dice of the best checkpoint), saved atomically as ``SWEEP_DIR/results.csv``.
- :func:`sweep_summary`: the best configuration per fold, mean ± std across folds per configuration and per
  parameter value, and the learning curves of every run (``report/learning_curves.png``: the figures and the
  Markdown report are :mod:`brats_ugrip.sweeps.monitoring.report`'s).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brats_ugrip.atomic import atomic_path, atomic_write_json, atomic_write_text
from brats_ugrip.errors import CheckpointError
from brats_ugrip.files import sha256_file
from brats_ugrip.sweeps import layout
from brats_ugrip.sweeps.monitoring.promotion import HalvingReport, halving_report
from brats_ugrip.sweeps.state import RunRecord, RunState, SweepState

if TYPE_CHECKING:
    import pandas as pd


REGIONS = ("TC", "WT", "ET")
FOLD_KEY = "data.fold"
_CHUNK = 1 << 20


def copy_verified(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> tuple[str, int]:
    """Copy ``source`` to ``target`` atomically; the copy is re-read and must match the source's size and SHA-256.

    Returns:
        (sha256, size in bytes).

    Raises:
        CheckpointError: the source changed during the copy, or the copy does not match it (``target`` untouched).
    """
    source, target = Path(source), Path(target)
    before = source.stat()
    digest = hashlib.sha256()
    with atomic_path(target) as tmp:
        with open(source, "rb") as reader, open(tmp, "wb") as writer:
            while chunk := reader.read(_CHUNK):
                digest.update(chunk)
                writer.write(chunk)
        after = source.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise CheckpointError(f"{source}: changed while it was being copied to {target}; collect it again")
        size, copied = tmp.stat().st_size, sha256_file(tmp)
        if size != before.st_size or copied != digest.hexdigest():
            raise CheckpointError(f"{target}: the copy of {source} does not match it (size {size} vs {before.st_size}, "
                                  f"sha256 {copied[:12]}… vs {digest.hexdigest()[:12]}…); disk full or failing?")
    return copied, size


def source_checkpoint(run: RunRecord) -> Path:
    """The checkpoint of a run worth collecting: ``best.ckpt``, else ``last.ckpt`` (a run that never validated)."""
    for path in (layout.best_checkpoint(run.run_dir), layout.last_checkpoint(run.run_dir)):
        if path.is_file():
            return path
    raise CheckpointError(f"{layout.checkpoint_dir(run.run_dir)}: run {run.run_id} completed but has neither "
                          f"{layout.BEST_CHECKPOINT} nor {layout.LAST_CHECKPOINT}")


def read_collected(sweep_dir: str | os.PathLike[str], run_id: str) -> dict[str, Any] | None:
    """The metadata of a collected run (``models/<run_id>.json``), or None."""
    try:
        return json.loads(layout.collected_paths(sweep_dir, run_id)[1].read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_collected(sweep_dir: str | os.PathLike[str], run: RunRecord) -> bool:
    """Whether ``models/<run_id>.ckpt`` is there with the recorded size and its source has not changed since (a
    cheap check: two ``stat`` calls; :func:`verify_collected` re-hashes)."""
    meta = read_collected(sweep_dir, run.run_id)
    if meta is None:
        return False
    target = layout.collected_paths(sweep_dir, run.run_id)[0]
    try:
        source = Path(meta["source"]).stat()
        return target.stat().st_size == meta["size"] and (source.st_size, source.st_mtime_ns) == (
            meta["size"], meta["source_mtime_ns"])
    except (OSError, KeyError):
        return False


def verify_collected(sweep_dir: str | os.PathLike[str], run_id: str) -> bool:
    """Re-hash ``models/<run_id>.ckpt`` and compare it with its metadata."""
    meta = read_collected(sweep_dir, run_id)
    target = layout.collected_paths(sweep_dir, run_id)[0]
    return (meta is not None and target.is_file() and target.stat().st_size == meta["size"]
            and sha256_file(target) == meta["sha256"])


def collect_run(sweep_dir: str | os.PathLike[str], run: RunRecord, include_last: bool = False) -> dict[str, Any]:
    """Copy a completed run's checkpoint into ``models/`` (verified) and write its metadata; returns the metadata.

    Raises:
        CheckpointError: no checkpoint, an unreadable one, or a copy that does not verify.
    """
    from brats_ugrip.checkpoints import checkpoint_meta, load_checkpoint  # torch: only when there is work

    source = source_checkpoint(run)
    source_stat = source.stat()
    ckpt_meta = checkpoint_meta(load_checkpoint(source), source)
    target, meta_path = layout.collected_paths(sweep_dir, run.run_id)
    sha, size = copy_verified(source, target)
    meta: dict[str, Any] = {
        "run_id": run.run_id, "params": run.params, "source": str(source), "path": str(target.resolve()),
        "sha256": sha, "size": size, "source_mtime_ns": source_stat.st_mtime_ns,
        "kind": source.stem, "fold": ckpt_meta.get("fold"), "epoch": ckpt_meta.get("epoch"),
        "val_metrics": ckpt_meta.get("val_metrics", {}), "val_epoch": ckpt_meta.get("val_epoch"),
        "model": ckpt_meta.get("model"), "config_hash": ckpt_meta.get("config_hash"),
        "init_id": ckpt_meta.get("init_id"), "weights": ckpt_meta.get("weights"),
        "git_commit": ckpt_meta.get("git_commit"), "collected_at": time.time(),
    }
    last = layout.last_checkpoint(run.run_dir)
    if include_last and last.is_file():
        last_sha, last_size = copy_verified(last, layout.collected_last(sweep_dir, run.run_id))
        meta["last"] = {"path": str(layout.collected_last(sweep_dir, run.run_id).resolve()),
                        "sha256": last_sha, "size": last_size}
    atomic_write_json(meta_path, meta)
    return meta


# --- results ------------------------------------------------------------------------------------------------


def _final_metrics(sweep_dir: Path, run: RunRecord) -> dict[str, Any]:
    """Validation Dice per region of the run's best checkpoint: from training's result, else the collected
    checkpoint's metadata."""
    metrics = dict(run.metrics.get("val_metrics") or {})
    collected = read_collected(sweep_dir, run.run_id) if run.state == RunState.COMPLETED else None
    if not metrics and collected:
        metrics = dict(collected.get("val_metrics") or {})
    row = {f"dice_{region}": metrics.get(region) for region in REGIONS}
    row["dice_mean"] = metrics.get("mean", run.metrics.get("best_val_dice"))
    row["best_epoch"] = run.metrics.get("best_epoch") or (collected or {}).get("val_epoch")
    row["epochs"] = run.metrics.get("epochs")
    row["model_path"] = (collected or {}).get("path")
    return row


def results_table(sweep_dir: str | os.PathLike[str], state: SweepState) -> pd.DataFrame:
    """One row per run: id, state, attempts, fold, every varied parameter (dotted key columns), the final
    validation Dice per region and their mean, the best epoch, epochs trained, the collected model's path and
    the reason of a failure."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    rows = []
    for run in state.runs():
        data = run.config.get("data", {}) if isinstance(run.config, dict) else {}
        row: dict[str, Any] = {"run_id": run.run_id, "state": run.state.value, "attempts": run.attempts,
                               "fold": data.get("fold")}
        row.update({key: value for key, value in run.params.items() if key != FOLD_KEY})
        row.update(_final_metrics(sweep_dir, run))
        row["reason"] = run.reason
        rows.append(row)
    return pd.DataFrame(rows)


def write_results(sweep_dir: str | os.PathLike[str], state: SweepState) -> Path:
    """``SWEEP_DIR/results.csv``, written atomically."""
    path = layout.results_csv(sweep_dir)
    atomic_write_text(path, results_table(sweep_dir, state).to_csv(index=False))
    return path


# --- summary ------------------------------------------------------------------------------------------------


@dataclass
class SweepSummary:
    """What ``monitor.py --summary`` prints and saves."""

    best_per_fold: pd.DataFrame
    per_config: pd.DataFrame
    per_value: dict[str, pd.DataFrame] = field(default_factory=dict)
    curves_png: Path | None = None
    halving: HalvingReport | None = None
    """Rungs, promotions, paused runs and GPU-hours of a successive-halving sweep (None for a plain grid)."""


def _mean_std(values: pd.Series) -> dict[str, Any]:
    return {"mean": values.mean(), "std": values.std(ddof=1) if len(values) > 1 else float("nan"),
            "n_folds": int(values.count())}


def sweep_summary(sweep_dir: str | os.PathLike[str], state: SweepState) -> SweepSummary:
    """Best configuration per fold, and mean ± std of the final mean Dice across folds, per configuration (the
    varied values other than the fold) and per value of each parameter (per fold first the mean over the runs with
    that value, then mean ± std over folds). The learning-curve figure is the report's
    (:func:`~brats_ugrip.sweeps.monitoring.report.plot_learning_curves`); callers that draw it set ``curves_png``."""
    import pandas as pd

    table = results_table(sweep_dir, state)
    runs = state.runs()
    keys = [k for k in dict.fromkeys(k for r in runs for k in r.params) if k != FOLD_KEY]
    done = table[table["dice_mean"].notna()].copy() if len(table) else table
    if len(done):
        done["dice_mean"] = done["dice_mean"].astype(float)
        best = done.loc[done.groupby("fold", dropna=False)["dice_mean"].idxmax()]
        columns = ["fold", "run_id", *keys, "dice_mean", *(f"dice_{r}" for r in REGIONS)]
        best_per_fold = best[columns].reset_index(drop=True)
    else:
        best_per_fold = pd.DataFrame(columns=["fold", "run_id", *keys, "dice_mean"])
    for key in keys:  # grouping needs hashable, comparable values (lists become text)
        if len(done):
            done[key] = done[key].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    if len(done) and keys:
        per_config = (done.groupby(keys, dropna=False)["dice_mean"].apply(lambda s: pd.Series(_mean_std(s)))
                      .unstack().reset_index().sort_values("mean", ascending=False, ignore_index=True))
    elif len(done):
        per_config = pd.DataFrame([_mean_std(done["dice_mean"])])
    else:
        per_config = pd.DataFrame(columns=[*keys, "mean", "std", "n_folds"])
    per_value = {}
    for key in keys:
        if not len(done):
            continue
        by_fold = done.groupby([key, "fold"], dropna=False)["dice_mean"].mean().reset_index()
        per_value[key] = (by_fold.groupby(key, dropna=False)["dice_mean"].apply(lambda s: pd.Series(_mean_std(s)))
                          .unstack().reset_index().sort_values("mean", ascending=False, ignore_index=True))
    return SweepSummary(best_per_fold, per_config, per_value, None, halving_report(state))
