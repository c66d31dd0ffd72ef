"""Held-out evaluation shared by souping and ensembling: a fold's cases loaded once, scored as validation does.

A :class:`HeldOutSet` reads and preprocesses its cases **once** through :class:`~brats_ugrip.preprocess.CaseCache`,
exactly as the validation loader does (RAS, brain crop, fp16 image, region channels TC, WT, ET), and keeps them in
memory — on the GPU when asked and when they fit — so that a greedy soup or an ensemble fit that evaluates many
models pays for reading the data once, not once per evaluation.

Scores are computed as training validation computes ``val_metrics`` (``brats_ugrip.training.case_dice`` and
``summarise_dice``): sliding-window probabilities on the brain crop with the run's inference settings,
thresholded at ``settings.threshold``, made into the **label map that gets written** (the innermost region wins,
so TC includes ET and WT includes TC), then scored by :func:`brats_ugrip.metrics.regions.label_map_scores` — the
one scorer of label maps for soups, ensemble fitting, training validation, reports and ``tools/evaluate.py``:
Dice (and HD95) per region and case with the BraTS empty-mask convention (:mod:`brats_ugrip.metrics.regions`),
averaged over cases, then over regions. Outside the
crop prediction and reference are both background, so crop scores equal full-volume scores.

A *fingerprint* (sorted case ids, label scheme, crop margin, the inference settings that change predictions and
what is scored: :data:`SCORED`) names what a score was measured on. :func:`stored_score` returns a checkpoint's
``val_metrics`` only when its fingerprint equals the set's, so a soup reuses the scores training already measured
instead of recomputing them.
``sw_batch_size`` is left out of the fingerprint: it changes speed, not predictions.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from brats_ugrip.config import InferenceConfig, config_from_dict
from brats_ugrip.data import Case, Datalist
from brats_ugrip.errors import BratsUgripError, DataError
from brats_ugrip.inference import inference_settings, sliding_window_probabilities
from brats_ugrip.labels import REGIONS, LabelScheme, get_scheme
from brats_ugrip.metrics.regions import label_map_scores
from brats_ugrip.preprocess import BRAIN_MARGIN, CaseCache, CaseGeometry
from brats_ugrip.progress import tracked

FINGERPRINT_SETTINGS: tuple[str, ...] = ("roi_size", "overlap", "mode", "tta", "precision", "threshold")
"""Inference settings that change predictions, hence scores (``sw_batch_size`` only changes speed)."""

SCORED = "label-map"
"""What selection scores are measured on, in the fingerprint: scores of checkpoints from before selection scored
the written label map (they scored the raw region channels) do not match, and are recomputed."""

GPU_MEMORY_SHARE = 0.5
"""Held-out images go to the GPU only if they take at most this share of its free memory."""


def fingerprint(case_ids: Iterable[str], scheme: str, margin: int, settings: InferenceConfig) -> str:
    """16 hex digits naming a set of cases scored with ``settings`` (see the module docstring)."""
    if settings.roi_size is None:
        raise ValueError("settings.roi_size is not resolved; use brats_ugrip.inference.inference_settings(config)")
    chosen = {name: getattr(settings, name) for name in FINGERPRINT_SETTINGS}
    chosen["roi_size"] = [int(s) for s in settings.roi_size]
    payload = {"cases": sorted(case_ids), "scheme": get_scheme(scheme).name, "margin": int(margin), "settings": chosen,
               "scored": SCORED}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_settings(meta: dict[str, Any]) -> InferenceConfig:
    """The inference settings of the run that wrote a checkpoint (window size resolved)."""
    return inference_settings(config_from_dict(meta["config"]))


def validation_fingerprint(meta: dict[str, Any]) -> str | None:
    """The fingerprint of the cases and settings a checkpoint's ``val_metrics`` were measured on, or None if unknown.

    Taken from ``meta["val_fingerprint"]`` when present (soups store it); otherwise rebuilt from the run's config:
    its datalist's validation fold (the first ``limit_val_batches`` cases when set), scheme, the cache's crop margin
    and inference settings. None when the config or the datalist cannot be read any more.
    """
    if meta.get("val_fingerprint"):
        return str(meta["val_fingerprint"])
    try:
        config = config_from_dict(meta["config"])
        cases = Datalist.load(config.data.datalist, config.data.data_root).fold_cases(meta["fold"])
    except (BratsUgripError, KeyError, TypeError):
        return None
    limit = config.trainer.limit_val_batches
    if isinstance(limit, int):
        cases = cases[:limit]
    elif isinstance(limit, float):
        cases = cases[:int(len(cases) * limit)]
    return fingerprint([c.case_id for c in cases], config.data.scheme, BRAIN_MARGIN,
                       inference_settings(config))


def stored_score(meta: dict[str, Any], expected_fingerprint: str) -> dict[str, float] | None:
    """A checkpoint's ``val_metrics`` (``{"TC", "WT", "ET", "mean"}``) if they were measured on these weights, on the
    cases and with the settings ``expected_fingerprint`` names; None otherwise (the score must be computed)."""
    metrics = meta.get("val_metrics") or {}
    if not all(key in metrics for key in (*REGIONS, "mean")):
        return None
    # last.ckpt of a run validating every k epochs may hold metrics of earlier weights.
    if "val_fingerprint" not in meta and meta.get("val_epoch") != meta.get("epoch"):
        return None
    if validation_fingerprint(meta) != expected_fingerprint:
        return None
    return {key: float(metrics[key]) for key in (*REGIONS, "mean")}


@dataclass
class HeldOutCase:
    """One held-out case, preprocessed.

    Attributes:
        case_id: the case's id.
        image: float16 ``(4, x, y, z)`` brain crop, on the set's storage device.
        regions: bool ``(3, x, y, z)`` TC, WT, ET reference on the same crop (CPU).
        spacing: voxel size in mm along the crop's (RAS) axes, for HD95.
    """

    case_id: str
    image: torch.Tensor
    regions: np.ndarray
    spacing: tuple[float, float, float]


@dataclass
class HeldOutScore:
    """Scores of one model (or ensemble) on a held-out set.

    Attributes:
        case_ids: the cases, in the set's order.
        per_case: one dict per case: ``dice_TC``, ``dice_WT``, ``dice_ET`` and, when computed, ``hd95_*`` (mm).
    """

    case_ids: list[str]
    per_case: list[dict[str, float]]

    def _means(self, metric: str) -> dict[str, float] | None:
        if not self.per_case or f"{metric}_{REGIONS[0]}" not in self.per_case[0]:
            return None
        # Over cases first, then over regions: as training's summarise_dice.
        per_region = {r: float(np.mean([c[f"{metric}_{r}"] for c in self.per_case], dtype=np.float64)) for r in REGIONS}
        return {**per_region, "mean": float(np.mean(list(per_region.values()), dtype=np.float64))}

    @property
    def dice(self) -> dict[str, float]:
        """Mean Dice per region and their mean: ``{"TC", "WT", "ET", "mean"}`` (the format of ``val_metrics``)."""
        means = self._means("dice")
        assert means is not None
        return means

    @property
    def hd95(self) -> dict[str, float] | None:
        """Mean HD95 (mm) per region and their mean, or None when not computed."""
        return self._means("hd95")

    @property
    def mean(self) -> float:
        """Mean Dice over regions: the selection score."""
        return self.dice["mean"]


def _spacing(geometry: CaseGeometry) -> tuple[float, float, float]:
    """Voxel sizes along the RAS axes of the crop, from the input affine and its orientation."""
    zooms = np.sqrt((np.asarray(geometry.affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    spacing = [1.0, 1.0, 1.0]
    for axis, (ras_axis, _) in enumerate(geometry.ornt):
        spacing[int(ras_axis)] = float(zooms[axis])
    return tuple(spacing)


def _storage_device(device: torch.device, nbytes: int) -> torch.device:
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= GPU_MEMORY_SHARE * free else torch.device("cpu")


class HeldOutSet:
    """Labelled cases read and preprocessed once, kept in memory, and scored like training validation.

    Args:
        cases: labelled cases (e.g. ``datalist.fold_cases(k)``).
        scheme: label scheme of the references.
        cache_dir: a :class:`CaseCache` folder (the runs' cache makes loading fast); None preprocesses from NIfTI.
        device: where models run. On a GPU the images are stored there too when they take at most half of its
            free memory (else in CPU memory, and each case is copied over when scored).
        margin: crop margin around the brain; the default is the one training's cache uses.
        progress: show a progress bar while loading.
    """

    def __init__(self, cases: Sequence[Case], scheme: LabelScheme | str = "brats2023",
                 cache_dir: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu",
                 margin: int | None = None, progress: bool = True):
        if not cases:
            raise DataError("the held-out set is empty: no cases to score on")
        self.scheme = get_scheme(scheme).name
        cache = CaseCache(cache_dir) if margin is None else CaseCache(cache_dir, margin)
        self.margin = cache.margin
        self.device = torch.device(device)
        loaded = []
        for case in tracked(cases, "loading held-out cases", len(cases), visible=progress):
            if case.label is None:
                raise DataError(f"{case.case_id}: a held-out case needs a reference segmentation (label)")
            pre = cache.get(case, self.scheme)
            # fp16 as the validation loader reads it from the cache, so scores match training's to the bit.
            loaded.append((case.case_id, torch.from_numpy(np.ascontiguousarray(pre.image, dtype=np.float16)),
                           pre.regions.astype(bool), _spacing(pre.geometry)))
        self.storage_device = _storage_device(self.device, sum(image.nbytes for _, image, _, _ in loaded))
        self.cases = [HeldOutCase(case_id, image.to(self.storage_device), regions, spacing)
                      for case_id, image, regions, spacing in loaded]

    @classmethod
    def from_fold(cls, datalist: Datalist, fold: int, **kwargs: Any) -> HeldOutSet:
        """The validation cases of ``fold`` in ``datalist`` (with the datalist's label scheme)."""
        kwargs.setdefault("scheme", datalist.label_scheme)
        return cls(datalist.fold_cases(fold), **kwargs)

    @property
    def case_ids(self) -> list[str]:
        return [case.case_id for case in self.cases]

    def __len__(self) -> int:
        return len(self.cases)

    def fingerprint(self, settings: InferenceConfig) -> str:
        """The fingerprint of these cases scored with ``settings`` (compare with :func:`validation_fingerprint`)."""
        return fingerprint(self.case_ids, self.scheme, self.margin, settings)

    @torch.no_grad()
    def predict_probabilities(self, model: nn.Module, settings: InferenceConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """Sliding-window probabilities of each case, in order.

        ``model`` is moved to the set's device and put in eval mode. Yields ``(case_id, probabilities)`` with
        probabilities float32 ``(3, x, y, z)`` (TC, WT, ET) on the brain crop, on the set's device
        (``.cpu().numpy()`` for an array to cache).
        """
        model.to(self.device).eval()
        for case in self.cases:
            image = case.image.to(self.device, non_blocking=True).float()[None]
            yield case.case_id, sliding_window_probabilities(model, image, settings)[0]

    def score_probabilities(self, probabilities: Iterable[torch.Tensor | np.ndarray], threshold: float = 0.5,
                            with_hd95: bool = False) -> HeldOutScore:
        """Score per-case probabilities ``(3, x, y, z)`` given in the set's case order (e.g. an ensemble's mean):
        thresholded, written as a label map, scored by :func:`brats_ugrip.metrics.regions.label_map_scores`."""
        scheme = get_scheme(self.scheme)
        per_case = []
        for case, probs in zip(self.cases, probabilities, strict=True):
            labels = scheme.to_labels((torch.as_tensor(probs) > threshold).cpu().numpy())
            per_case.append(label_map_scores(labels, case.regions, scheme, case.spacing, with_hd95))
        return HeldOutScore(self.case_ids, per_case)

    def score(self, model: nn.Module, settings: InferenceConfig, with_hd95: bool = False) -> HeldOutScore:
        """Dice (and optionally HD95) of ``model`` on every case, as training validation computes them."""
        probabilities = (probs for _, probs in self.predict_probabilities(model, settings))
        return self.score_probabilities(probabilities, settings.threshold, with_hd95)

