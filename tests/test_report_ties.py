"""The sweep report's ties: intervals over folds worked out by hand."""
from __future__ import annotations

import pandas as pd
import pytest

from brats_ugrip.sweeps.monitoring.report_ties import best_and_ties, markdown_lines


def _folds(rows):
    frame = pd.DataFrame([{"configuration": name, **{f"fold {k}": v for k, v in enumerate(values)}}
                          for name, values in rows])
    folds = [c for c in frame.columns if c.startswith("fold ")]
    frame["mean"], frame["sd"] = frame[folds].mean(axis=1), frame[folds].std(axis=1, ddof=1)
    frame["n_folds"] = frame[folds].notna().sum(axis=1)
    return frame.sort_values(["n_folds", "mean"], ascending=False).reset_index(drop=True)


def test_overlapping_intervals_are_ties():
    # Two folds each: a resample's mean is the lower value, the mean or the higher value (1/4, 1/2, 1/4), so the
    # interval is [min, max]: best [0.8, 0.8]; b [0.7, 0.9] overlaps it (tie); c [0.5, 0.6] does not.
    best = best_and_ties(_folds([("best", [0.8, 0.8]), ("b", [0.7, 0.9]), ("c", [0.5, 0.6])]), resamples=2000)
    assert best.name == "best" and best.ties == ["b"]
    assert (best.interval.low, best.interval.high) == pytest.approx((0.8, 0.8))
    assert (best.intervals["b"].low, best.intervals["b"].high) == pytest.approx((0.7, 0.9))
    text = "\n".join(markdown_lines(best))
    assert "**Ties** (their intervals overlap the best's): `b` [0.7000, 0.9000]" in text
    assert "sd over folds is 0.0000" in text


def test_one_fold_makes_every_configuration_a_tie():
    best = best_and_ties(_folds([("a", [0.9]), ("b", [0.5])]))
    assert best.interval is None and best.ties == ["b"]
    text = "\n".join(markdown_lines(best))
    assert "one fold gives no interval" in text and "Fold-to-fold spread: unknown" in text


def test_values_printed_as_the_grid_gave_them():
    from brats_ugrip.sweeps.monitoring.report import as_given

    # pandas turns finetune.freeze.all_but_last: [null, 10] into NaN and 10.0; the report prints none and 10.
    assert as_given([float("nan"), 10.0], [None, None, 10]) == [None, 10]
    assert as_given([0.001, "segresnet"], [0.001, "segresnet"]) == [0.001, "segresnet"]
