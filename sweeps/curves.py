"""Learning-curve extrapolation for successive halving: the score a configuration would reach at ``max_epochs``,
predicted from its curve so far (Domhan, Springenberg and Hutter, "Speeding up automatic hyperparameter
optimization of deep neural networks by extrapolation of learning curves", IJCAI 2015: an ensemble of parametric
curve models). Pure numpy; no fitting library, no state, no output.

Contract of :func:`predict_final` (``x`` the budgets seen, e.g. epochs; ``y`` the scores there, higher is better;
``horizon`` the budget to predict at):

- **Models** (with ``s = x / horizon`` so one grid of shapes serves any budget axis), each ``y = c − a·φ(s; θ)``:
  ``exp3`` ``φ = e^{−βs}``, ``pow3`` ``φ = s^{−α}``, ``janoschek`` ``φ = e^{−βs^δ}`` (δ ∈ {0.5, 2}: a slow or a
  sigmoid start) and ``mmf`` ``φ = 1 / (1 + (κs)^δ)`` (δ ∈ {1, 2}). The nonlinear shape θ runs over a fixed log-spaced grid;
  for each θ, ``(c, a)`` is the least-squares fit with ``a ≥ 0`` (rising or flat) and the asymptote ``c``
  bounded to the metric's range ``bounds`` (Dice: [0, 1]): an unbounded fit would let a still-rising curve
  promise any score.
- **Ensemble**: every (model, θ) is weighted by ``exp(−(SSE − SSE_min) / 2σ²)`` (a Gaussian likelihood whose
  noise ``σ`` is the best fit's residual, at least ``noise_floor``), times a uniform prior over each model's grid,
  times ``e^{−k}`` for a model's ``k`` parameters (the AIC's penalty). The prediction is the weighted
  ``quantile`` of the fits' values at ``horizon``, clipped to ``bounds``: an upper quantile is optimistic, so a
  slow but rising curve, whose future the points leave open, is not ranked below a fast one that has flattened.
- **Few points**: with fewer than :data:`MIN_POINTS` points (a fit of 2 + 1 parameters would be exact, so
  the likelihood would say nothing) the prediction is the last value (so the rule falls back to the plain one).
- A flat or falling curve is predicted at its level, the mean of its points (``a = 0`` at every θ).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MIN_POINTS = 3
QUANTILE = 0.8
NOISE_FLOOR = 0.005  # the per-point noise of a fold-mean validation Dice (~250 cases, a few folds)


@dataclass(frozen=True)
class Prediction:
    """A curve's predicted score at the horizon: ``value`` (the optimistic quantile, what the rule ranks on),
    ``median`` of the ensemble, ``last`` observed score, the number of points and the method
    (``"ensemble"`` or ``"last value"``)."""

    value: float
    median: float
    last: float
    n_points: int
    method: str

    def to_dict(self) -> dict[str, float | int | str]:
        return {"predicted": round(self.value, 4), "median": round(self.median, 4), "last": round(self.last, 4),
                "points": self.n_points, "method": self.method}


_RATES = np.logspace(-1, 2.5, 36)      # exp/janoschek β: from nearly linear over the horizon to saturated at once
_POWERS = np.logspace(-2, 1, 36)       # pow3 α
_KAPPAS = np.logspace(-0.5, 2.5, 24)   # mmf κ (1/κ: the budget, as a fraction of the horizon, of half the rise)


def _bases(s: np.ndarray) -> list[tuple[str, int, np.ndarray]]:
    """Each model's φ over its θ grid, as (name, parameters, φ[θ, point]); ``s`` in (0, 1], the horizon at 1."""
    s = s[None, :]
    jan = [np.exp(-_RATES[:, None] * s ** delta) for delta in (0.5, 2.0)]
    mmf = [1.0 / (1.0 + (_KAPPAS[:, None] * s) ** delta) for delta in (1.0, 2.0)]
    return [("exp3", 3, np.exp(-_RATES[:, None] * s)), ("pow3", 3, s ** -_POWERS[:, None]),
            ("janoschek", 4, np.concatenate(jan)), ("mmf", 4, np.concatenate(mmf))]


def _fit(phi: np.ndarray, y: np.ndarray, bounds: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares of ``y ≈ c − a·φ`` for every row of ``φ``, with ``a ≥ 0`` (every model rises or stays
    flat: a curve that falls is noise or overfitting, not a trend to extrapolate) and ``c`` within ``bounds``:
    (c, a, SSE) per row.

    The objective is a convex quadratic in (c, a), so its minimum over that box is the free minimum when
    feasible, else on an edge: each edge's one-dimensional minimum has a closed form; the least SSE wins."""
    n = y.size
    sp, spp, sy, spy = phi.sum(1), (phi * phi).sum(1), y.sum(), phi @ y
    det = n * spp - sp * sp
    ok = det > 1e-12 * np.maximum(1.0, spp * n)  # a φ constant over the points cannot be told from c
    safe = np.where(ok, det, 1.0)
    free_c = np.where(ok, (spp * sy - sp * spy) / safe, np.nan)
    free_a = np.where(ok, (sp * sy - n * spy) / safe, np.nan)
    inside = ok & (free_a >= 0) & (free_c >= bounds[0]) & (free_c <= bounds[1])
    spp_safe = np.where(spp > 0, spp, 1.0)
    candidates = [(np.where(inside, free_c, bounds[0]), np.where(inside, free_a, 0.0), inside),
                  (np.full_like(sp, np.clip(sy / n, *bounds)), np.zeros_like(sp), np.ones_like(ok))]
    for bound in bounds:  # c on a bound, a ≥ 0 at its best for that c
        candidates.append((np.full_like(sp, bound), np.maximum(0.0, (bound * sp - spy) / spp_safe), np.ones_like(ok)))
    best_c, best_a, best_sse = None, None, None
    for c, a, feasible in candidates:
        residual = y[None, :] - (c[:, None] - a[:, None] * phi)
        sse = np.where(feasible, (residual * residual).sum(1), np.inf)
        if best_sse is None:
            best_c, best_a, best_sse = c, a, sse
        else:
            better = sse < best_sse
            best_c, best_a, best_sse = (np.where(better, c, best_c), np.where(better, a, best_a),
                                        np.where(better, sse, best_sse))
    return best_c, best_a, best_sse


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][min(np.searchsorted(cumulative, q * cumulative[-1]), values.size - 1)])


def predict_final(x: Sequence[float], y: Sequence[float], horizon: float, quantile: float = QUANTILE,
                  bounds: tuple[float, float] = (0.0, 1.0), noise_floor: float = NOISE_FLOOR) -> Prediction:
    """The score at ``horizon`` predicted from the points ``(x, y)`` (see the module docstring)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    if x.size == 0:
        return Prediction(float("nan"), float("nan"), float("nan"), 0, "none")
    order = np.argsort(x)
    x, y = x[order], y[order]
    last = float(y[-1])
    if x.size < MIN_POINTS or x[-1] >= horizon:
        return Prediction(last, last, last, int(x.size), "last value")
    finals, sses, log_priors = [], [], []
    for (_, k, phi), (_, _, phi_h) in zip(_bases(x / horizon), _bases(np.ones(1))):
        c, a, sse = _fit(phi, y, bounds)
        finals.append(c - a * phi_h[:, 0])
        sses.append(sse)
        log_priors.append(np.full(phi.shape[0], -np.log(phi.shape[0]) - k))
    final, sse, log_prior = (np.concatenate(v) for v in (finals, sses, log_priors))
    dof = max(x.size - MIN_POINTS, 1)  # c, a and a shape are fitted: the residual of n points has n − 3 degrees
    # The noise is the best fit's residual, floored: a near-exact fit of few points would make the likelihood
    # single out one shape and hide how open the curve's future still is.
    sigma2 = max(float(sse.min()) / dof, noise_floor ** 2)
    log_w = log_prior - (sse - sse.min()) / (2 * sigma2)
    weights = np.exp(log_w - log_w.max())
    final = np.clip(final, *bounds)
    return Prediction(_weighted_quantile(final, weights, quantile), _weighted_quantile(final, weights, 0.5), last,
                      int(x.size), "ensemble")


def fold_mean_curve(folds: Sequence[Mapping[int, float]], up_to: int) -> tuple[list[int], list[float]]:
    """The mean over folds of each budget ``≤ up_to`` that every fold has a score at (budget → score per fold):
    a configuration is judged on its folds together, as the plain rule does, and a budget some fold lacks would
    mix different folds into one curve."""
    if not folds:
        return [], []
    common = sorted(set.intersection(*(set(b for b in fold if b <= up_to) for fold in folds)))
    return common, [float(np.mean([fold[b] for fold in folds])) for b in common]
