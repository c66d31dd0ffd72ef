"""Region Dice and HD95: known values on hand-made volumes, spacing, empty masks, label schemes."""
from __future__ import annotations

import numpy as np
import pytest

from brats_ugrip.errors import DataError
from brats_ugrip.labels import get_scheme
from brats_ugrip.metrics.evaluation import evaluate_case
from brats_ugrip.metrics.regions import (
    BRATS_MAX_HD95,
    dice,
    hd95,
    label_map_scores,
    region_masks,
    region_scores,
)

SHAPE = (40, 40, 40)


def cube(start: tuple[int, int, int], size: int) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def ball(center: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.indices(SHAPE).astype(float)
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius**2


def test_dice_of_two_overlapping_cubes():
    a, b = cube((4, 4, 4), 8), cube((6, 4, 4), 8)  # shifted by 2 along x: overlap 6·8·8
    assert dice(a, b) == pytest.approx(2 * 6 * 8 * 8 / (2 * 8**3))
    assert dice(a, a) == 1.0
    assert dice(a, cube((20, 20, 20), 8)) == 0.0


def test_hd95_of_shifted_cubes_and_spacing():
    a, b = cube((4, 4, 4), 8), cube((6, 4, 4), 8)
    # Over a fifth of each surface is the face 2 voxels away, so the 95th percentile is that face: 2 voxels.
    assert hd95(a, b) == pytest.approx(2.0)
    assert hd95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(4.0)  # the shift axis is 2 mm a voxel
    assert hd95(a, b, spacing=(1.0, 3.0, 3.0)) == pytest.approx(2.0)  # the other axes do not matter here


def test_hd95_of_shifted_sphere_is_at_most_the_shift_and_scales_with_spacing():
    a, b = ball((20, 20, 20), 8), ball((23, 20, 20), 8)
    distance = hd95(a, b)
    assert 0.0 < distance <= 3.0 + 1e-6  # the Hausdorff distance of two balls 3 apart is 3; HD95 is below it
    assert hd95(a, a) == 0.0
    assert hd95(a, b, spacing=(2.0, 2.0, 2.0)) == pytest.approx(2 * distance)


@pytest.mark.parametrize("pred_empty, ref_empty, expected", [
    (True, True, (1.0, 0.0)),
    (True, False, (0.0, BRATS_MAX_HD95)),
    (False, True, (0.0, BRATS_MAX_HD95)),
])
def test_empty_masks_follow_the_brats_convention(pred_empty, ref_empty, expected):
    empty, lesion = np.zeros(SHAPE, dtype=bool), cube((10, 10, 10), 5)
    pred, ref = (empty if pred_empty else lesion), (empty if ref_empty else lesion)
    assert (dice(pred, ref), hd95(pred, ref)) == expected
    assert BRATS_MAX_HD95 == 374.0


def test_region_scores_from_label_maps_use_the_scheme():
    scheme = get_scheme("brats2023")
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[cube((8, 8, 8), 16)] = scheme.edema
    ref[cube((12, 12, 12), 8)] = scheme.core
    ref[cube((14, 14, 14), 4)] = scheme.enhancing
    pred = ref.copy()
    pred[pred == scheme.enhancing] = scheme.core  # enhancing tumour called necrosis: TC and WT are still perfect
    scores = label_map_scores(pred, ref, scheme)
    assert scores == {"dice_TC": 1.0, "hd95_TC": 0.0, "dice_WT": 1.0, "hd95_WT": 0.0,
                      "dice_ET": 0.0, "hd95_ET": BRATS_MAX_HD95}
    assert evaluate_case(pred, ref, scheme, "regions") == scores
    # The same maps read as BraTS 2021 labels (ET = 4) are rejected: label 3 is not in that scheme.
    with pytest.raises(DataError, match=r"reference: label value\(s\) \[3\]"):
        evaluate_case(pred, ref, "brats2021", "regions")


def test_region_scores_on_channels_and_masks():
    scheme = get_scheme("brats2021")
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[cube((8, 8, 8), 10)] = scheme.edema
    labels[cube((10, 10, 10), 4)] = scheme.core
    labels[cube((15, 15, 15), 2)] = scheme.enhancing
    masks = region_masks(labels, scheme, ("TC", "WT", "ET", "NETC", "SNFH"))
    assert masks["NETC"].sum() == 4**3 and masks["ET"].sum() == 2**3
    assert masks["SNFH"].sum() == 10**3 - 4**3 - 2**3
    assert np.array_equal(masks["TC"], masks["NETC"] | masks["ET"])
    channels = scheme.to_regions(labels)
    scores = region_scores(channels, np.roll(channels, 1, axis=1))
    assert scores["dice_WT"] == pytest.approx(2 * 9 * 100 / 2000)
    with pytest.raises(ValueError, match="shape"):
        region_scores(channels, channels[:, :-1])
