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

Config = Hashable


@dataclass(frozen=True)
class HalvingSchedule:
    """The grid's ``schedule:`` section (kind ``asha``)."""

    metric: str = "val/dice_mean"
    min_epochs: int = 5
    eta: int = 3
    max_epochs: int = 135

    def __post_init__(self) -> None:
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
                "max_epochs": self.max_epochs}

    @classmethod
    def from_dict(cls, raw: Any, val_every: int = 1) -> HalvingSchedule:
        """The grid's ``schedule:`` mapping, validated (a :class:`ConfigError` names ``schedule.<key>``).

        Every rung must be a multiple of ``val_every`` (the runs' ``trainer.val_every``): a run is judged on the
        validation at its rung's last epoch, so one must happen there.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError("schedule", f"expected a mapping like {{kind: asha, metric: val/dice_mean, "
                                          f"min_epochs: 5, eta: 3, max_epochs: 135}}, got {raw!r}")
        unknown = sorted(set(raw) - {"kind", "metric", "min_epochs", "eta", "max_epochs"})
        if unknown:
            raise ConfigError(f"schedule.{unknown[0]}", "unknown key; a schedule has kind, metric, min_epochs, eta "
                                                        "and max_epochs")
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
        schedule = cls(metric=metric, **values)
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


def promotions(scores: Mapping[Config, float], promoted: set[Config], eta: int, rung_closed: bool) -> list[Config]:
    """Configurations of one rung to promote now, best first.

    Args:
        scores: each configuration that reached the rung → its score there.
        promoted: configurations already promoted from this rung (never promoted twice).
        eta: the reduction factor.
        rung_closed: no configuration can still reach this rung (then at least one goes on).
    """
    ranked = sorted(scores, key=lambda config: (-scores[config], str(config)))
    quota = len(ranked) // eta
    if rung_closed:
        quota = max(1, quota)
    return [config for config in ranked[:quota] if config not in promoted]
