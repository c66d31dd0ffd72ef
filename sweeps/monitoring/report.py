"""The sweep report: ``SWEEP_DIR/report/`` (``report.md``, PNGs, and ``report.html``: the same, self-contained,
figures inline; :mod:`brats_ugrip.sweeps.monitoring.report_html`), written by ``sweeps/monitor.py SWEEP_DIR
--summary`` from ``sweep.db`` and the run directories alone (no W&B, no network).

What it answers, and from what:

- per varied parameter: the validation mean Dice of each run's best checkpoint against the parameter's value,
  mean ± sd over folds (per fold first the mean over the runs with that value): ``dice_vs_<key>.png`` and a table
  (the numbers of :func:`brats_ugrip.sweeps.monitoring.collect.sweep_summary`);
- the fold × configuration table (a configuration = the varied values other than the fold), and the best
  configuration: the highest mean over folds among those validated on the most folds (a configuration whose runs
  failed on a fold is not preferred for its easier mean);
- learning curves of every run, train loss and validation Dice per epoch, coloured by configuration, one line
  style per fold (``learning_curves.png``; from ``runs/<id>/csv/metrics.csv``, the training's Lightning CSV log);
- GPU-hours and job-hours per run and in total (attempts' start and end times in ``sweep.db`` × the GPUs the run
  asked for, as the dashboard counts them), with node and GPU from ``progress.json``;
- runs that failed, were cancelled or timed out, and why (the monitor's reason and the last line of the error log);
- with exactly 2 varied parameters besides the fold, a heat map of the mean over folds (``heatmap.png``).

Every Dice value in the report is the ``dice_mean`` column of ``results.csv`` (:func:`collect.results_table`), or
a mean of them. Files are written atomically; a figure that has no data is not written (the Markdown says why).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brats_ugrip.atomic import atomic_path, atomic_write_text
from brats_ugrip.sweeps import layout
from brats_ugrip.sweeps.layout import report_dir
from brats_ugrip.sweeps.monitoring.collect import FOLD_KEY, results_table, sweep_summary
from brats_ugrip.sweeps.monitoring.snapshot import attempt_hours
from brats_ugrip.sweeps.run_ids import format_value, short_keys
from brats_ugrip.sweeps.state import RunRecord, RunState, SweepState

if TYPE_CHECKING:
    import pandas as pd

REPORT_MD = "report.md"
CURVES_PNG = "learning_curves.png"
HEATMAP_PNG = "heatmap.png"
DICE_LABEL = "validation mean Dice (TC, WT, ET)"
_LINE_STYLES = ("-", "--", ":", "-.")
SHORT_LABEL = 32
"""Configuration names longer than this are shown as C1, C2, … in figures, with a key."""
_UNSUCCESSFUL = (RunState.FAILED, RunState.CANCELLED, RunState.TIMEOUT)


# --- run logs -----------------------------------------------------------------------------------------------


def read_log(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Per epoch (1-based): ``train_loss`` (the epoch's mean) and ``val_dice`` (validation mean Dice, NaN in epochs
    without validation) from the run's Lightning CSV log; empty when there is none. A resumed run may log an epoch
    twice: its last value counts."""
    import pandas as pd

    empty = pd.DataFrame(columns=["epoch", "train_loss", "val_dice"])
    try:
        log = pd.read_csv(layout.metrics_csv(run_dir))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return empty
    if "epoch" not in log:
        return empty
    columns = {"train/loss_epoch": "train_loss", "val/dice_mean": "val_dice"}
    parts = []
    for source, name in columns.items():
        if source in log:
            values = log.loc[log[source].notna(), ["epoch", source]].drop_duplicates("epoch", keep="last")
            parts.append(values.rename(columns={source: name}).set_index("epoch"))
    if not parts:
        return empty
    frame = pd.concat(parts, axis=1).reindex(columns=list(columns.values())).sort_index().reset_index()
    frame["epoch"] = frame["epoch"].astype(int) + 1
    return frame


def read_curve(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Validation mean Dice per epoch (1-based): ``epoch``, ``val_dice``; empty when the run never validated."""
    log = read_log(run_dir)
    return log.loc[log["val_dice"].notna(), ["epoch", "val_dice"]].reset_index(drop=True)


# --- tables -------------------------------------------------------------------------------------------------


def config_keys(runs: list[RunRecord]) -> list[str]:
    """The varied keys other than the fold, in grid order: together they name a configuration."""
    return [k for k in dict.fromkeys(k for r in runs for k in r.params) if k != FOLD_KEY]


def config_label(params: dict[str, Any], keys: list[str]) -> str:
    """``lr=0.001 name=segresnet`` (short key names, values as in run ids); ``all runs`` when nothing else varies."""
    names = short_keys(keys)
    return " ".join(f"{names[k]}={format_value(params.get(k))}" for k in keys) or "all runs"


def fold_table(results: pd.DataFrame, runs: list[RunRecord]) -> pd.DataFrame:
    """Configuration × fold: the runs' ``dice_mean``; with ``mean``, ``sd`` (over folds) and ``n_folds``, sorted
    best first (most folds, then highest mean)."""
    import pandas as pd

    keys = config_keys(runs)
    labels = {r.run_id: config_label(r.params, keys) for r in runs}
    done = results[results["dice_mean"].notna()].copy() if "dice_mean" in results else results
    if not len(done):
        return pd.DataFrame(columns=["configuration", "mean", "sd", "n_folds"])
    done["configuration"] = done["run_id"].map(labels)
    done["dice_mean"] = done["dice_mean"].astype(float)
    table = done.pivot_table(index="configuration", columns="fold", values="dice_mean", aggfunc="mean")
    table.columns = [f"fold {int(c)}" if isinstance(c, (int, float)) and not math.isnan(c) else f"fold {c}"
                     for c in table.columns]
    folds = list(table.columns)
    table["mean"] = table[folds].mean(axis=1)
    table["sd"] = table[folds].std(axis=1, ddof=1)
    table["n_folds"] = table[folds].notna().sum(axis=1)
    return table.sort_values(["n_folds", "mean"], ascending=False).reset_index()


def compute_table(state: SweepState, now: float | None = None) -> pd.DataFrame:
    """Per run: state, attempts, node, GPU (from ``progress.json``), job-hours and GPU-hours of all its attempts."""
    import json

    import pandas as pd

    now = time.time() if now is None else now
    runs = state.runs()
    by_run = {r.run_id: r for r in runs}
    attempts = state.attempts()
    rows = []
    for run in runs:
        gpu_hours, job_hours = attempt_hours([a for a in attempts if a.run_id == run.run_id], by_run, now)
        try:
            progress = json.loads(layout.progress_path(run.run_dir).read_text())
        except (OSError, ValueError):
            progress = {}
        rows.append({"run_id": run.run_id, "state": run.state.value, "attempts": run.attempts,
                     "node": progress.get("host"), "gpu": progress.get("gpu"),
                     "job_hours": job_hours, "gpu_hours": gpu_hours})
    return pd.DataFrame(rows, columns=["run_id", "state", "attempts", "node", "gpu", "job_hours", "gpu_hours"])


def failure_table(state: SweepState) -> list[dict[str, Any]]:
    """Runs that failed, were cancelled or timed out: state, attempts, the monitor's reason, the error's last line."""
    latest = state.latest_attempts()
    rows = []
    for run in state.runs(_UNSUCCESSFUL):
        attempt = latest.get(run.run_id)
        tail = (attempt.error_tail or "") if attempt else ""
        last_line = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
        rows.append({"run_id": run.run_id, "state": run.state.value, "attempts": run.attempts,
                     "reason": run.reason or "", "error": last_line})
    return rows


# --- figures ------------------------------------------------------------------------------------------------


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(figure)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def as_given(values: list[Any], given: list[Any]) -> list[Any]:
    """``values`` as the grid gave them: pandas turns ``None`` into NaN and ints of a column with NaN into floats
    (``10`` → ``10.0``); each value is mapped back to the grid's value it stands for."""
    def original(value: Any) -> Any:
        for candidate in given:
            if candidate is None and isinstance(value, float) and math.isnan(value):
                return None
            if (isinstance(candidate, (int, float)) and not isinstance(candidate, bool)
                    and isinstance(value, (int, float)) and value == candidate):
                return candidate
        return value
    return [original(v) for v in values]


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_parameter(key: str, per_value: pd.DataFrame, sweep_name: str, path: Path) -> Path:
    """Mean ± sd over folds of the validation mean Dice against one parameter's values."""
    plt = _pyplot()
    frame = per_value.copy()
    values = list(frame[key])
    numeric = _numeric(values)
    if numeric:
        frame = frame.sort_values(key)
        x = list(frame[key])
    else:
        frame["label"] = [format_value(v) for v in frame[key]]
        frame = frame.sort_values("label")
        x = list(range(len(frame)))
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    sd = frame["std"].fillna(0.0)
    # Categories (none, 10, names) have no order between them: points without a connecting line.
    axes.errorbar(x, frame["mean"], yerr=sd, marker="o", capsize=4, linewidth=1.5 if numeric else 0,
                  label="mean ± sd over folds")
    for xi, mean, n in zip(x, frame["mean"], frame["n_folds"]):
        axes.annotate(f"{mean:.3f}\n({int(n)} fold{'s' if int(n) != 1 else ''})", (xi, mean),
                      textcoords="offset points", xytext=(8, -3), va="top", fontsize=8)
    axes.margins(x=0.2, y=0.2)  # room for the labels beside the first and last points
    if numeric and min(x) > 0 and max(x) / min(x) >= 10:  # learning rates, weight decays: steps by factors
        axes.set_xscale("log")
    if not numeric:
        axes.set_xticks(x, list(frame["label"]), rotation=20 if len(x) > 4 else 0)
    elif len(x) <= 8:  # the grid's values themselves, not 10⁻³-style ticks
        axes.set_xticks(x, [format_value(v) for v in x])
        axes.minorticks_off()
    axes.set_xlabel(key)
    axes.set_ylabel(DICE_LABEL)
    axes.set_title(f"{sweep_name}: validation Dice vs {key}\n(best checkpoint of each run; mean ± sd over folds)",
                   fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    return _save(figure, path)


def plot_heatmap(table: pd.DataFrame, keys: list[str], sweep_name: str, path: Path) -> Path:
    """Mean over folds of the validation mean Dice for every pair of values of two parameters."""
    import numpy as np

    plt = _pyplot()
    grid = table.pivot_table(index=keys[0], columns=keys[1], values="mean", aggfunc="mean")
    grid = grid.sort_index().sort_index(axis=1)
    n_folds = table.pivot_table(index=keys[0], columns=keys[1], values="n_folds", aggfunc="min")
    n_folds = n_folds.reindex(index=grid.index, columns=grid.columns)
    figure, axes = plt.subplots(figsize=(1.5 * len(grid.columns) + 3, 0.9 * len(grid.index) + 2))
    image = axes.imshow(grid.to_numpy(dtype=float), cmap="viridis", aspect="auto")
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.set_label("validation mean Dice, mean over folds")
    axes.set_xticks(range(len(grid.columns)), [format_value(v) for v in grid.columns])
    axes.set_yticks(range(len(grid.index)), [format_value(v) for v in grid.index])
    axes.set_xlabel(keys[1])
    axes.set_ylabel(keys[0])
    values = grid.to_numpy(dtype=float)
    folds = n_folds.to_numpy(dtype=float)
    most = np.nanmax(folds)
    middle = float(np.nanmean(values))
    for i, j in zip(*np.nonzero(~np.isnan(values))):
        # Fewer folds than the others: said in the cell, as its mean is not comparable.
        text = f"{values[i, j]:.3f}" + (f"\n({int(folds[i, j])} of {int(most)} folds)" if folds[i, j] < most else "")
        axes.text(j, i, text, ha="center", va="center", fontsize=9,
                  color="black" if values[i, j] > middle else "white")  # readable on viridis's dark and light ends
    axes.set_title(f"{sweep_name}: validation Dice by {keys[0]} × {keys[1]}\n(best checkpoint of each run, mean "
                   "over folds)", fontsize=10)
    return _save(figure, path)


def plot_learning_curves(sweep_dir: str | os.PathLike[str], runs: list[RunRecord], path: Path | None = None,
                         sweep_name: str | None = None) -> Path | None:
    """Train loss and validation Dice per epoch of every run: one colour per configuration, one line style per
    fold; ``report/learning_curves.png`` by default. None when no run has logged an epoch yet."""
    keys = config_keys(runs)
    logs = {run.run_id: read_log(run.run_dir) for run in runs}
    runs = [run for run in runs if len(logs[run.run_id])]
    if not runs:
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    labels = list(dict.fromkeys(config_label(run.params, keys) for run in runs))
    folds = list(dict.fromkeys(run.config.get("data", {}).get("fold") for run in runs))
    colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    figure, (loss_axes, dice_axes) = plt.subplots(1, 2, figsize=(13, 4.8))
    for run in runs:
        log = logs[run.run_id]
        colour = colours(labels.index(config_label(run.params, keys)) % colours.N)
        style = _LINE_STYLES[folds.index(run.config.get("data", {}).get("fold")) % len(_LINE_STYLES)]
        for axes, column in ((loss_axes, "train_loss"), (dice_axes, "val_dice")):
            points = log[log[column].notna()]
            # A run that validated once has no line to draw: its one point must show as a point.
            axes.plot(points["epoch"], points[column], color=colour, linestyle=style, linewidth=1.4,
                      marker="o" if len(points) < 3 else ("." if len(points) < 30 else None), markersize=5)
    last_epoch = max(int(log["epoch"].max()) for log in logs.values() if len(log))
    for axes, ylabel, title in ((loss_axes, "training loss (epoch mean)", "training loss"),
                                (dice_axes, DICE_LABEL, "validation Dice")):
        # Both panels span all epochs trained, so validation at one epoch is a point on the run's time axis,
        # not an axis of its own around that epoch.
        axes.set_xlim(0.5, last_epoch + 0.5)
        axes.set_xlabel("epoch")
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    # Long configuration names would squeeze the panels: the legend then shows C1, C2, … and a key under the
    # figure maps each to its configuration and run ids.
    short = max(len(label) for label in labels) > SHORT_LABEL
    handles = [Line2D([], [], color=colours(i % colours.N), linewidth=2, label=f"C{i + 1}" if short else label)
               for i, label in enumerate(labels[:20])]
    if short:
        ids = {label: [r.run_id for r in runs if config_label(r.params, keys) == label] for label in labels}
        key = "\n".join(f"C{i + 1:<3} {label}   (runs: {', '.join(ids[label])})" for i, label in enumerate(labels[:20]))
        figure.text(0.01, 0.0, "key:\n" + key, family="monospace", fontsize=7.5, va="top", ha="left")
    if len(folds) > 1:
        handles += [Line2D([], [], color="grey", linestyle=_LINE_STYLES[i % len(_LINE_STYLES)], label=f"fold {f}")
                    for i, f in enumerate(folds)]
    dice_axes.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5),
                     title="configuration / fold", title_fontsize=8)
    figure.suptitle(f"{sweep_name or Path(sweep_dir).resolve().name}: learning curves of {len(runs)} runs")
    return _save(figure, path or report_dir(sweep_dir) / CURVES_PNG)


# --- the report ---------------------------------------------------------------------------------------------


def _cell(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def markdown_table(frame: pd.DataFrame | list[dict[str, Any]], digits: int = 4) -> str:
    """A GitHub Markdown table; floats with ``digits`` decimals, missing values as –."""
    import pandas as pd

    frame = pd.DataFrame(frame) if isinstance(frame, list) else frame
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, digits) for v in row) + " |")
    return "\n".join(lines)


@dataclass
class SweepReport:
    """What :func:`write_report` wrote: the Markdown file, the figures, and the tables behind them."""

    path: Path
    figures: list[Path] = field(default_factory=list)
    folds: pd.DataFrame | None = None
    per_value: dict[str, pd.DataFrame] = field(default_factory=dict)
    compute: pd.DataFrame | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    best: str | None = None
    ties: list[str] = field(default_factory=list)
    html: Path | None = None


def _best_section(report: SweepReport) -> list[str]:
    from brats_ugrip.sweeps.monitoring.report_ties import best_and_ties, markdown_lines

    folds = report.folds
    if folds is None or not len(folds):
        return ["No run has a validation Dice yet."]
    best = best_and_ties(folds)
    report.best, report.ties = best.name, best.ties
    return [*markdown_lines(best), "Configuration × fold (validation mean Dice of each run's best checkpoint, as in "
            "`results.csv`), best first:", "", markdown_table(folds)]


def _figure_line(report: SweepReport, path: Path | None, alt: str) -> list[str]:
    if path is None:
        return []
    report.figures.append(path)
    return ["", f"![{alt}]({path.name})"]


def write_report(sweep_dir: str | os.PathLike[str], state: SweepState, now: float | None = None) -> SweepReport:
    """Write ``SWEEP_DIR/report/report.md`` and its figures (see the module docstring)."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    folder = report_dir(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    runs = state.runs()
    name = state.get_meta("name") or sweep_dir.resolve().name
    results = results_table(sweep_dir, state)
    summary = sweep_summary(sweep_dir, state)
    report = SweepReport(folder / REPORT_MD, folds=fold_table(results, runs), per_value=summary.per_value,
                         compute=compute_table(state, now), failures=failure_table(state))
    counts = ", ".join(f"{s.value} {n}" for s, n in state.counts().items())
    keys = config_keys(runs)
    lines = [f"# Sweep `{name}`", "", f"{len(runs)} runs ({counts}); varied: "
             + (", ".join(f"`{k}`" for k in [*keys, *([FOLD_KEY] if any(FOLD_KEY in r.params for r in runs) else [])])
                or "nothing") + f". Written {time.strftime('%Y-%m-%d %H:%M')} from `sweep.db` and the run directories.",
             "", "## Best configuration", "", *_best_section(report)]
    lines += ["", "## Validation Dice per parameter value", "",
              "Per fold, the mean over the runs with that value; then mean ± sd over folds." if summary.per_value
              else "No parameter besides the fold varies, or no run has a validation Dice yet."]
    for key, frame in summary.per_value.items():
        frame = frame.copy()
        # object dtype: a list [None, 10] put back into a column would be made NaN and 10.0 again.
        frame[key] = pd.Series(as_given(list(frame[key]), [r.params.get(key) for r in runs if key in r.params]),
                               index=frame.index, dtype=object)
        table = frame.rename(columns={"std": "sd"})[[key, "mean", "sd", "n_folds"]].astype({"n_folds": int})
        table[key] = [format_value(v) if not isinstance(v, str) else v for v in table[key]]
        path = plot_parameter(key, frame, name, folder / f"dice_vs_{key}.png")
        lines += ["", f"### `{key}`", "", markdown_table(table),
                  *_figure_line(report, path, f"validation Dice against {key}")]
    if len(keys) == 2 and summary.per_config is not None and len(summary.per_config):
        path = plot_heatmap(summary.per_config, keys, name, folder / HEATMAP_PNG)
        lines += ["", f"## Heat map: `{keys[0]}` × `{keys[1]}`", "", "Mean over folds of the validation mean Dice.",
                  *_figure_line(report, path, "heat map of validation Dice")]
    curves = plot_learning_curves(sweep_dir, runs, folder / CURVES_PNG, name)
    lines += ["", "## Learning curves", ""]
    lines += (["Training loss and validation Dice per epoch (`runs/<id>/csv/metrics.csv`); colour = configuration, "
               "line style = fold.", *_figure_line(report, curves, "learning curves")] if curves else
              ["No run has logged an epoch yet."])
    lines += ["", *_compute_section(report.compute), "", *_failure_section(report.failures)]
    atomic_write_text(report.path, "\n".join(lines) + "\n")
    from brats_ugrip.sweeps.monitoring.report_html import write_html

    report.html = write_html(report.path, f"Sweep {name}")
    return report


def _compute_section(compute: pd.DataFrame) -> list[str]:
    total_gpu, total_job = compute["gpu_hours"].sum(), compute["job_hours"].sum()
    return ["## Compute", "", f"**{total_gpu:.2f} GPU-hours** in total ({total_job:.2f} job-hours: wall-clock time of "
            "every attempt; GPU-hours = job-hours × the GPUs a run asked for).", "", markdown_table(compute, digits=3)]


def _failure_section(failures: list[dict[str, Any]]) -> list[str]:
    if not failures:
        return ["## Failed runs", "", "None."]
    return ["## Failed runs", "", f"{len(failures)} runs failed, were cancelled or timed out:", "",
            markdown_table(failures)]
