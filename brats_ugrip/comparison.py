"""Candidates compared as BraTS ranks them, with paired confidence intervals and significance tests.

Contract: :func:`compare` takes the per-case scores of several candidates (models, soups, ensembles, prediction
folders) on **one** set of labelled cases and returns a :class:`Comparison`; :func:`markdown` renders it. Nothing
here prints, reads files or imports torch; the same inputs and seed always give the same output.

- **BraTS ranking** (the challenges' "rank then aggregate" scheme): for every case and every metric the candidates
  are ranked (1 = best; Dice-like scores higher is better, any metric with ``hd95`` in its name lower is better;
  tied candidates share the mean of the ranks they span; a missing or NaN score ranks last). A candidate's mean
  rank is the mean of its ranks over all cases and metrics. The metric set is the challenge's: lesion-wise Dice and
  HD95 of each region (``lw_dice_*``, ``lw_hd95_*``) when every candidate has them, else the region Dice and HD95
  (``dice_*``, ``hd95_*``).
- **Per metric**: mean and median over cases.
- **Difference to a baseline** (default: the best single model, by mean primary score): the per-case difference of
  the *primary score* (mean over regions of the Dice metrics used for ranking, per case; higher is better),
  candidate minus baseline. Its 95 % interval is a paired percentile bootstrap (cases resampled with replacement,
  ``resamples`` times, seeded); its p-value a paired sign-flip permutation test of the mean difference (two-sided;
  exact over all 2^n sign patterns when 2^n ≤ ``resamples``, otherwise ``resamples`` seeded random patterns with
  p = (1 + hits) / (1 + resamples)).
- **Verdict**: "better" / "worse than the baseline" only when the interval excludes 0 **and** the permutation
  p-value is below 1 − level (0.05); otherwise "not distinguishable on N cases". Both are asked for because the
  percentile bootstrap is too narrow on a handful of cases (three cases that all improve give an interval above
  0), while the exact permutation test cannot go below 2 / 2^n (0.25 on three cases): a few cases never decide.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from brats_ugrip.errors import DataError

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
LEVEL = 0.95
_CHUNK = 1_000  # bootstrap resamples drawn at once: bounded memory for thousands of cases

CaseScores = Mapping[str, Mapping[str, float]]
"""``{case_id: {metric: value}}`` of one candidate."""


@dataclass(frozen=True)
class Candidate:
    """One candidate's per-case scores; ``kind`` is ``single`` (one model), ``soup``, ``ensemble`` or ``other``."""

    name: str
    scores: CaseScores
    kind: str = "single"


@dataclass(frozen=True)
class Interval:
    """A confidence interval of a mean difference."""

    low: float
    high: float
    level: float = LEVEL

    def contains_zero(self) -> bool:
        return self.low <= 0.0 <= self.high


@dataclass(frozen=True)
class CandidateResult:
    """What the comparison says of one candidate (``difference``/``interval``/``p_value`` are None for the baseline)."""

    name: str
    kind: str
    mean_rank: float
    means: dict[str, float]
    medians: dict[str, float]
    primary_mean: float
    difference: float | None
    interval: Interval | None
    p_value: float | None
    verdict: str


@dataclass(frozen=True)
class Comparison:
    """The whole comparison: candidates best mean rank first, and how it was computed.

    ``ranks[c, i, m]`` is candidate ``c``'s (in input order, ``order``) rank on case ``i`` for metric ``m``."""

    candidates: list[CandidateResult]
    baseline: str
    case_ids: list[str]
    metrics: list[str]
    primary: list[str]
    resamples: int
    seed: int
    permutation: str
    ranks: np.ndarray = field(repr=False)
    order: list[str] = field(default_factory=list)

    @property
    def n_cases(self) -> int:
        return len(self.case_ids)

    @property
    def method(self) -> str:
        """One sentence on how the numbers were computed, for every output."""
        return (f"BraTS ranking: rank per case and metric ({', '.join(self.metrics)}; HD95 lower is better, ties "
                f"share the mean rank), then the mean rank. Δ = per-case difference of the mean of "
                f"{', '.join(self.primary)} to `{self.baseline}`; 95 % interval: paired percentile bootstrap over "
                f"the {self.n_cases} cases, {self.resamples} resamples, seed {self.seed}; p: paired sign-flip "
                f"permutation test, {self.permutation}.")

    def result(self, name: str) -> CandidateResult:
        return next(c for c in self.candidates if c.name == name)


def lower_is_better(metric: str) -> bool:
    """HD95 (a distance) is better when lower; every other score (Dice, F1, ...) when higher."""
    return "hd95" in metric.split("_")


def brats_ranks(values: np.ndarray, metrics: Sequence[str]) -> np.ndarray:
    """Ranks ``(candidates, cases, metrics)`` of scores of the same shape: 1 = best per case and metric, ties share
    the mean rank, NaN ranks last (a missing prediction is the worst, as the challenges score it)."""
    # scipy.stats is imported here, not at the top: commands' --help imports this module and must stay fast
    # (and scipy.stats probes for torch, which --help never imports).
    from scipy.stats import rankdata

    signed = np.array(values, dtype=np.float64)
    for m, metric in enumerate(metrics):
        if not lower_is_better(metric):
            signed[:, :, m] = -signed[:, :, m]  # rank ascending: the best gets 1
    signed = np.where(np.isnan(signed), np.inf, signed)
    return rankdata(signed, method="average", axis=0)


def paired_bootstrap(differences: Sequence[float], resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                     level: float = LEVEL) -> Interval | None:
    """Percentile bootstrap interval of the mean of paired differences (cases resampled with replacement); None
    with fewer than 2 differences (no spread to resample)."""
    diff = np.asarray(differences, dtype=np.float64)
    if diff.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        means.append(diff[rng.integers(0, diff.size, (size, diff.size))].mean(axis=1))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(np.concatenate(means), [tail, 1.0 - tail])
    return Interval(float(low), float(high), level)


def sign_flip_p_value(differences: Sequence[float], resamples: int = DEFAULT_RESAMPLES,
                      seed: int = DEFAULT_SEED) -> tuple[float, str]:
    """Two-sided p-value of a paired sign-flip permutation test of the mean difference, and how it was computed
    (exact enumeration of the 2^n sign patterns when 2^n ≤ ``resamples``, else seeded Monte Carlo)."""
    diff = np.asarray(differences, dtype=np.float64)
    observed = abs(diff.mean())
    # A tolerance so that patterns equal to the observed mean up to rounding count as "as extreme".
    tolerance = 1e-12 * max(1.0, float(np.abs(diff).max(initial=0.0)))
    if 2 ** diff.size <= resamples:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=diff.size)))
        hits = int((np.abs(signs @ diff / diff.size) >= observed - tolerance).sum())
        return hits / len(signs), f"exact over all {len(signs)} sign patterns"
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, _CHUNK):
        signs = rng.choice((1.0, -1.0), size=(min(_CHUNK, resamples - start), diff.size))
        hits += int((np.abs(signs @ diff / diff.size) >= observed - tolerance).sum())
    return (1 + hits) / (1 + resamples), f"{resamples} random sign patterns, seed {seed}"


def challenge_metrics(candidates: Sequence[Candidate]) -> list[str]:
    """The ranking's metrics: lesion-wise Dice and HD95 when every candidate has them on every case, else region
    Dice and HD95; Dice before HD95, regions in the order first seen."""
    common = None
    for candidate in candidates:
        for row in candidate.scores.values():
            common = set(row) if common is None else common & set(row)
    common = common or set()
    for prefix in ("lw_", ""):
        found = sorted((m for m in common if m.startswith(f"{prefix}dice_") or m.startswith(f"{prefix}hd95_")),
                       key=lambda m: (lower_is_better(m), m))
        found = [m for m in found if m.split("_")[-1] != "mean" and (prefix or not m.startswith("lw_"))]
        if found:
            return found
    raise DataError("the candidates share no Dice or HD95 score to rank on")


def _values(candidates: Sequence[Candidate], case_ids: list[str], metrics: list[str]) -> np.ndarray:
    values = np.full((len(candidates), len(case_ids), len(metrics)), np.nan)
    for c, candidate in enumerate(candidates):
        for i, case_id in enumerate(case_ids):
            row = candidate.scores.get(case_id, {})
            values[c, i] = [float(row[m]) if row.get(m) is not None else math.nan for m in metrics]
    return values


def _case_ids(candidates: Sequence[Candidate]) -> list[str]:
    sets = {candidate.name: set(candidate.scores) for candidate in candidates}
    union = set().union(*sets.values())
    for name, ids in sets.items():
        if ids != union:
            missing = sorted(union - ids)
            raise DataError(f"candidate {name!r} has no scores for {len(missing)} case(s) (e.g. {missing[0]}); "
                            "every candidate must be scored on the same cases")
    return sorted(union)


def _baseline(candidates: Sequence[Candidate], primary: np.ndarray, baseline: str | None) -> int:
    names = [c.name for c in candidates]
    if baseline is not None:
        if baseline not in names:
            raise DataError(f"baseline {baseline!r} is not a candidate; choose one of {names}")
        return names.index(baseline)
    singles = [c for c, candidate in enumerate(candidates) if candidate.kind == "single"] or list(range(len(names)))
    means = np.nanmean(primary, axis=1)
    return max(singles, key=lambda c: (means[c], -c))  # the best single model; the first of equals


def _verdict(interval: Interval | None, p_value: float, n: int) -> str:
    if interval is None or interval.contains_zero() or p_value >= 1.0 - interval.level:
        return f"not distinguishable on {n} case{'s' if n != 1 else ''}"
    return "better than the baseline" if interval.low > 0 else "worse than the baseline"


def compare(candidates: Sequence[Candidate], baseline: str | None = None, metrics: Sequence[str] | None = None,
            resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Comparison:
    """Compare ``candidates`` on their common cases (see the module docstring).

    Args:
        baseline: the candidate differences are taken to; default the best single model.
        metrics: the metrics to rank on; default :func:`challenge_metrics`.

    Raises:
        DataError: fewer than two candidates, duplicate names, cases scored for some candidates only, or no
            shared Dice/HD95 score.
    """
    names = [c.name for c in candidates]
    if len(candidates) < 2 or len(set(names)) != len(names):
        raise DataError(f"a comparison needs at least two candidates with distinct names; got {names}")
    case_ids = _case_ids(candidates)
    metrics = list(metrics or challenge_metrics(candidates))
    values = _values(candidates, case_ids, metrics)
    ranks = brats_ranks(values, metrics)
    primary_metrics = [m for m in metrics if not lower_is_better(m)]
    if not primary_metrics:
        raise DataError(f"no Dice-like metric among {metrics} to take differences of")
    # A missing Dice counts as 0, as a missing prediction is scored.
    primary = np.nan_to_num(values[:, :, [metrics.index(m) for m in primary_metrics]], nan=0.0).mean(axis=2)
    base = _baseline(candidates, primary, baseline)
    permutation = ""
    results = []
    for c, candidate in enumerate(candidates):
        difference = interval = p_value = None
        verdict = "baseline"
        if c != base:
            diff = primary[c] - primary[base]
            difference = float(diff.mean())
            interval = paired_bootstrap(diff, resamples, seed)
            p_value, permutation = sign_flip_p_value(diff, resamples, seed)
            verdict = _verdict(interval, p_value, len(case_ids))
        results.append(CandidateResult(
            candidate.name, candidate.kind, float(ranks[c].mean()),
            {m: float(np.nanmean(values[c, :, k])) for k, m in enumerate(metrics)},
            {m: float(np.nanmedian(values[c, :, k])) for k, m in enumerate(metrics)},
            float(primary[c].mean()), difference, interval, p_value, verdict))
    results.sort(key=lambda r: (r.mean_rank, names.index(r.name)))
    return Comparison(results, names[base], case_ids, metrics, primary_metrics, resamples, seed, permutation, ranks,
                      names)


def _number(value: float, digits: int) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def markdown(comparison: Comparison, title: str | None = None, digits: int = 4) -> str:
    """A Markdown table, best mean rank first: mean rank, mean (median) of every metric, Δ to the baseline with its
    interval, p-value and verdict; then the method line."""
    header = ["#", "candidate", "mean rank", *comparison.metrics, "Δ primary [95 % CI]", "p", "verdict"]
    lines = [f"{title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for position, result in enumerate(comparison.candidates, 1):
        cells = [f"{_number(result.means[m], digits if not lower_is_better(m) else 2)} "
                 f"({_number(result.medians[m], digits if not lower_is_better(m) else 2)})" for m in comparison.metrics]
        if result.difference is None:
            delta, p_value = "baseline", "–"
        else:
            interval = result.interval
            bounds = (f" [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]" if interval is not None
                      else " [no interval]")
            delta, p_value = f"{result.difference:+.{digits}f}{bounds}", f"{result.p_value:.3g}"
        lines.append("| " + " | ".join([str(position), result.name.replace("|", "\\|"), f"{result.mean_rank:.2f}",
                                        *cells, delta, p_value, result.verdict]) + " |")
    lines += ["", f"Metric cells: mean (median) over the {comparison.n_cases} cases. {comparison.method}"]
    return "\n".join(lines) + "\n"
