"""Each greedy soup step's gain with its confidence interval, and the optional rule that keeps an ingredient only
when that interval lies above 0.

Contract: a :class:`GainTracker` is given the current soup's per-case selection scores (mean Dice over regions per
case) and, for every candidate soup in turn, the candidate's; it returns the step's :class:`StepGain` (mean
per-case gain, paired bootstrap 95 % interval and sign-flip p-value of :mod:`brats_ugrip.comparison`, fixed seed)
and, told whether the candidate was kept, moves the current soup on. :meth:`GainTracker.significant` is the
``--significant-gain`` rule: keep a candidate only when its interval's lower bound is > 0. It is off by default:
*Model soups*' rule (keep when the held-out score does not fall) stays the default, as the paper's. Gains are
measured on the selection cases, the ones that choose the soup, so they are optimistic.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from brats_ugrip.comparison import DEFAULT_RESAMPLES, DEFAULT_SEED, Interval, paired_bootstrap, sign_flip_p_value
from brats_ugrip.labels import REGIONS

PerCase = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class StepGain:
    """The candidate soup minus the current soup, per case: mean, 95 % interval (None with < 2 cases), p-value."""

    gain: float
    interval: Interval | None
    p_value: float


def case_means(per_case: PerCase, case_ids: Sequence[str]) -> np.ndarray:
    """Mean Dice over the regions of each case, in ``case_ids`` order (the selection score, case by case)."""
    return np.array([np.mean([per_case[c][f"dice_{r}"] for r in REGIONS]) for c in case_ids], dtype=np.float64)


class GainTracker:
    """The current soup's per-case scores and each step's gain over them (see the module docstring)."""

    def __init__(self, first: PerCase, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED):
        self.case_ids = sorted(first)
        self.current = case_means(first, self.case_ids)
        self.resamples, self.seed = resamples, seed
        self.gains: list[StepGain] = []
        self._candidate: np.ndarray | None = None

    def measure(self, candidate: PerCase) -> StepGain:
        """The gain of a candidate soup over the current one (recorded in :attr:`gains`)."""
        self._candidate = case_means(candidate, self.case_ids)
        diff = self._candidate - self.current
        gain = StepGain(float(diff.mean()), paired_bootstrap(diff, self.resamples, self.seed),
                        sign_flip_p_value(diff, self.resamples, self.seed)[0])
        self.gains.append(gain)
        return gain

    def kept(self, kept: bool) -> None:
        """The last measured candidate stayed in the soup (it becomes the current soup) or not."""
        if kept and self._candidate is not None:
            self.current = self._candidate

    def significant(self) -> bool:
        """The last step's interval lies above 0 (needs at least 2 cases)."""
        interval = self.gains[-1].interval
        return interval is not None and interval.low > 0

    @property
    def method(self) -> str:
        return (f"gain = candidate soup minus current soup, mean Dice per selection case; 95 % interval: paired "
                f"bootstrap over the {len(self.case_ids)} cases, {self.resamples} resamples, seed {self.seed}")


def gain_cell(gain: StepGain | None) -> str:
    """``+0.0034 [-0.0010, +0.0080]`` for a report table (– for the first ingredient)."""
    if gain is None:
        return "–"
    if gain.interval is None:
        return f"{gain.gain:+.4f} [no interval]"
    return f"{gain.gain:+.4f} [{gain.interval.low:+.4f}, {gain.interval.high:+.4f}]"


def gain_record(gain: StepGain) -> dict[str, float | None]:
    """A step's gain as JSON-ready numbers, for the soup's metadata."""
    interval = gain.interval
    return {"gain": gain.gain, "low": interval.low if interval else None, "high": interval.high if interval else None,
            "p_value": gain.p_value}
