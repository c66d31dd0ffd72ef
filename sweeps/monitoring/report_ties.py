"""The sweep report's "best configuration", with the configurations it cannot be told apart from.

Contract: :func:`best_and_ties` takes the report's configuration × fold table (:func:`brats_ugrip.sweeps.monitoring.report.
fold_table`: one row per configuration, ``fold …`` columns of validation mean Dice, ``mean``, ``sd``, ``n_folds``,
best first) and returns a :class:`BestConfiguration`. Each configuration's interval is the percentile bootstrap
95 % interval of its mean over folds (:func:`brats_ugrip.comparison.paired_bootstrap`, folds resampled, seeded);
among the configurations validated on as many folds as the best, one whose interval overlaps the best's is a
**tie**, and so is every one when the best has fewer than two folds (no interval: nothing can be told apart).
Configurations validated on fewer folds are not compared (their means are not comparable). The fold-to-fold
spread is the best's sd and range over folds, and the median sd of all configurations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from brats_ugrip.comparison import DEFAULT_RESAMPLES, DEFAULT_SEED, Interval, paired_bootstrap

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class BestConfiguration:
    """The best configuration, its interval, the ties, and the spread over folds."""

    name: str
    mean: float
    n_folds: int
    interval: Interval | None
    ties: list[str] = field(default_factory=list)
    intervals: dict[str, Interval | None] = field(default_factory=dict)
    spread_sd: float = math.nan
    spread_range: tuple[float, float] = (math.nan, math.nan)
    median_sd: float = math.nan
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED


def _overlap(a: Interval | None, b: Interval | None) -> bool:
    return a is None or b is None or (a.low <= b.high and b.low <= a.high)


def best_and_ties(folds: pd.DataFrame, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> BestConfiguration:
    """See the module docstring; ``folds`` must have at least one row."""
    fold_columns = [c for c in folds.columns if str(c).startswith("fold ")]
    values = {str(row["configuration"]): np.array([row[c] for c in fold_columns if not math.isnan(row[c])])
              for _, row in folds.iterrows()}
    intervals = {name: paired_bootstrap(v, resamples, seed) for name, v in values.items()}
    best = str(folds.iloc[0]["configuration"])
    ties = [name for name in values if name != best and len(values[name]) == len(values[best])
            and _overlap(intervals[best], intervals[name])]
    best_values = values[best]
    sds = [float(sd) for sd in folds["sd"] if not math.isnan(sd)]
    return BestConfiguration(best, float(best_values.mean()), len(best_values), intervals[best], ties, intervals,
                             float(np.std(best_values, ddof=1)) if len(best_values) > 1 else math.nan,
                             (float(best_values.min()), float(best_values.max())),
                             float(np.median(sds)) if sds else math.nan, resamples, seed)


def _interval_text(interval: Interval | None) -> str:
    return f"[{interval.low:.4f}, {interval.high:.4f}]" if interval is not None else "no interval (one fold)"


def markdown_lines(best: BestConfiguration) -> list[str]:
    """The section's sentences: best, interval, ties, spread, and how the intervals were computed."""
    interval = (f", 95 % interval {_interval_text(best.interval)}" if best.interval is not None
                else " (one fold: no interval)")
    lines = [f"**Best configuration: `{best.name}`**, validation mean Dice {best.mean:.4f} over {best.n_folds} "
             f"fold{'s' if best.n_folds != 1 else ''}{interval}; chosen among the configurations validated on the "
             "most folds.", ""]
    if best.ties and best.interval is None:
        lines += ["**Ties** (one fold gives no interval, so no configuration can be told apart from it): "
                  + ", ".join(f"`{name}`" for name in best.ties) + ".", ""]
    elif best.ties:
        lines += ["**Ties** (their intervals overlap the best's): " + ", ".join(
            f"`{name}` {_interval_text(best.intervals[name])}" for name in best.ties) + ".", ""]
    else:
        lines += ["No configuration's interval overlaps the best's: it is ahead on these folds.", ""]
    if best.n_folds > 1:
        lines += [f"Fold-to-fold spread: the best configuration's sd over folds is {best.spread_sd:.4f} (range "
                  f"{best.spread_range[0]:.4f}–{best.spread_range[1]:.4f}); median sd of all configurations "
                  f"{best.median_sd:.4f}.", ""]
    else:
        lines += ["Fold-to-fold spread: unknown, every configuration ran on one fold only (cross-validate on more "
                  "folds to measure it).", ""]
    lines += [f"Intervals: percentile bootstrap over folds of the mean, {best.resamples} resamples, seed "
              f"{best.seed}.", ""]
    return lines
