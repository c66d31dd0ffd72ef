"""Choosing an ensemble's weights, thresholds and post-processing on a held-out fold.

Methods (``--method``):

* ``equal``: every weight 1.
* ``dice``: ``w_nc`` = model n's held-out Dice on region c (the model alone, at its own threshold).
* ``fitted``: per region, a grid search over the weight simplex × thresholds that maximises the held-out Dice.

Every held-out case is read and preprocessed once (:class:`~brats_ugrip.heldout.HeldOutSet`) and predicted once by
every model. The predictions are cached where they can matter: per case and region, the voxels where at least one
model's probability reaches ``floor`` (the lowest threshold ever evaluated), with every model's probability there.
Elsewhere every weighted average is below every threshold, so the prediction is negative whatever the weights: the
cache scores any candidate exactly, with no further inference. A batch of K weight vectors × L thresholds costs one
matrix product and one histogram per case.

The label map makes ET part of TC and TC part of WT (the innermost region wins), so regions are fitted inside out:
ET first, then TC counting the voxels the fitted ET predicts as TC, then WT counting both: each step maximises the
Dice of its region as it will be written.

Guarantee: the fitted ensemble is compared on the fitting cases, through the whole pipeline (labels), with each
model alone (its own threshold); if a model alone scores higher its weights are kept instead, so a fitted ensemble
never scores below the best single model on the fitting data.

Post-processing, as nnU-Net does: each rule (component size for WT, then TC, then ET; then ET→NETC) is tried with
a few sizes on the held-out cases on top of the rules already kept, and kept only if it raises the mean Dice.

Scores on the fitting cases are *selection* scores (optimistic); ``test`` scores come from cases not used for
fitting (``--test-fold``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import Any

import numpy as np
import torch

from brats_ugrip.ensembling.predict import Ensemble, LoadedMember
from brats_ugrip.ensembling.spec import EnsembleSpec
from brats_ugrip.heldout import HeldOutScore, HeldOutSet
from brats_ugrip.labels import REGIONS, LabelScheme, get_scheme
from brats_ugrip.metrics.regions import bounding_box, label_map_scores
from brats_ugrip.postprocess import PostProcessing, labels_from_probabilities
from brats_ugrip.progress import tracked

METHODS: tuple[str, ...] = ("fitted", "dice", "equal")
THRESHOLDS: tuple[float, ...] = tuple(round(0.1 + 0.05 * i, 2) for i in range(17))
"""Thresholds searched by the fitted method: 0.1, 0.15, …, 0.9."""
RESOLUTION = 10
"""Finest simplex step searched: weights in multiples of 1/10."""
MAX_CANDIDATES = 512
"""Most weight vectors per region; more models get a coarser simplex step (8 models: multiples of 1/4)."""
MIN_SIZE_CANDIDATES: tuple[int, ...] = (10, 25, 50, 100, 200, 500)
ET_TO_NETC_CANDIDATES: tuple[int, ...] = (25, 50, 100, 200, 500, 1000)
FIT_ORDER: tuple[str, str, str] = ("ET", "TC", "WT")
CHUNK_ELEMENTS = 1 << 24
"""Candidates are scored in chunks of at most this many (candidate, voxel) values."""


# --- cached predictions ---------------------------------------------------------------------------------------


@dataclass
class CachedRegion:
    """One region of one case: the voxels some model may predict, and every model's probability there.

    Attributes:
        indices: int64 ``(m,)`` flat voxel indices on the crop where some model's probability is ≥ the floor.
        values: float32 ``(N, m)`` the models' probabilities at those voxels (CPU).
    """

    indices: np.ndarray
    values: torch.Tensor


@dataclass
class CachedCase:
    """One held-out case: its reference and the cached predictions of its three regions (TC, WT, ET).

    Attributes:
        reference: bool ``(3, V)`` reference regions, flattened crop.
        shape: the crop's shape (``V`` voxels).
    """

    case_id: str
    shape: tuple[int, ...]
    reference: np.ndarray
    spacing: tuple[float, float, float]
    regions: list[CachedRegion]


class PredictionCache:
    """Every model's probabilities on every held-out case, computed once (module docstring).

    Args:
        n_models: N, the number of models.
        floor: the lowest threshold any candidate will use; probabilities below it anywhere are not kept.
    """

    def __init__(self, n_models: int, floor: float):
        self.n_models = n_models
        self.floor = floor
        self.cases: list[CachedCase] = []

    def __len__(self) -> int:
        return len(self.cases)

    def add(self, case_id: str, probabilities: Sequence[torch.Tensor], reference: np.ndarray,
            spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
        """Cache one case: ``probabilities`` one ``(3, x, y, z)`` tensor per model, ``reference`` bool ``(3, x, y, z)``."""
        if len(probabilities) != self.n_models:
            raise ValueError(f"{case_id}: expected {self.n_models} models' probabilities, got {len(probabilities)}")
        shape = tuple(reference.shape[1:])
        flat = [p.reshape(len(REGIONS), -1) for p in probabilities]
        regions = []
        for c in range(len(REGIONS)):
            keep = torch.zeros_like(flat[0][c], dtype=torch.bool)
            for p in flat:
                keep |= p[c] >= self.floor
            indices = keep.nonzero().squeeze(1)
            values = torch.stack([p[c][indices] for p in flat]).float().cpu()
            regions.append(CachedRegion(indices.cpu().numpy(), values))
        flat_reference = np.asarray(reference, bool).reshape(len(REGIONS), -1)
        self.cases.append(CachedCase(case_id, shape, flat_reference, spacing, regions))

    @classmethod
    def predict(cls, held_out: HeldOutSet, members: Sequence[LoadedMember], floor: float,
                progress: bool = True) -> PredictionCache:
        """Predict every case of ``held_out`` with every model once (case by case: N outputs in memory at a time)."""
        cache = cls(len(members), floor)
        streams = [held_out.predict_probabilities(m.model, m.settings) for m in members]
        outputs = tracked(zip(*streams), f"predicting {len(held_out)} held-out cases with {len(members)} models",
                          len(held_out), visible=progress)
        for per_model, case in zip(outputs, held_out.cases):  # outputs first: the bar completes on its last item
            cache.add(case.case_id, [p for _, p in per_model], case.regions, case.spacing)
        return cache

    def probabilities(self, index: int, weights: np.ndarray) -> np.ndarray:
        """The ensemble's probabilities ``(3, *shape)`` of case ``index`` with ``(N, 3)`` weights: exact wherever they
        can exceed the floor, 0 elsewhere (where every model is below it)."""
        case = self.cases[index]
        out = np.zeros((len(REGIONS), int(np.prod(case.shape))), dtype=np.float32)
        for c, region in enumerate(case.regions):
            if region.indices.size:
                out[c, region.indices] = _normalised(weights[:, c]) @ region.values.numpy()
        return out.reshape(len(REGIONS), *case.shape)


def _normalised(weights: np.ndarray) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float32)
    return weights / weights.sum()


# --- scoring --------------------------------------------------------------------------------------------------


def score(cache: PredictionCache, weights: np.ndarray, thresholds: Sequence[float], scheme: LabelScheme | str,
          postprocessing: PostProcessing = PostProcessing(), with_hd95: bool = False) -> HeldOutScore:
    """Scores of the ensemble ``(weights (N, 3), thresholds, postprocessing)`` on the cached cases, through the
    pipeline of ``brats_ugrip.postprocess`` (thresholds → labels → post-processing), regions read back from the labels."""
    scheme = get_scheme(scheme)
    if min(thresholds) < cache.floor:
        raise ValueError(f"threshold {min(thresholds)} is below the cache's floor {cache.floor}")
    per_case = []
    for i, case in enumerate(cache.cases):
        labels = labels_from_probabilities(cache.probabilities(i, weights), thresholds, scheme, postprocessing)
        reference = case.reference.reshape(len(REGIONS), *case.shape)
        per_case.append(label_map_scores(labels, reference, scheme, case.spacing, with_hd95))
    return HeldOutScore([c.case_id for c in cache.cases], per_case)


def _count_above(values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``(K, m)`` values, ``(L,)`` sorted thresholds → ``(K, L)`` counts of values ``> t``."""
    below = torch.bucketize(values, thresholds)  # how many thresholds are strictly below each value
    hist = torch.zeros(values.shape[0], len(thresholds) + 1, dtype=torch.int64, device=values.device)
    hist.scatter_add_(1, below, torch.ones_like(below))
    return hist.flip(1).cumsum(1).flip(1)[:, 1:]


def region_dice_table(cache: PredictionCache, region: int, candidates: np.ndarray, thresholds: Sequence[float],
                      forced: Sequence[np.ndarray] | None = None, device: str | torch.device = "cpu") -> np.ndarray:
    """Mean Dice over the cached cases of one region for every candidate weight vector and threshold.

    Args:
        region: 0, 1, 2 for TC, WT, ET.
        candidates: ``(K, N)`` weight vectors (each normalised to sum 1 here).
        thresholds: ``L`` increasing thresholds, all ≥ the cache's floor.
        forced: per case, flat voxel indices predicted positive whatever the candidate (inner regions already
            fitted, which the label map counts in this region).

    Returns:
        float64 ``(K, L)`` mean Dice (BraTS convention: 1 when prediction and reference are both empty).
    """
    if min(thresholds) < cache.floor or list(thresholds) != sorted(thresholds):
        raise ValueError(f"thresholds must be increasing and ≥ the cache's floor {cache.floor}: {list(thresholds)}")
    weights = torch.as_tensor(candidates, dtype=torch.float32, device=device)
    weights = weights / weights.sum(dim=1, keepdim=True)
    grid = torch.as_tensor(thresholds, dtype=torch.float32, device=device)
    total = np.zeros((len(weights), len(grid)), dtype=np.float64)
    for i, case in enumerate(cache.cases):
        cached, reference = case.regions[region], case.reference[region]
        indices, values = cached.indices, cached.values
        forced_pred = forced_tp = 0
        if forced is not None and forced[i].size:
            free = ~np.isin(indices, forced[i])
            indices, values = indices[free], values[:, torch.from_numpy(free)]
            forced_pred, forced_tp = forced[i].size, int(reference[forced[i]].sum())
        in_reference = torch.from_numpy(reference[indices]).to(device)
        values = values.to(device)
        predicted = torch.empty(len(weights), len(grid), dtype=torch.int64, device=device)
        true_positive = torch.empty_like(predicted)
        step = max(1, CHUNK_ELEMENTS // max(1, values.shape[1]))
        for start in range(0, len(weights), step):
            averaged = weights[start:start + step] @ values
            predicted[start:start + step] = _count_above(averaged, grid)
            true_positive[start:start + step] = _count_above(averaged[:, in_reference], grid)
        predicted = predicted.cpu().numpy() + forced_pred
        true_positive = true_positive.cpu().numpy() + forced_tp
        denominator = predicted + int(reference.sum())
        total += np.where(denominator > 0, 2 * true_positive / np.maximum(denominator, 1), 1.0)
    return total / len(cache.cases)


def _best(table: np.ndarray, thresholds: Sequence[float], tolerance: float = 1e-9) -> tuple[int, int]:
    """The best (candidate, threshold) of a Dice table; ties go to the threshold nearest 0.5, then the first candidate."""
    candidates, columns = np.nonzero(table >= table.max() - tolerance)
    order = np.lexsort((candidates, np.abs(np.asarray(thresholds)[columns] - 0.5)))
    return int(candidates[order[0]]), int(columns[order[0]])


def simplex_grid(n_models: int, resolution: int = RESOLUTION, max_candidates: int = MAX_CANDIDATES) -> np.ndarray:
    """Weight vectors on the simplex in steps of ``1/k`` (``k ≤ resolution``, the largest giving at most
    ``max_candidates`` vectors), equal weights first. Always holds every single model (the vertices).

    Returns:
        float64 ``(K, n_models)``, rows summing to 1.
    """
    k = resolution
    while k > 1 and math.comb(k + n_models - 1, n_models - 1) > max_candidates:
        k -= 1
    slots = k + n_models - 1
    points = [np.diff([-1, *bars, slots]) - 1 for bars in combinations(range(slots), n_models - 1)]
    grid = np.asarray(points, dtype=np.float64).reshape(-1, n_models) / k
    equal = np.full((1, n_models), 1 / n_models)
    grid = grid[~np.all(np.isclose(grid, equal), axis=1)]
    return np.concatenate([equal, grid])


def _positives(case: CachedCase, region: int, weights: np.ndarray, threshold: float) -> np.ndarray:
    cached = case.regions[region]
    if not cached.indices.size:
        return cached.indices
    averaged = torch.from_numpy(_normalised(weights)) @ cached.values
    return cached.indices[(averaged > threshold).numpy()]


def fit_weights(cache: PredictionCache, thresholds: Sequence[float] = THRESHOLDS, resolution: int = RESOLUTION,
                max_candidates: int = MAX_CANDIDATES,
                device: str | torch.device = "cpu") -> tuple[np.ndarray, tuple[float, ...]]:
    """Per-region weights and thresholds maximising the held-out Dice, regions fitted inside out (ET, TC, WT).

    Returns:
        ``(weights (N, 3), thresholds (TC, WT, ET))``.
    """
    candidates = simplex_grid(cache.n_models, resolution, max_candidates)
    weights = np.zeros((cache.n_models, len(REGIONS)))
    chosen = [0.5] * len(REGIONS)
    forced = [np.zeros(0, dtype=np.int64) for _ in cache.cases]
    for name in FIT_ORDER:
        c = REGIONS.index(name)
        k, t = _best(region_dice_table(cache, c, candidates, thresholds, forced, device), thresholds)
        weights[:, c], chosen[c] = candidates[k], float(thresholds[t])
        forced = [np.union1d(f, _positives(case, c, weights[:, c], chosen[c])) for f, case in zip(forced, cache.cases)]
    return weights, tuple(chosen)


def dice_weights(cache: PredictionCache, own_thresholds: Sequence[float], device: str | torch.device = "cpu") -> np.ndarray:
    """``(N, 3)`` weights: each model's held-out Dice per region, alone at its own threshold (equal weights for a
    region where every model scores 0)."""
    grid = sorted(set(own_thresholds))
    weights = np.zeros((cache.n_models, len(REGIONS)))
    for c in range(len(REGIONS)):
        table = region_dice_table(cache, c, np.eye(cache.n_models), grid, device=device)
        weights[:, c] = [table[n, grid.index(t)] for n, t in enumerate(own_thresholds)]
        if weights[:, c].sum() <= 0:
            weights[:, c] = 1.0
    return weights


def fit_postprocessing(cache: PredictionCache, weights: np.ndarray, thresholds: Sequence[float],
                       scheme: LabelScheme | str, sizes: Sequence[int] = MIN_SIZE_CANDIDATES,
                       et_sizes: Sequence[int] = ET_TO_NETC_CANDIDATES) -> tuple[PostProcessing, list[dict[str, Any]]]:
    """Try each post-processing rule on the cached cases and keep those that raise the mean Dice.

    Returns:
        ``(kept post-processing, trials)``, each trial ``{"rule", "value", "mean_dice", "kept"}``; the first trial is
        no post-processing.
    """
    scheme = get_scheme(scheme)
    boxes = []  # each case's labels and reference on the bounding box of both (rules never add voxels)
    for i, case in enumerate(cache.cases):
        labels = labels_from_probabilities(cache.probabilities(i, weights), thresholds, scheme)
        reference = case.reference.reshape(len(REGIONS), *case.shape)
        box = bounding_box((labels > 0) | reference.any(axis=0), margin=1) or (slice(0, 1),) * labels.ndim
        boxes.append((labels[box], reference[(slice(None), *box)]))

    def mean_dice(postprocessing: PostProcessing) -> float:
        per_region = np.zeros(len(REGIONS))
        for labels, reference in boxes:
            scores = label_map_scores(postprocessing.apply(labels, scheme), reference, scheme, with_hd95=False)
            per_region += [scores[f"dice_{r}"] for r in REGIONS]
        return float(np.mean(per_region / len(boxes)))

    kept = PostProcessing()
    best = mean_dice(kept)
    trials: list[dict[str, Any]] = [{"rule": "none", "value": 0, "mean_dice": best, "kept": True}]
    rules = [(f"min_component_size.{r}", sizes) for r in ("WT", "TC", "ET")] + [("et_to_netc_below", et_sizes)]
    for rule, values in rules:
        tried = []
        for value in values:
            if rule == "et_to_netc_below":
                candidate = replace(kept, et_to_netc_below=int(value))
            else:
                size = list(kept.min_component_size)
                size[REGIONS.index(rule.rsplit(".", 1)[1])] = int(value)
                candidate = replace(kept, min_component_size=tuple(size))
            tried.append((mean_dice(candidate), candidate, value))
        top = max(tried, key=lambda t: t[0])  # the first of equal scores: the smallest value
        improves = top[0] > best + 1e-9
        trials += [{"rule": rule, "value": int(v), "mean_dice": s, "kept": improves and v == top[2]} for s, _, v in tried]
        if improves:
            best, kept = top[0], top[1]
    return kept, trials


# --- the whole fit --------------------------------------------------------------------------------------------


def score_summary(result: HeldOutScore) -> dict[str, Any]:
    """``{"dice": {TC, WT, ET, mean}, "hd95": {...}}`` as plain numbers (HD95 when computed)."""
    summary: dict[str, Any] = {"dice": result.dice}
    if result.hd95 is not None:
        summary["hd95"] = result.hd95
    return summary


@dataclass
class FitResult:
    """A fitted ensemble and its scores.

    Attributes:
        spec: the ensemble spec with the chosen weights, thresholds and post-processing (and ``fit`` record).
        selection: scores on the fitting cases (selection scores: optimistic).
        singles: each model alone on the fitting cases, in model order.
        test, test_singles: the same on the test cases, when given.
        trials: the post-processing rules tried (see :func:`fit_postprocessing`).
    """

    spec: EnsembleSpec
    selection: HeldOutScore
    singles: list[HeldOutScore]
    test: HeldOutScore | None = None
    test_singles: list[HeldOutScore] | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """Everything, per case included, as JSON-ready data."""
        def scores(result: HeldOutScore | None) -> dict[str, Any] | None:
            if result is None:
                return None
            return {**score_summary(result), "per_case": dict(zip(result.case_ids, result.per_case))}

        return {"fit": self.spec.fit, "selection": scores(self.selection),
                "singles": [scores(s) for s in self.singles], "test": scores(self.test),
                "test_singles": [scores(s) for s in self.test_singles] if self.test_singles else None,
                "postprocessing_trials": self.trials}


def fit_ensemble(ensemble: Ensemble, held_out: HeldOutSet, method: str = "fitted", test_set: HeldOutSet | None = None,
                 postprocessing: bool = True, thresholds: Sequence[float] = THRESHOLDS, resolution: int = RESOLUTION,
                 max_candidates: int = MAX_CANDIDATES, record: dict[str, Any] | None = None,
                 progress: bool = True) -> FitResult:
    """Choose the weights (``method``), thresholds and post-processing of ``ensemble`` on ``held_out``; score the
    result there (selection) and on ``test_set`` (cases not used for fitting) when given.

    Args:
        record: extra entries for the spec's ``fit`` record (datalist, folds).

    Returns:
        a :class:`FitResult` whose ``spec`` is ready to save.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    spec, scheme, device = ensemble.spec, ensemble.scheme, held_out.device
    n = len(ensemble.members)
    own = [float(m.settings.threshold) for m in ensemble.members]
    floor = min(*thresholds, *spec.thresholds, *own)
    cache = PredictionCache.predict(held_out, ensemble.members, floor, progress)
    alone = [np.repeat(np.eye(n)[k][:, None], len(REGIONS), axis=1) for k in range(n)]
    singles = [score(cache, alone[k], (own[k],) * 3, scheme, with_hd95=True) for k in range(n)]

    fallback = None
    chosen_thresholds: tuple[float, ...] = tuple(spec.thresholds)
    if method == "equal":
        weights = np.ones((n, len(REGIONS)))
    elif method == "dice":
        weights = dice_weights(cache, own, device)
    else:
        weights, chosen_thresholds = fit_weights(cache, thresholds, resolution, max_candidates, device)
        best = int(np.argmax([s.mean for s in singles]))
        if singles[best].mean > score(cache, weights, chosen_thresholds, scheme).mean:
            weights, chosen_thresholds, fallback = alone[best], (own[best],) * 3, best
    kept, trials = (fit_postprocessing(cache, weights, chosen_thresholds, scheme) if postprocessing
                    else (PostProcessing(), []))
    selection = score(cache, weights, chosen_thresholds, scheme, kept, with_hd95=True)

    test = test_singles = None
    if test_set is not None:
        test_cache = PredictionCache.predict(test_set, ensemble.members, floor, progress)
        test = score(test_cache, weights, chosen_thresholds, scheme, kept, with_hd95=True)
        test_singles = [score(test_cache, alone[k], (own[k],) * 3, scheme, with_hd95=True) for k in range(n)]

    fit_record: dict[str, Any] = {
        "method": method, **(record or {}), "cases": len(held_out),
        "selection_score": score_summary(selection),
        "single_model_scores": [score_summary(s)["dice"] for s in singles],
        "fallback_to_single_model": fallback,
        "postprocessing_evaluated": postprocessing,
    }
    if test is not None:
        fit_record["test_cases"] = len(test_set)
        fit_record["test_score"] = score_summary(test)
        fit_record["test_single_model_scores"] = [score_summary(s)["dice"] for s in test_singles]
    fitted = spec.with_weights(weights, thresholds=tuple(float(t) for t in chosen_thresholds), postprocessing=kept,
                               fit=fit_record)
    return FitResult(fitted, selection, singles, test, test_singles, trials)


def training_overlap(ensemble: Ensemble, fold: int) -> list[str]:
    """The models whose training data included ``fold`` (their validation fold is another one): fitting or scoring
    on that fold favours them."""
    return [str(m.path) for m in ensemble.members if m.meta.get("fold") is not None and m.meta["fold"] != fold]

