"""ASHA's rules (sweeps/halving.py), with expected values worked out by hand from Li et al. 2020's rule, and the
bench simulation on curves whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from brats_ugrip.bench.halving import simulate
from brats_ugrip.errors import ConfigError
from brats_ugrip.sweeps.halving import HalvingSchedule, config_scores, promotions


def test_rungs_are_min_times_eta_powers_then_max():
    assert HalvingSchedule(min_epochs=5, eta=3, max_epochs=135).rungs == [5, 15, 45, 135]
    assert HalvingSchedule(min_epochs=5, eta=2, max_epochs=135).rungs == [5, 10, 20, 40, 80, 135]
    assert HalvingSchedule(min_epochs=5, eta=4, max_epochs=100).rungs == [5, 20, 80, 100]
    assert HalvingSchedule(min_epochs=10, eta=3, max_epochs=10).rungs == [10]
    assert HalvingSchedule(min_epochs=5, eta=3, max_epochs=135).rung_index(45) == 2
    with pytest.raises(ConfigError, match="schedule.eta"):
        HalvingSchedule(eta=1)
    with pytest.raises(ConfigError, match="schedule.min_epochs"):
        HalvingSchedule(min_epochs=200, max_epochs=100)


def test_a_configuration_is_judged_on_the_mean_of_its_folds_that_reached_the_rung():
    scores = config_scores({("lr=0.01", 0): 0.80, ("lr=0.01", 1): 0.70, ("lr=0.001", 0): 0.74})
    assert scores == {"lr=0.01": pytest.approx(0.75), "lr=0.001": pytest.approx(0.74)}


def test_promotion_is_the_top_floor_n_over_eta_without_waiting():
    three = {"a": 0.80, "b": 0.70, "c": 0.60}
    assert promotions(three, set(), eta=3, rung_closed=False) == ["a"]        # ⌊3/3⌋ = 1
    assert promotions({"b": 0.7, "c": 0.6}, set(), eta=3, rung_closed=False) == []  # ⌊2/3⌋ = 0: wait for more
    assert promotions({"b": 0.7, "c": 0.6}, set(), eta=3, rung_closed=True) == ["b"]  # nobody else will come
    six = {**three, "d": 0.90, "e": 0.50, "f": 0.40}
    assert promotions(six, {"a"}, eta=3, rung_closed=False) == ["d"]         # top ⌊6/3⌋ = {d, a}; a went already
    # A paused configuration is promoted later when enough worse ones have reported (asynchronous rule).
    assert promotions({"b": 0.7}, set(), eta=2, rung_closed=False) == []
    assert promotions({"b": 0.7, "c": 0.6}, set(), eta=2, rung_closed=False) == ["b"]


def test_simulation_counts_epochs_and_keeps_the_clear_best():
    # 3 configurations × 1 fold, rungs [1, 3] (eta 3): all train 1 epoch, the best of the 3 trains 2 more.
    curves = np.array([[[0.5, 0.6, 0.7]], [[0.6, 0.7, 0.8]], [[0.4, 0.5, 0.6]]])
    outcome = simulate(curves, HalvingSchedule(min_epochs=1, eta=3, max_epochs=3), workers=1)
    assert outcome.epochs_trained == 3 * 1 + 2 and outcome.kept == 1
    # 9 configurations × 2 folds, best first, one slot, rungs [1, 3, 9]: every configuration trains 1 epoch (18);
    # the first three reported are the top third at each count (c0 after 3 reports, c1 after 6, c2 after 9), so
    # 3 × 2 folds × 2 epochs (12); at rung 3 c0 is the top third of 3 (1 × 2 × 6 = 12): 42 of the grid's 162.
    quality = np.linspace(0.9, 0.5, 9)
    curves = np.repeat((quality[:, None] * np.linspace(0.5, 1, 9)[None, :])[:, None, :], 2, axis=1)
    outcome = simulate(curves, HalvingSchedule(min_epochs=1, eta=3, max_epochs=9), workers=1)
    assert outcome.epochs_trained == 42 and outcome.kept == 0


def _late_bloomer_curves() -> np.ndarray:
    """4 configurations × 1 fold over 135 epochs, by hand: at epoch 5 fast (pow3 0.72 − 0.1/t: 0.700) and steady
    (0.69) lead slow (pow3 0.90 − 1.2/t: 0.660); by epoch 10 slow leads (0.780 > 0.710) and it ends best (0.891 >
    0.719); flat stays at 0.40."""
    t = np.arange(1, 136, dtype=float)
    return np.array([[0.72 - 0.1 / t], [np.full_like(t, 0.69)], [0.90 - 1.2 / t], [np.full_like(t, 0.40)]])


def test_simulation_with_the_predicted_rule_keeps_the_late_bloomer_the_plain_rule_cuts():
    from brats_ugrip.bench.halving import predicted_ranker

    curves = _late_bloomer_curves()
    schedule = HalvingSchedule(min_epochs=5, eta=2, max_epochs=135)  # rungs 5, 10, 20, 40, 80, 135
    budgets = np.arange(1, 136, dtype=float)
    # Plain: ⌊4/2⌋ = 2 at epoch 5 are fast and steady; slow is cut and fast is kept.
    assert simulate(curves, schedule, workers=4).kept == 0
    # Predicted: at epoch 5 the top of each order (slow by prediction, fast by score) go on; at epoch 10 slow
    # leads on both, so it goes on alone (⌊2/2⌋ = 1) and is kept. Same cost: 4×5 + 2×5 + 10 + 20 + 40 + 55.
    predicted = simulate(curves, schedule, workers=4, rank=predicted_ranker(curves, schedule.rungs, budgets))
    assert predicted.kept == 2 and predicted.epochs_trained == 155


def test_recorded_curves_from_a_sweep_directory(tmp_path):
    from brats_ugrip.bench.halving import recorded_curves
    from brats_ugrip.errors import DataError
    from brats_ugrip.sweeps.layout import run_dir_path, sweep_db_path
    from brats_ugrip.sweeps.state import RunRecord, SweepState

    with SweepState(sweep_db_path(tmp_path)) as state:
        for lr in (0.1, 0.2):
            for fold in (0, 1):
                run_dir = run_dir_path(tmp_path, f"fold={fold}-lr={lr}")
                (run_dir / "csv").mkdir(parents=True)
                lines = ["epoch,step,train/loss,val/dice_mean", "0,10,0.9,", *(
                    f"{e},{e * 10},0.5,{lr + fold / 10 + e / 100}" for e in range(3 if lr == 0.1 else 4))]
                (run_dir / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
                state.add_runs([RunRecord(run_id=run_dir.name, run_dir=str(run_dir),
                                          params={"optim.lr": lr, "data.fold": fold}, config={}, submit={})])
    curves = recorded_curves(tmp_path)
    assert curves.shape == (2, 2, 3)  # cut at the shortest run (3 epochs)
    assert curves[1, 1].tolist() == pytest.approx([0.3, 0.31, 0.32])  # lr 0.2, fold 1, epochs 1–3
    with pytest.raises(DataError, match="no sweep.db"):
        recorded_curves(tmp_path / "runs")
    with pytest.raises(DataError, match="no such sweep directory"):
        recorded_curves(tmp_path / "missing")
