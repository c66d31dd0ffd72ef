"""The rules of the official BraTS 2023/2024 scoring code, one reference case each, values derived by hand.

Label maps use the brats2023 scheme (1 NETC, 2 SNFH, 3 ET). Every expected value below comes from the rules in
brats_ugrip/metrics/rules.py's table and the official scripts it names, worked out in the comments; none is read
back from the code under test. (The development cross-check against the official scripts themselves is reported
in the commit that added these rules.)
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from brats_ugrip.metrics import evaluate_case, worst_case
from brats_ugrip.metrics.lesionwise import lesions_merged_by_dilation, merge_touching

NETC, SNFH, ET = 1, 2, 3


def labels(shape: tuple[int, int, int], *boxes: tuple[int, tuple[int, int, int], tuple[int, int, int]]) -> np.ndarray:
    """A label map with ``(label, start, size)`` boxes painted in order."""
    out = np.zeros(shape, dtype=np.uint8)
    for value, start, size in boxes:
        out[tuple(slice(s, s + n) for s, n in zip(start, size))] = value
    return out


def score(pred: np.ndarray, ref: np.ndarray, metrics: str, spacing=(1.0, 1.0, 1.0)) -> dict[str, float]:
    return evaluate_case(pred, ref, "brats2023", metrics, spacing)


def test_missed_lesion_scores_dice_0_and_the_cap_and_counts_in_legacy_hd95():
    # Reference ET: A = 6³ = 216 voxels at x 4..9, B = 4³ = 64 voxels at x 30..33 (20 voxels apart: not merged by
    # dilation 3). The prediction is A exactly.
    a = (ET, (4, 4, 4), (6, 6, 6))
    ref = labels((40, 16, 16), a, (ET, (30, 4, 4), (4, 4, 4)))
    row = score(labels((40, 16, 16), a), ref, "brats2023-gli")
    # Lesion-wise: A scores Dice 1, HD95 0; B is missed: Dice 0, HD95 374. n = 2, no FP.
    assert row["lw_dice_ET"] == pytest.approx(0.5)
    assert row["lw_hd95_ET"] == pytest.approx((0 + 374) / 2)
    assert (row["lw_tp_ET"], row["lw_fn_ET"], row["lw_fp_ET"]) == (1, 1, 0)
    # Legacy Dice 2·216 / (216 + 280). Legacy HD95: B's surface is 6·16 / (6·36 + 6·16) = 31 % of the reference
    # surface area, every point of it ≥ 20 mm (B's near face to A's far face) and ≤ √(24² + 2·4²) < 25.3 mm from
    # the predicted surface, so the area-weighted 95th percentile lies in [20, 25.3]. (A voxel-count percentile
    # over surface voxels gave 0 for a small enough missed lesion.)
    assert row["dice_ET"] == pytest.approx(432 / 496)
    assert 20.0 <= row["hd95_ET"] <= 25.3


@pytest.mark.parametrize("metrics, cap", [
    ("brats2023-gli", 374.0), ("brats2023-ssa", 374.0), ("brats2023-ped", 374.0), ("brats2023-men", 374.0),
    ("brats2023-met", 374.0),
    ("brats2024-gli", 337.0),  # metrics_GLI.py replaces inf by 337
    ("brats2024-ssa", 374.0), ("brats2024-ped", 374.0),
    ("brats2024-met", 29.0),  # metrics_MET.py: sqrt(21² + 16² + 12²) = sqrt(841) = 29 (the shape, in voxels)
])
def test_false_positive_on_an_empty_reference_scores_each_sets_cap(metrics, cap):
    # Reference empty; the prediction one ET cube of 4³ = 64 voxels, above every threshold (2024 cleanup keeps it).
    shape = (21, 16, 12)
    row = score(labels(shape, (ET, (2, 2, 2), (4, 4, 4))), np.zeros(shape, np.uint8), metrics)
    # No reference lesion, one FP: Dice 0 / 1, HD95 cap · 1 / 1; legacy: exactly one side empty → 0 and the cap.
    for region in ("ET", "TC", "WT"):
        assert (row[f"lw_dice_{region}"], row[f"lw_hd95_{region}"], row[f"lw_fp_{region}"]) == (0.0, cap, 1)
        assert (row[f"dice_{region}"], row[f"hd95_{region}"]) == (0.0, cap)
    assert worst_case(np.zeros(shape, np.uint8), "brats2023", metrics)["hd95_ET"] == cap


def test_dilation_merges_nearby_reference_lesions_by_each_sets_dilation():
    # Reference SNFH (WT): A at x 4..7 and B at x 11..14, 4³ = 64 voxels each, 3 voxels apart. Dilated 3 times
    # A reaches x 10 and B x 8: one lesion of 128 voxels. Dilated once A reaches x 8, B x 10: two lesions.
    a = (SNFH, (4, 4, 4), (4, 4, 4))
    ref = labels((24, 12, 12), a, (SNFH, (11, 4, 4), (4, 4, 4)))
    pred = labels((24, 12, 12), a)
    gli = score(pred, ref, "brats2023-gli")  # dilation 3: A against A ∪ B: Dice 2·64 / (64 + 128) = 2/3
    assert (gli["lw_dice_WT"], gli["lw_tp_WT"], gli["lw_fn_WT"]) == (pytest.approx(2 / 3), 1, 0)
    men = score(pred, ref, "brats2023-men")  # dilation 1: A perfect, B missed (A is not within B dilated once)
    assert (men["lw_dice_WT"], men["lw_hd95_WT"], men["lw_fn_WT"]) == (pytest.approx(0.5), pytest.approx(187.0), 1)


def _threshold_case() -> tuple[np.ndarray, np.ndarray]:
    # Reference ET: R1 = 5³ = 125 voxels, R2 = 5·3·2 = 30 voxels far from it. Prediction: R1 exactly and an FP P2 of
    # 3·5·2 = 30 voxels far from both (all ≥ 12 voxels apart: no dilation merges or reaches them).
    r1 = (ET, (2, 2, 2), (5, 5, 5))
    ref = labels((32, 32, 32), r1, (ET, (20, 2, 2), (5, 3, 2)))
    pred = labels((32, 32, 32), r1, (ET, (2, 20, 20), (3, 5, 2)))
    return pred, ref


def test_lesion_under_the_threshold_on_an_anisotropic_grid():
    pred, ref = _threshold_case()
    spacing = (1.0, 1.0, 2.0)  # 2 mm³ a voxel: R2 and P2 are 60 mm³ but 30 voxels
    # 2024 SSA (threshold 50): P2 has ≤ 50 *voxels* and is deleted before anything is scored; R2 has 60 mm³ > 50
    # and is scored, missed. n = 2, FP = 0: Dice (1 + 0) / 2, HD95 (0 + 374) / 2.
    ssa24 = score(pred, ref, "brats2024-ssa", spacing)
    assert (ssa24["lw_dice_ET"], ssa24["lw_hd95_ET"]) == (pytest.approx(0.5), pytest.approx(187.0))
    assert (ssa24["lw_tp_ET"], ssa24["lw_fn_ET"], ssa24["lw_fp_ET"]) == (1, 1, 0)
    # Legacy on the cleaned prediction (R1 only): 2·125 / (125 + 155).
    assert ssa24["dice_ET"] == pytest.approx(250 / 280)
    # 2023 SSA: no cleanup, P2 is a FP. n = 2, FP = 1: Dice 1/3, HD95 (0 + 374 + 374) / 3; legacy on the raw
    # prediction: 2·125 / (155 + 155).
    ssa23 = score(pred, ref, "brats2023-ssa", spacing)
    assert (ssa23["lw_dice_ET"], ssa23["lw_hd95_ET"]) == (pytest.approx(1 / 3), pytest.approx(748 / 3))
    assert ssa23["lw_fp_ET"] == 1 and ssa23["dice_ET"] == pytest.approx(250 / 310)
    # At 1 mm³ R2 is 30 mm³ ≤ 50: not scored (the reference threshold is a volume). Only R1 counts: Dice 1.
    iso = score(pred, ref, "brats2024-ssa")
    assert (iso["lw_dice_ET"], iso["lw_hd95_ET"], iso["lw_fn_ET"]) == (1.0, 0.0, 0)


def _touching_case() -> tuple[np.ndarray, np.ndarray]:
    # A NETC bar at x 8..23; ET1 (x 4..7) and ET2 (x 24..27), 4·8·8 = 256 voxels each, touch its two ends and are
    # 16 voxels apart (no dilation up to 5 merges them). The prediction keeps the bar and ET1 only.
    bar = (NETC, (8, 6, 6), (16, 4, 4))
    et1, et2 = (ET, (4, 4, 4), (4, 8, 8)), (ET, (24, 4, 4), (4, 8, 8))
    return labels((32, 16, 16), bar, et1), labels((32, 16, 16), bar, et1, et2)


@pytest.mark.parametrize("metrics, expected", [
    # 2024 SSA and GLI: ET1 and ET2 touch the same NETC lesion: one ET lesion of 512 voxels, hit by ET1:
    # Dice 2·256 / (256 + 512) = 2/3, no FN.
    ("brats2024-ssa", (2 / 3, 1, 0)), ("brats2024-gli", (2 / 3, 1, 0)), ("brats2024-met", (2 / 3, 1, 0)),
    # 2024 PED and 2023: no such step: ET1 perfect, ET2 missed: Dice (1 + 0) / 2.
    ("brats2024-ped", (0.5, 1, 1)), ("brats2023-ssa", (0.5, 1, 1)), ("brats2023-gli", (0.5, 1, 1)),
])
def test_et_lesions_touching_one_netc_lesion_are_one_lesion_in_2024_ssa_gli_met(metrics, expected):
    pred, ref = _touching_case()
    row = score(pred, ref, metrics)
    assert (row["lw_dice_ET"], row["lw_tp_ET"], row["lw_fn_ET"]) == (pytest.approx(expected[0]), *expected[1:])


def test_touching_merge_follows_the_lowest_numbered_partner_lesion_as_officially():
    # NETC lesions a (x 0..1) and b (x 10..11), numbered 1 and 2 in C-order. ET lesion e1 (x 2..9) touches a and b;
    # e2 (x 12..14) touches b only. The official relabelling sends each ET
    # lesion to the lowest partner it touches: e1 → a, e2 → b: they stay two lesions (no transitive merge).
    shape = (16, 4, 4)
    partner = lesions_merged_by_dilation(labels(shape, (1, (0, 1, 1), (2, 2, 2)), (1, (10, 1, 1), (2, 2, 2))) > 0, 0)
    et = lesions_merged_by_dilation(labels(shape, (1, (2, 1, 1), (8, 2, 2)), (1, (12, 1, 1), (3, 2, 2))) > 0, 0)
    assert partner.max() == 2 and et.max() == 2
    assert len(np.unique(merge_touching(et, partner))) == 3  # background and two lesions
    # With e2 moved to touch a as well (x 0..1 on the other side of a), both go to a: one lesion.
    et_both_a = lesions_merged_by_dilation(labels(shape, (1, (2, 1, 1), (8, 2, 2))) > 0, 0)
    et_both_a[0:2, 3, 1:3] = 2  # a second ET lesion beside a (y 3), not touching e1
    merged = merge_touching(et_both_a, partner)
    assert len(np.unique(merged)) == 2


def test_gli_2024_snfh_dilates_3_times_and_netc_5_times():
    # Two lesions of 4³ = 64 voxels (> 20) at x 4..7 and x 16..19, 8 voxels apart. Dilated 3 times they reach
    # x 10 and x 13: two lesions. Dilated 5 times they reach x 12 and x 11: one lesion. The prediction is the first.
    def case(value: int) -> tuple[np.ndarray, np.ndarray]:
        first = (value, (4, 4, 4), (4, 4, 4))
        return labels((24, 12, 12), first), labels((24, 12, 12), first, (value, (16, 4, 4), (4, 4, 4)))

    snfh = score(*case(SNFH), "brats2024-gli")  # dilation 3 (the official "SFNH" test never matches SNFH)
    assert (snfh["lw_dice_SNFH"], snfh["lw_hd95_SNFH"], snfh["lw_fn_SNFH"]) == (0.5, pytest.approx(337 / 2), 1)
    netc = score(*case(NETC), "brats2024-gli")  # dilation 5: one lesion, Dice 2·64 / (64 + 128)
    assert (netc["lw_dice_NETC"], netc["lw_fn_NETC"]) == (pytest.approx(2 / 3), 0)


def test_hd95_is_surfel_weighted_with_the_header_spacing():
    # Cubes of 8³ shifted by 2 voxels along x: a third of each surface (its two x faces) is 2 voxels from the other
    # surface, the rest closer, so the 95th percentile is 2 voxels: 2 mm at 1 mm, 2·2.5 mm along a 2.5 mm axis.
    ref = labels((20, 14, 14), (ET, (3, 3, 3), (8, 8, 8)))
    pred = labels((20, 14, 14), (ET, (5, 3, 3), (8, 8, 8)))
    assert score(pred, ref, "brats2023-gli")["hd95_ET"] == pytest.approx(2.0)
    assert score(pred, ref, "brats2023-gli", (2.5, 1.0, 1.0))["hd95_ET"] == pytest.approx(5.0)
    assert math.isclose(score(pred, ref, "brats2024-gli", (1.0, 3.0, 3.0))["hd95_ET"], 2.0)
