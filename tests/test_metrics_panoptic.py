"""BraTS 2025 scores through panoptica: matched lesions, a false positive, a missed region, label schemes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from brats_ugrip.labels import get_scheme
from brats_ugrip.metrics.panoptic import BRATS2025_MAX_HD95, PANOPTIC_REGIONS, RESULT_KEYS, panoptic_scores
from brats_ugrip.metrics.regions import dice

SHAPE = (40, 40, 40)


def box(start: tuple[int, int, int], size: tuple[int, int, int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + n) for s, n in zip(start, size))


@pytest.fixture(scope="module")
def two_lesions():
    """Two enhancing lesions, each predicted with a shift: (reference, prediction) label maps and per-lesion Dice."""
    scheme = get_scheme("brats2023")
    ref = np.zeros(SHAPE, dtype=np.uint8)
    pred = np.zeros(SHAPE, dtype=np.uint8)
    ref[box((4, 4, 4), (6, 6, 6))] = scheme.enhancing
    pred[box((5, 4, 4), (6, 6, 6))] = scheme.enhancing
    ref[box((20, 20, 20), (8, 8, 8))] = scheme.enhancing
    pred[box((20, 20, 22), (8, 8, 8))] = scheme.enhancing
    near, far = (slice(0, 15),) * 3, (slice(15, 40),) * 3  # one lesion in each
    lesion_dice = [dice(pred[part] > 0, ref[part] > 0) for part in (near, far)]
    return scheme, ref, pred, lesion_dice


def test_two_matched_lesions(two_lesions):
    scheme, ref, pred, lesion_dice = two_lesions
    row = panoptic_scores(pred, ref, scheme)
    assert set(row) == {f"{c}_{r}" for c in RESULT_KEYS for r in PANOPTIC_REGIONS}
    assert (row["pan_tp_ET"], row["pan_fp_ET"], row["pan_fn_ET"], row["pan_f1_ET"]) == (2, 0, 0, 1.0)
    assert lesion_dice[0] != lesion_dice[1]
    assert row["pan_dice_ET"] == pytest.approx(np.mean(lesion_dice), rel=1e-6)
    assert row["pan_pq_ET"] == pytest.approx(row["pan_f1_ET"] * row["pan_dice_ET"])
    assert row["pan_global_dice_ET"] == pytest.approx(dice(pred > 0, ref > 0), rel=1e-6)
    assert 0 < row["pan_hd95_ET"] <= 2.0  # the shifts are 1 and 2 voxels
    assert row["pan_dice_TC"] == row["pan_dice_ET"]  # TC = ET here
    assert math.isnan(row["pan_dice_NETC"])  # no NETC on either side: no instances, NaN


def test_false_positive_and_missed_region(two_lesions):
    scheme, ref, pred, _ = two_lesions
    pred = pred.copy()
    pred[box((30, 2, 2), (4, 4, 4))] = scheme.enhancing
    ref = ref.copy()
    ref[box((2, 30, 30), (5, 5, 5))] = scheme.edema
    row = panoptic_scores(pred, ref, scheme)
    assert (row["pan_tp_ET"], row["pan_fp_ET"]) == (2, 1)
    assert row["pan_f1_ET"] == pytest.approx(2 * 2 / (2 * 2 + 1))  # F1 = 2TP / (2TP + FP + FN)
    assert row["pan_fn_SNFH"] == 1 and row["pan_dice_SNFH"] == 0.0
    assert row["pan_hd95_SNFH"] == row["pan_global_hd95_SNFH"] == BRATS2025_MAX_HD95


def test_brats2021_labels_use_their_own_enhancing_value(two_lesions):
    _, ref, pred, _ = two_lesions
    scheme = get_scheme("brats2021")
    relabel = {0: 0, 3: scheme.enhancing}
    row = panoptic_scores(np.vectorize(relabel.get)(pred), np.vectorize(relabel.get)(ref), scheme)
    assert row["pan_tp_ET"] == 2 and row["pan_f1_ET"] == 1.0
