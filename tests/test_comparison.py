"""The comparison against hand-worked cases: BraTS ranks worked out on paper, a bootstrap whose interval has a
closed form, and sign-flip p-values counted by hand."""
from __future__ import annotations

import math

import pytest
import torch

from brats_ugrip.comparison import Candidate, compare, markdown, paired_bootstrap, sign_flip_p_value
from brats_ugrip.errors import DataError

# Three candidates on five cases; Dice higher is better, HD95 lower is better. NaN = a missing prediction.
DICE = {"A": [0.9, 0.8, 0.5, 0.7, 0.6], "B": [0.8, 0.8, 0.9, 0.6, 0.7], "C": [0.7, 0.6, 0.7, math.nan, 0.8]}
HD95 = {"A": [2, 5, 10, 3, 2], "B": [3, 5, 1, 4, 2], "C": [4, 5, 3, math.nan, 1]}
CASES = ["c1", "c2", "c3", "c4", "c5"]


def _candidates():
    return [Candidate(name, {case: {"dice_ET": DICE[name][i], "hd95_ET": HD95[name][i]} for i, case in enumerate(CASES)})
            for name in "ABC"]


def test_brats_ranks_worked_on_paper():
    # Ranks per case (Dice | HD95), ties share the mean rank, NaN ranks last:
    #   c1: A1 B2 C3 | A1 B2 C3        c2: A1.5 B1.5 C3 | all 2       c3: A3 B1 C2 | A3 B1 C2
    #   c4: A1 B2 C3 | A1 B2 C3 (C missing)                         c5: A3 B2 C1 | A2.5 B2.5 C1
    # Sums over the 10 (case, metric) pairs: A 19, B 18, C 23 → mean ranks 1.9, 1.8, 2.3.
    result = compare(_candidates(), resamples=1000)
    assert [c.name for c in result.candidates] == ["B", "A", "C"]
    assert result.result("A").mean_rank == pytest.approx(1.9)
    assert result.result("B").mean_rank == pytest.approx(1.8)
    assert result.result("C").mean_rank == pytest.approx(2.3)
    assert result.ranks[0, 1].tolist() == [1.5, 2.0]  # A on c2
    assert result.ranks[2, 3].tolist() == [3.0, 3.0]  # C's missing case ranks last


def test_means_medians_baseline_and_permutation_by_hand():
    result = compare(_candidates(), resamples=1000)
    a = result.result("A")
    assert a.means["dice_ET"] == pytest.approx(0.7) and a.medians["dice_ET"] == pytest.approx(0.7)
    assert result.result("B").medians["dice_ET"] == pytest.approx(0.8)
    assert result.result("C").means["dice_ET"] == pytest.approx(0.7)  # over its 4 scored cases
    # Baseline = best single by mean Dice with a missing case counted 0: A .70, B .76, C .56 → B.
    assert result.baseline == "B" and result.result("B").verdict == "baseline"
    # A − B per case: +.1, 0, −.4, +.1, −.1 → mean −.06. Of the 32 sign patterns, |sum| ≥ .3 for 28 (the 0 case
    # doubles every pattern of the other four; 14 of those 16 reach .3): p = 28/32.
    assert a.difference == pytest.approx(-0.06)
    assert a.p_value == pytest.approx(28 / 32)
    # C − B: missing Dice counts 0: −.1, −.2, −.2, −.6, +.1 → mean −.2.
    assert result.result("C").difference == pytest.approx(-0.2)


def test_named_baseline_and_verdicts():
    six = [f"c{i}" for i in range(6)]
    shifted = Candidate("up", {case: {"dice_ET": 0.5 + 0.05, "hd95_ET": 1.0} for case in six})
    base = Candidate("base", {case: {"dice_ET": 0.5, "hd95_ET": 1.0} for case in six})
    same = Candidate("same", {case: {"dice_ET": 0.5, "hd95_ET": 1.0} for case in six}, kind="soup")
    result = compare([base, shifted, same], baseline="base", resamples=500)
    up = result.result("up")
    # A constant difference: every resample's mean is that constant, so the interval collapses onto it; only the
    # 2 uniform of the 64 sign patterns are as extreme: p = 2/64 < 0.05, so the verdict is "better".
    assert up.interval.low == pytest.approx(0.05) and up.interval.high == pytest.approx(0.05)
    assert up.p_value == pytest.approx(2 / 64) and up.verdict == "better than the baseline"
    assert result.result("same").interval.low == 0.0 == result.result("same").interval.high
    assert result.result("same").verdict == "not distinguishable on 6 cases"
    assert result.result("same").p_value == 1.0  # every sign pattern of zeros is as extreme as zero
    table = markdown(result, "Test")
    assert "not distinguishable on 6 cases" in table and "500 resamples, seed 0" in table
    assert "+0.0500 [+0.0500, +0.0500]" in table
    # The same constant gain on 5 cases: interval [0.05, 0.05] above 0, but p = 2/32 ≥ 0.05 → undecided.
    five = [Candidate(c.name, {k: v for k, v in c.scores.items() if k != "c5"}, c.kind) for c in (base, shifted)]
    assert compare(five, baseline="base", resamples=500).result("up").verdict == "not distinguishable on 5 cases"


def test_bootstrap_closed_forms():
    constant = paired_bootstrap([0.03] * 7, resamples=2000)  # every resample's mean is 0.03
    assert constant.low == pytest.approx(0.03) and constant.high == pytest.approx(0.03)
    # Two cases, differences 0 and 1: a resample's mean is 0, 1/2 or 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5 % and 97.5 % quantiles are 0 and 1.
    interval = paired_bootstrap([0.0, 1.0], resamples=10_000, seed=3)
    assert (interval.low, interval.high) == (0.0, 1.0)
    assert paired_bootstrap([0.2]) is None  # one case: no spread to resample
    assert paired_bootstrap([0.1, 0.5, -0.2], seed=1) == paired_bootstrap([0.1, 0.5, -0.2], seed=1)  # seeded


def test_sign_flip_p_values_by_hand():
    # 1, 2, 3: sums of the 8 sign patterns are ±6, ±4, ±2, 0, 0; |sum| ≥ 6 for 2 of them.
    assert sign_flip_p_value([1.0, 2.0, 3.0]) == (0.25, "exact over all 8 sign patterns")
    assert sign_flip_p_value([1.0] * 5)[0] == pytest.approx(2 / 32)
    # 20 equal differences: only the two uniform patterns (2 of 2^20) are as extreme, so 1000 random patterns
    # almost surely find none: p = (1 + 0) / (1 + 1000).
    p_value, method = sign_flip_p_value([1.0] * 20, resamples=1000)
    assert p_value == pytest.approx(1 / 1001) and method == "1000 random sign patterns, seed 0"


def test_lesionwise_metrics_preferred_and_refusals():
    rows = {c: {"dice_ET": 0.5, "hd95_ET": 2.0, "lw_dice_ET": 0.4, "lw_hd95_ET": 3.0, "lw_dice_mean": 0.4}
            for c in CASES}
    result = compare([Candidate("x", rows), Candidate("y", rows)], resamples=100)
    assert result.metrics == ["lw_dice_ET", "lw_hd95_ET"]
    with pytest.raises(DataError, match="same cases"):
        compare([Candidate("x", rows), Candidate("y", {"c1": rows["c1"]})])
    with pytest.raises(DataError, match="two candidates"):
        compare([Candidate("x", rows)])
    with pytest.raises(DataError, match="not a candidate"):
        compare([Candidate("x", rows), Candidate("y", rows)], baseline="z")


def test_greedy_step_gains_and_the_significant_gain_rule():
    from brats_ugrip.souping.gains import GainTracker
    from brats_ugrip.souping.soups import greedy_soup

    def per_case(values):
        return {f"c{i}": {"dice_TC": v, "dice_WT": v, "dice_ET": v} for i, v in enumerate(values)}

    tracker = GainTracker(per_case([0.5, 0.5, 0.5]), resamples=500)
    # +0.1 on every case: the interval collapses onto 0.1, above 0 → kept by the rule.
    gain = tracker.measure(per_case([0.6, 0.6, 0.6]))
    assert gain.gain == pytest.approx(0.1) and gain.interval.low == pytest.approx(0.1) and tracker.significant()
    tracker.kept(True)
    # Against the new current soup (0.6): −0.1, +0.1, 0 → mean 0; every one of the 8 sign patterns is as extreme.
    gain = tracker.measure(per_case([0.5, 0.7, 0.6]))
    assert gain.gain == pytest.approx(0.0) and gain.p_value == 1.0 and not tracker.significant()

    # greedy_soup with a keep rule: the rule decides, not the ≥ comparison (which would keep both).
    states = [{"w": torch.tensor([float(i)])} for i in range(3)]
    decisions = iter([True, False])
    result = greedy_soup(lambda i: states[i], [0.9, 0.8, 0.7], lambda s: 1.0, keep=lambda cand, best: next(decisions))
    assert result.kept == [0, 1] and [s.kept for s in result.steps] == [True, True, False]
