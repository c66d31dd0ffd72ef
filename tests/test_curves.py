"""Learning-curve extrapolation (sweeps/curves.py) and the ``promote: predicted`` rule (sweeps/halving.py), on
curves whose answer is known by hand: points of a known pow3 law ``y = c − a·t^{−α}`` (its value at the horizon
is the law's), flat and falling curves (their level), one or two points (the last value)."""
from __future__ import annotations

import pytest

from brats_ugrip.sweeps.curves import fold_mean_curve, predict_final
from brats_ugrip.sweeps.halving import HalvingSchedule, predicted_ranking, promotions, ranking_scores

EPOCHS = [1, 2, 3, 4, 5]


def pow3(c: float, a: float, alpha: float, epochs=EPOCHS) -> list[float]:
    return [c - a * t ** -alpha for t in epochs]


# Two crossing curves. Fast: 0.80 − 0.5/t is 0.300, 0.550, 0.633, 0.675, 0.700 at epochs 1–5 and 0.7963 at 135.
# Slow: 0.90 − 0.8/√t is 0.100, 0.334, 0.438, 0.500, 0.542 and 0.9 − 0.8/√135 = 0.8311 at 135: behind at every
# epoch up to 5, ahead at the end.
FAST, SLOW = pow3(0.80, 0.5, 1.0), pow3(0.90, 0.8, 0.5)


def test_the_hand_worked_crossing_curves():
    assert FAST[-1] == pytest.approx(0.700) and SLOW[-1] == pytest.approx(0.5422, abs=1e-4)
    assert pow3(0.80, 0.5, 1.0, [135])[0] == pytest.approx(0.7963, abs=1e-4)
    assert pow3(0.90, 0.8, 0.5, [135])[0] == pytest.approx(0.8311, abs=1e-4)


def test_the_slow_starter_that_ends_higher_is_predicted_higher():
    fast, slow = predict_final(EPOCHS, FAST, 135), predict_final(EPOCHS, SLOW, 135)
    assert fast.method == slow.method == "ensemble" and fast.n_points == 5
    assert slow.value > fast.value
    assert slow.last == pytest.approx(SLOW[-1]) and fast.last == pytest.approx(FAST[-1])
    # Both laws are in the model set (pow3), so the median is near their true ends (0.796 and 0.831).
    assert fast.median == pytest.approx(0.7963, abs=0.03) and slow.median == pytest.approx(0.8311, abs=0.05)


def test_a_flat_curve_is_predicted_at_its_level_and_a_falling_one_at_its_mean():
    flat = predict_final(EPOCHS, [0.6] * 5, 135)
    assert flat.value == pytest.approx(0.6) and flat.median == pytest.approx(0.6)
    falling = predict_final([1, 2, 3], [0.70, 0.68, 0.66], 135)
    assert falling.value == pytest.approx(0.68)  # no model falls: the best fit is the constant at the mean


def test_one_or_two_points_give_the_last_value():
    for epochs, values in (([5], [0.4]), ([4, 5], [0.3, 0.4])):
        prediction = predict_final(epochs, values, 135)
        assert prediction.method == "last value" and prediction.value == pytest.approx(0.4)
        assert prediction.n_points == len(epochs)
    assert predict_final([], [], 135).n_points == 0
    assert predict_final([1, 2, 135], [0.1, 0.2, 0.3], 135).value == pytest.approx(0.3)  # at the horizon: seen


def test_predictions_stay_in_the_metric_range():
    steep = predict_final(EPOCHS, [0.1, 0.3, 0.5, 0.7, 0.9], 135)
    assert 0.9 <= steep.value <= 1.0 and 0.0 <= steep.median <= 1.0
    unit = predict_final(EPOCHS, [10, 30, 50, 70, 90], 135, bounds=(0.0, 100.0), noise_floor=0.5)
    assert 90 <= unit.value <= 100


def test_fold_mean_curve_uses_the_epochs_every_fold_has_up_to_the_rung():
    folds = [{1: 0.2, 2: 0.4, 3: 0.6, 4: 0.7}, {1: 0.4, 3: 0.8, 4: 0.9}]
    assert fold_mean_curve(folds, 3) == ([1, 3], [pytest.approx(0.3), pytest.approx(0.7)])
    assert fold_mean_curve([], 3) == ([], [])


def test_predicted_ranking_interleaves_the_best_predicted_and_the_best_reached():
    # places by prediction a0 b1 c2 d3, by score reached c0 d1 b2 a3; better places a0 b1 c0 d1; a and c tie at
    # 0 and c's other place (2) beats a's (3); b and d tie at 1, b's other (2) beats d's (3): c, a, b, d.
    predicted = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6}
    reached = {"a": 0.1, "b": 0.2, "c": 0.9, "d": 0.8}
    ranking = predicted_ranking(predicted, reached)
    assert sorted(ranking, key=lambda c: -ranking[c]) == ["c", "a", "b", "d"]
    assert promotions(ranking, set(), eta=2, rung_closed=False) == ["c", "a"]  # ⌊4/2⌋ = 2: one of each order
    # Two configurations, each first in one order, second in the other: the better score reached goes (where
    # the quota is one, evidence before extrapolation).
    two = predicted_ranking({"x": 0.9, "y": 0.8}, {"x": 0.5, "y": 0.7})
    assert promotions(two, set(), eta=2, rung_closed=False) == ["y"]


def test_the_predicted_rule_promotes_the_late_bloomer_the_plain_rule_cuts():
    # 4 configurations × 1 fold at rung 5 (eta 2: ⌊4/2⌋ = 2 go on). fast and steady lead on the score reached
    # (0.700, 0.690); slow (0.542) ends highest (0.831 > 0.796); flat stays at 0.40.
    curves = {"fast": FAST, "steady": [0.69] * 5, "slow": SLOW, "flat": [0.40] * 5}
    fold_scores = {(c, 0): v[-1] for c, v in curves.items()}
    fold_curves = {(c, 0): dict(zip(EPOCHS, v)) for c, v in curves.items()}
    plain = HalvingSchedule(min_epochs=5, eta=2, max_epochs=135)
    predicted = HalvingSchedule(min_epochs=5, eta=2, max_epochs=135, promote="predicted")
    assert promotions(ranking_scores(plain, 0, fold_scores), set(), 2, False) == ["fast", "steady"]
    assert set(promotions(ranking_scores(predicted, 0, fold_scores, fold_curves), set(), 2, False)) == {"fast",
                                                                                                      "slow"}
    # Without recorded curves the prediction is the rung score: the plain order.
    assert promotions(ranking_scores(predicted, 0, fold_scores), set(), 2, False) == ["fast", "steady"]
