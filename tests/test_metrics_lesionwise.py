"""BraTS 2023/2024 lesion-wise scores on hand-made lesions: FP penalty, threshold, dilation merging, edge cases."""
from __future__ import annotations

import numpy as np
import pytest

from brats_ugrip.errors import ConfigError
from brats_ugrip.labels import get_scheme
from brats_ugrip.metrics.lesionwise import (
    LESIONWISE_PRESETS,
    LesionParams,
    get_lesionwise_preset,
    lesions_merged_by_dilation,
    lesionwise_score,
    lesionwise_scores,
)
from brats_ugrip.metrics.regions import BRATS_MAX_HD95, dice

SHAPE = (48, 48, 48)
BRATS2023 = LesionParams(dilation=3, threshold=50)


def cubes(*boxes: tuple[tuple[int, int, int], int]) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    for start, size in boxes:
        mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


BIG = ((4, 4, 4), 6)      # 216 voxels, above every threshold
OTHER = ((30, 30, 30), 6)  # far from BIG
SMALL = ((30, 4, 30), 3)   # 27 voxels: below 50, above 10


def test_perfect_prediction_of_two_lesions():
    ref = cubes(BIG, OTHER)
    score = lesionwise_score(ref, ref, BRATS2023)
    assert (score.dice, score.hd95, score.n_tp, score.n_fn, score.n_fp) == (1.0, 0.0, 2, 0, 0)


def test_false_positive_lowers_dice_by_the_formula():
    ref = cubes(BIG)
    pred = cubes(BIG, OTHER)
    score = lesionwise_score(pred, ref, BRATS2023)
    assert score.n_fp == 1 and score.n_tp == 1
    assert score.dice == pytest.approx((1.0 + 0.0) / (1 + 1))
    assert score.hd95 == pytest.approx((0.0 + BRATS_MAX_HD95 * 1) / (1 + 1))


def test_small_false_positive_counts_in_2023_but_is_deleted_in_2024():
    ref, pred = cubes(BIG), cubes(BIG, SMALL)
    assert lesionwise_score(pred, ref, BRATS2023, merge_prediction=False).dice == pytest.approx(0.5)
    score_2024 = lesionwise_score(pred, ref, BRATS2023, merge_prediction=True)
    assert (score_2024.dice, score_2024.n_fp) == (1.0, 0)


def test_reference_lesion_under_threshold_is_dropped():
    ref, pred = cubes(BIG, SMALL), cubes(BIG)
    score = lesionwise_score(pred, ref, BRATS2023)  # the missed 27-voxel lesion is ≤ 50: not a FN
    assert (score.dice, score.hd95, score.n_tp, score.n_fn) == (1.0, 0.0, 1, 0)
    assert len(score.lesions) == 2 and not score.lesions[1].detected
    counted = lesionwise_score(pred, ref, LesionParams(dilation=3, threshold=10))
    assert (counted.dice, counted.hd95, counted.n_fn) == (0.5, BRATS_MAX_HD95 / 2, 1)


def test_threshold_is_a_volume_in_mm3():
    ref, pred = cubes(BIG, SMALL), cubes(BIG)
    # At 2 mm voxels the 27-voxel lesion is 216 mm³, above the threshold: it is a missed lesion.
    score = lesionwise_score(pred, ref, BRATS2023, spacing=(2.0, 2.0, 2.0))
    assert score.n_fn == 1 and score.dice == pytest.approx(0.5)


def test_nearby_reference_components_merge_by_dilation():
    left, right = ((10, 10, 10), 6), ((20, 10, 10), 6)  # 4 empty voxels between them along x
    ref = cubes(left, right)
    assert lesions_merged_by_dilation(ref, 3).max() == 1
    assert lesions_merged_by_dilation(ref, 1).max() == 2
    assert lesions_merged_by_dilation(ref, 0).max() == 2
    pred = cubes(left)
    merged = lesionwise_score(pred, ref, BRATS2023)
    assert (merged.n_tp, merged.n_fn, len(merged.lesions)) == (1, 0, 1)
    assert merged.dice == pytest.approx(dice(pred, ref))  # one lesion: the half-found union
    separate = lesionwise_score(pred, ref, LesionParams(dilation=1, threshold=50))
    assert (separate.n_tp, separate.n_fn) == (1, 1)
    assert separate.dice == pytest.approx(0.5)


def test_prediction_in_the_dilated_reference_is_a_true_positive():
    ref = cubes(((10, 10, 10), 6))
    pred = cubes(((18, 10, 10), 6))  # 2 voxels off: no overlap, but inside the 3-voxel dilation
    score = lesionwise_score(pred, ref, BRATS2023)
    assert (score.n_tp, score.n_fp) == (1, 0)
    assert score.dice == 0.0 and 0.0 < score.hd95 < BRATS_MAX_HD95
    far = lesionwise_score(cubes(((25, 10, 10), 6)), ref, BRATS2023)
    assert (far.n_tp, far.n_fn, far.n_fp, far.hd95) == (0, 1, 1, BRATS_MAX_HD95)


@pytest.mark.parametrize("pred, ref, expected", [
    (cubes(), cubes(), (1.0, 0.0)),
    (cubes(BIG), cubes(), (0.0, BRATS_MAX_HD95)),
    (cubes(), cubes(BIG), (0.0, BRATS_MAX_HD95)),
    (cubes(), cubes(SMALL), (1.0, 0.0)),  # only a lesion below the threshold: nothing to score
])
def test_empty_cases(pred, ref, expected):
    score = lesionwise_score(pred, ref, BRATS2023)
    assert (score.dice, score.hd95) == expected


def test_presets_hold_the_challenge_parameters():
    assert {"brats2023-gli", "brats2023-ssa", "brats2023-ped", "brats2024-ssa", "brats2024-ped", "brats2024-gli",
            "brats2024-met"} <= set(LESIONWISE_PRESETS)
    gli24 = get_lesionwise_preset("brats2024-gli")
    assert gli24.merge_prediction and not get_lesionwise_preset("brats2023-gli").merge_prediction
    assert gli24.regions["ET"] == LesionParams(3, 10) and gli24.regions["WT"] == LesionParams(3, 20)
    assert gli24.regions["NETC"] == LesionParams(5, 20)
    assert gli24.regions["SNFH"].dilation == 3  # the official code tests "SFNH": its intended 5 never applies
    assert get_lesionwise_preset("brats2024-ped").regions["TC"] == LesionParams(5, 10)
    assert get_lesionwise_preset("brats2024-met").regions["ET"] == LesionParams(1, 2)
    with pytest.raises(ConfigError, match="brats2024-gli"):
        get_lesionwise_preset("brats2024-xyz")


def test_scores_from_label_maps_cover_every_region_of_the_preset():
    scheme = get_scheme("brats2023")
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[cubes(((8, 8, 8), 12))] = scheme.edema
    ref[cubes(((11, 11, 11), 6))] = scheme.core
    ref[cubes(((12, 12, 12), 4))] = scheme.enhancing
    pred = ref.copy()
    pred[cubes(OTHER)] = scheme.edema  # a far oedema-only false positive
    row = lesionwise_scores(pred, ref, scheme, "brats2024-gli")
    assert set(row) == {f"lw_{m}_{r}" for m in ("dice", "hd95", "tp", "fn", "fp")
                        for r in ("ET", "TC", "WT", "NETC", "SNFH")}
    assert row["lw_dice_ET"] == row["lw_dice_TC"] == 1.0
    assert row["lw_fp_WT"] == row["lw_fp_SNFH"] == 1 and row["lw_dice_WT"] == pytest.approx(0.5)
