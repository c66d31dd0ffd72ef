"""Asynchronous successive halving (ASHA; Li et al., "A System for Massively Parallel Hyperparameter Tuning",
MLSys 2020) over a grid's configurations: which runs go on to the next rung, decided from scores alone.

A grid's ``schedule: {kind: asha, metric: val/dice_mean, min_epochs: 5, eta: 3, max_epochs: 135}`` trains every
configuration to the first rung, then only the best. The rules, here and nowhere else:

- **Rungs** are at ``min_epochs × eta^k`` epochs while below ``max_epochs``, and ``max_epochs`` is the last one.
- **A configuration** is a run's varied parameters except the fold. Its folds are judged together: its score at a
  rung is the mean over the folds that reached that rung. Promoting a configuration promotes all its folds, so
  cross-validation and soups still have every fold.
- **Promotion** (ASHA's rule, no waiting for stragglers): a configuration that reached rung ``k`` goes on when it is
  in the top ``⌊n_k / eta⌋`` of the ``n_k`` configurations that have reached rung ``k`` so far. One that is not
  stays paused at its rung, and may still be promoted later, when more configurations have reported.
- **The end of a rung**: once no configuration can still reach rung ``k`` (none is training below it), the top
  ``max(1, ⌊n_k / eta⌋)`` go on, so at least one configuration always reaches ``max_epochs``.
- **What is ranked** (``promote:``): ``score`` (the default, ASHA's own rule) ranks on the score reached at the
  rung. ``predicted`` also predicts each configuration's score at ``max_epochs`` from its fold-mean curve up to
  the rung (:func:`brats_ugrip.sweeps.curves.predict_final`, an optimistic quantile of an ensemble of parametric
  curve models), and ranks a configuration at the *better* of its two places, by prediction and by score
  reached (:func:`predicted_ranking`): the quota goes alternately to the best predicted and the best so far, so
  a slow starter that would end best is not cut at the first rung, and neither is a leader whose curve the
  models misread (ranking on the prediction alone loses to the plain rule on lcdb's real curves; README). The
  quota and the closing rule are the same for both; only the order differs.

Scores are "higher is better" (Dice); for a loss, pass its negative. Everything here is a pure function of the
scores it is given: the monitor stores scores and promotions in ``sweep.db`` and calls :func:`promotions` on each
poll, so a monitor killed and restarted makes every promotion once (a promotion, once recorded, is never undone).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from brats_ugrip.errors import ConfigError
from brats_ugrip.sweeps.curves import Prediction, fold_mean_curve, predict_final

Config = Hashable
PROMOTE_RULES = ("score", "predicted")


@dataclass(frozen=True)
class HalvingSchedule:
    """The grid's ``schedule:`` section (kind ``asha``)."""

    metric: str = "val/dice_mean"
    min_epochs: int = 5
    eta: int = 3
    max_epochs: int = 135
    promote: str = "score"

    def __post_init__(self) -> None:
        if self.promote not in PROMOTE_RULES:
            raise ConfigError("schedule.promote", f"expected one of {', '.join(PROMOTE_RULES)} (rank at a rung on the "
                                                  f"score reached, or on the score predicted at max_epochs), got "
                                                  f"{self.promote!r}")
        if self.eta < 2:
            raise ConfigError("schedule.eta", f"must be ≥ 2 (the fraction 1/eta goes on at each rung), got {self.eta}")
        if not 1 <= self.min_epochs <= self.max_epochs:
            raise ConfigError("schedule.min_epochs", f"must be between 1 and max_epochs ({self.max_epochs}), "
                              f"got {self.min_epochs}")

    @property
    def rungs(self) -> list[int]:
        """Epoch counts at which runs stop and report: ``min_epochs × eta^k`` below ``max_epochs``, then it."""
        epochs, rungs = self.min_epochs, []
        while epochs < self.max_epochs:
            rungs.append(epochs)
            epochs *= self.eta
        return rungs + [self.max_epochs]

    def rung_index(self, epochs: int) -> int | None:
        """The rung that ends at ``epochs`` (None when no rung does)."""
        return self.rungs.index(epochs) if epochs in self.rungs else None

    def next_rung(self, epochs: int) -> int:
        """The first rung after ``epochs`` completed epochs: where a run that has trained ``epochs`` stops next."""
        return next((rung for rung in self.rungs if rung > epochs), self.max_epochs)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "asha", "metric": self.metric, "min_epochs": self.min_epochs, "eta": self.eta,
                "max_epochs": self.max_epochs, "promote": self.promote}

    @classmethod
    def from_dict(cls, raw: Any, val_every: int = 1) -> HalvingSchedule:
        """The grid's ``schedule:`` mapping, validated (a :class:`ConfigError` names ``schedule.<key>``).

        Every rung must be a multiple of ``val_every`` (the runs' ``trainer.val_every``): a run is judged on the
        validation at its rung's last epoch, so one must happen there.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError("schedule", f"expected a mapping like {{kind: asha, metric: val/dice_mean, "
                                          f"min_epochs: 5, eta: 3, max_epochs: 135}}, got {raw!r}")
        unknown = sorted(set(raw) - {"kind", "metric", "min_epochs", "eta", "max_epochs", "promote"})
        if unknown:
            raise ConfigError(f"schedule.{unknown[0]}", "unknown key; a schedule has kind, metric, min_epochs, eta, "
                                                        "max_epochs and promote")
        if raw.get("kind") != "asha":
            raise ConfigError("schedule.kind", f"expected asha (asynchronous successive halving), got "
                                               f"{raw.get('kind')!r}")
        metric = raw.get("metric", cls.metric)
        if not isinstance(metric, str) or not metric.startswith("val/dice_"):
            raise ConfigError("schedule.metric", f"expected a validation Dice logged by training, e.g. val/dice_mean "
                                                 f"or val/dice_et, got {metric!r}")
        values = {}
        for key in ("min_epochs", "eta", "max_epochs"):
            value = raw.get(key, getattr(cls, key))
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"schedule.{key}", f"expected a positive integer, got {value!r}")
            values[key] = value
        schedule = cls(metric=metric, promote=raw.get("promote", cls.promote), **values)
        off = [rung for rung in schedule.rungs if rung % val_every]
        if off:
            raise ConfigError("schedule.min_epochs", f"rungs {schedule.rungs} must be multiples of trainer.val_every "
                                                     f"({val_every}) so that each has a validation score; {off} are not")
        return schedule


def config_scores(fold_scores: Mapping[tuple[Config, int], float]) -> dict[Config, float]:
    """Score of each configuration at one rung: the mean over its folds that reached it (``(config, fold) → score``)."""
    sums: dict[Config, list[float]] = {}
    for (config, _), score in fold_scores.items():
        sums.setdefault(config, []).append(score)
    return {config: math.fsum(scores) / len(scores) for config, scores in sums.items()}


def promotions(scores: Mapping[Config, float], promoted: set[Config], eta: int, rung_closed: bool,
               tiebreak: Mapping[Config, float] | None = None) -> list[Config]:
    """Configurations of one rung to promote now, best first.

    Args:
        scores: each configuration that reached the rung → what it is ranked on (its score there, or predicted).
        promoted: configurations already promoted from this rung (never promoted twice).
        eta: the reduction factor.
        rung_closed: no configuration can still reach this rung (then at least one goes on).
        tiebreak: what decides between equal ``scores`` (the score reached, where predictions hit the metric's
            bound together), before the configuration's name.
    """
    tiebreak = tiebreak or {}
    ranked = sorted(scores, key=lambda config: (-scores[config], -tiebreak.get(config, 0.0), str(config)))
    quota = len(ranked) // eta
    if rung_closed:
        quota = max(1, quota)
    return [config for config in ranked[:quota] if config not in promoted]


def predicted_scores(fold_scores: Mapping[tuple[Config, int], float],
                     fold_curves: Mapping[tuple[Config, int], Mapping[int, float]], rung_epochs: int,
                     max_epochs: int) -> dict[Config, Prediction]:
    """Each configuration's predicted score at ``max_epochs`` from the mean curve, up to ``rung_epochs``, of its
    folds that reached the rung (those in ``fold_scores``; a fold's curve is epoch → score). A configuration
    whose folds have no recorded curve is predicted at its rung score (the plain rule's value)."""
    folds: dict[Config, list[Mapping[int, float]]] = {}
    for config, fold in fold_scores:
        folds.setdefault(config, []).append(fold_curves.get((config, fold)) or {})
    reached = config_scores(fold_scores)
    predictions = {}
    for config, curves in folds.items():
        epochs, values = fold_mean_curve(curves, rung_epochs)
        if epochs and epochs[-1] != rung_epochs:  # the curve must end at the rung, where the folds were scored
            epochs, values = [], []
        prediction = predict_final(epochs, values, max_epochs)
        if prediction.n_points == 0:
            prediction = Prediction(reached[config], reached[config], reached[config], 0, "rung score")
        predictions[config] = prediction
    return predictions


def predicted_ranking(predicted: Mapping[Config, float], reached: Mapping[Config, float]) -> dict[Config, float]:
    """The ``promote: predicted`` order as scores for :func:`promotions` (higher first): a configuration's place
    is the better of its place by ``predicted`` (ties: by ``reached``) and its place by ``reached``; equal best
    places are decided by the other place, then by the score reached (evidence before extrapolation: where the
    quota is one, the leader on both counts goes first). So the top ``m`` hold the top ``⌊m/2⌋`` of each order,
    or more."""
    by_predicted = sorted(predicted, key=lambda c: (-predicted[c], -reached[c], str(c)))
    by_reached = sorted(reached, key=lambda c: (-reached[c], str(c)))
    place_p = {c: i for i, c in enumerate(by_predicted)}
    place_r = {c: i for i, c in enumerate(by_reached)}
    n = len(place_p) + 1
    return {c: -(min(place_p[c], place_r[c]) + (max(place_p[c], place_r[c]) + place_r[c] / n) / n) for c in place_p}


def ranking_scores(schedule: HalvingSchedule, rung: int, fold_scores: Mapping[tuple[Config, int], float],
                   fold_curves: Mapping[tuple[Config, int], Mapping[int, float]] | None = None) -> dict[Config, float]:
    """What :func:`promotions` ranks at rung index ``rung`` under the schedule's ``promote`` rule: the mean score
    reached (``score``), or :func:`predicted_ranking` of the predictions (``predicted``; see
    :func:`predicted_scores`)."""
    reached = config_scores(fold_scores)
    if schedule.promote == "score":
        return reached
    predictions = predicted_scores(fold_scores, fold_curves or {}, schedule.rungs[rung], schedule.max_epochs)
    return predicted_ranking({config: p.value for config, p in predictions.items()}, reached)
