"""BraTS 2023/2024 lesion-wise Dice and HD95, the scores teams were ranked on.

The official code (``BraTS-2023-Metrics`` and its 2024 successors) is not on PyPI; this follows it step by step
for one binary region (TC, WT, ET, or the single labels NETC and SNFH):

1. **Reference lesions.** Dilate the reference ``dilation`` times with the 18-connected structure
   (``generate_binary_structure(3, 2)``), label the 26-connected components of the dilated mask, and give every
   reference voxel the label of the dilated component it lies in: nearby components count as one lesion.
2. **Prediction lesions.** The 26-connected components of the prediction. *BraTS 2024 only*: they are merged by
   dilation exactly as the reference, and prediction lesions of volume ≤ ``threshold`` are deleted.
3. **Matching.** For each reference lesion, the prediction lesions that meet the lesion dilated ``dilation``
   times are its true positives. Its Dice and HD95 are computed between the lesion and the union of those
   prediction lesions (no hit: Dice 0 and HD95 :data:`BRATS_MAX_HD95`; an infinite HD95 is capped there too).
   A prediction lesion that meets no dilated reference lesion (small ones included) is a false positive.
4. **Score.** Reference lesions of volume ≤ ``threshold`` (voxel count × voxel volume, mm³) are dropped from the
   TP and FN lists. With ``n`` the remaining reference lesions and ``n_fp`` the false positives::

       LesionWise Dice = Σ Dice / (n + n_fp)
       LesionWise HD95 = (Σ HD95 + 374 · n_fp) / (n + n_fp)

   and ``n + n_fp = 0`` (nothing to score, e.g. empty vs empty) gives Dice 1 and HD95 0.

Differences from the official code, on purpose: HD95 is MONAI's (the maximum of the two directed 95th
percentiles of surface-voxel distances) instead of DeepMind's surfel-weighted ``compute_robust_hausdorff``;
scipy's labelling replaces ``cc3d`` (same 26-connectivity); the 2024 prediction threshold is a volume (equal to
the official voxel count at 1 mm³). Not reproduced: the 2024 SSA/PED step that relabels ET lesions touching the
same NETC lesion as one, and the resection cavity (RC) region of BraTS 2024 GLI, which no label scheme here has.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_dilation, find_objects, generate_binary_structure, label

from brats_ugrip.errors import ConfigError
from brats_ugrip.labels import LabelScheme
from brats_ugrip.metrics.regions import BRATS_MAX_HD95, Spacing, bounding_box, dice, hd95, region_masks

CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
DILATION_STRUCTURE = generate_binary_structure(3, 2)


@dataclass(frozen=True)
class LesionParams:
    """Parameters of one region: ``dilation`` iterations, and the volume ``threshold`` in mm³ (lesions ≤ it drop)."""

    dilation: int
    threshold: float


@dataclass(frozen=True)
class LesionwisePreset:
    """The lesion-wise settings of one challenge.

    Args:
        name: registry key, e.g. ``"brats2024-gli"``.
        regions: parameters per scored region, in report order.
        merge_prediction: BraTS 2024 behaviour: merge prediction components by dilation, delete small ones.
    """

    name: str
    regions: Mapping[str, LesionParams]
    merge_prediction: bool


@dataclass(frozen=True)
class ReferenceLesion:
    """One (dilation-merged) reference lesion: its volume in mm³, its scores, whether any prediction hit it."""

    volume: float
    dice: float
    hd95: float
    detected: bool


@dataclass(frozen=True)
class LesionwiseScore:
    """Lesion-wise score of one region. ``n_tp``/``n_fn`` count reference lesions above the threshold only."""

    dice: float
    hd95: float
    n_tp: int
    n_fn: int
    n_fp: int
    lesions: tuple[ReferenceLesion, ...]


def _preset(name: str, merge_prediction: bool, **regions: tuple[int, float]) -> LesionwisePreset:
    return LesionwisePreset(name, {r: LesionParams(*p) for r, p in regions.items()}, merge_prediction)


LESIONWISE_PRESETS: dict[str, LesionwisePreset] = {p.name: p for p in (
    _preset("brats2023-gli", False, ET=(3, 50), TC=(3, 50), WT=(3, 50)),
    _preset("brats2023-ssa", False, ET=(3, 50), TC=(3, 50), WT=(3, 50)),
    _preset("brats2023-ped", False, ET=(3, 50), TC=(3, 50), WT=(3, 50)),
    _preset("brats2023-men", False, ET=(1, 50), TC=(1, 50), WT=(1, 50)),
    _preset("brats2023-met", False, ET=(1, 2), TC=(1, 2), WT=(1, 2)),
    _preset("brats2024-gli", True, ET=(3, 10), TC=(3, 20), WT=(3, 20), NETC=(5, 20), SNFH=(5, 20)),
    _preset("brats2024-ssa", True, ET=(3, 50), TC=(3, 50), WT=(3, 50)),
    _preset("brats2024-ped", True, ET=(5, 10), TC=(5, 10), WT=(5, 10)),
    _preset("brats2024-met", True, ET=(1, 2), TC=(1, 2), WT=(1, 2)),
)}


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    # scipy reads iterations < 1 as "dilate until nothing changes"; here 0 means no dilation.
    return binary_dilation(mask, DILATION_STRUCTURE, iterations=iterations) if iterations > 0 else mask


def lesions_merged_by_dilation(mask: np.ndarray, dilation: int) -> np.ndarray:
    """Lesion labels ``(X, Y, Z)`` of a boolean mask: components (26-connected) of the mask dilated ``dilation``
    times, restricted to the mask, so that components closer than the dilation share one label (0 = background).
    With ``dilation=0`` these are the plain 26-connected components."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    # Dilation grows the mask by at most `dilation` voxels a side: work on that box only.
    box = bounding_box(mask, margin=dilation)
    if box is not None:
        inner = mask[box]
        labels[box], _ = label(_dilate(inner, dilation), structure=CONNECTIVITY_26)
        labels[box][~inner] = 0
    return labels


def _grown(box: tuple[slice, ...], margin: int, shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _union(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(len(boxes[0])))


def lesionwise_score(pred: np.ndarray, ref: np.ndarray, params: LesionParams, merge_prediction: bool = False,
                     spacing: Spacing = (1.0, 1.0, 1.0)) -> LesionwiseScore:
    """Lesion-wise Dice and HD95 of one binary region, following the module docstring.

    Args:
        pred, ref: boolean masks ``(X, Y, Z)``.
        params: dilation and volume threshold of the region.
        merge_prediction: BraTS 2024: merge prediction components by dilation and delete those ≤ threshold.
        spacing: voxel size in mm, for volumes and HD95.
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    voxel_volume = float(np.prod(spacing))
    ref_lesions = lesions_merged_by_dilation(ref, params.dilation)
    pred_lesions = lesions_merged_by_dilation(pred, params.dilation if merge_prediction else 0)
    if merge_prediction:
        keep = np.bincount(pred_lesions.ravel()) * voxel_volume > params.threshold
        keep[0] = False
        pred_lesions = np.where(keep[pred_lesions], pred_lesions, 0)
    pred_boxes = find_objects(pred_lesions)

    lesions: list[ReferenceLesion] = []
    matched: set[int] = set()
    for index, box in enumerate(find_objects(ref_lesions), start=1):
        if box is None:
            continue
        reach_box = _grown(box, params.dilation, ref.shape)
        reach = _dilate(ref_lesions[reach_box] == index, params.dilation)
        hits = np.unique(pred_lesions[reach_box][reach])
        hits = hits[hits > 0]
        matched.update(hits.tolist())
        # Score on the bounding box of the lesion and its hits: the hit components may reach beyond the reach box.
        scored = _union([box, *(pred_boxes[h - 1] for h in hits)])
        lesion = ref_lesions[scored] == index
        hit = np.isin(pred_lesions[scored], hits)
        lesions.append(ReferenceLesion(float(lesion.sum()) * voxel_volume, dice(hit, lesion),
                                       hd95(hit, lesion, spacing), bool(hits.size)))

    predicted = {i for i, box in enumerate(pred_boxes, start=1) if box is not None}
    n_fp = len(predicted - matched)
    scored_lesions = [lesion for lesion in lesions if lesion.volume > params.threshold]
    denominator = len(scored_lesions) + n_fp
    if denominator == 0:
        lw_dice, lw_hd95 = 1.0, 0.0
    else:
        lw_dice = sum(lesion.dice for lesion in scored_lesions) / denominator
        lw_hd95 = (sum(lesion.hd95 for lesion in scored_lesions) + BRATS_MAX_HD95 * n_fp) / denominator
    n_tp = sum(lesion.detected for lesion in scored_lesions)
    return LesionwiseScore(lw_dice, lw_hd95, n_tp, len(scored_lesions) - n_tp, n_fp, tuple(lesions))


def get_lesionwise_preset(name: str | LesionwisePreset) -> LesionwisePreset:
    """Look a preset up by name (see :data:`LESIONWISE_PRESETS`)."""
    if isinstance(name, LesionwisePreset):
        return name
    try:
        return LESIONWISE_PRESETS[name]
    except KeyError:
        raise ConfigError("preset", f"unknown lesion-wise preset {name!r}; choose one of {sorted(LESIONWISE_PRESETS)}"
                          ) from None


def lesionwise_scores(pred_labels: np.ndarray, ref_labels: np.ndarray, scheme: LabelScheme,
                      preset: str | LesionwisePreset, spacing: Spacing = (1.0, 1.0, 1.0)) -> dict[str, float]:
    """Lesion-wise scores of every region of ``preset`` from two label maps ``(X, Y, Z)`` in ``scheme``.

    The labels are not checked here (:func:`~brats_ugrip.metrics.evaluation.evaluate_case` does it once a case).

    Returns:
        ``{"lw_dice_ET": …, "lw_hd95_ET": …, "lw_tp_ET": …, "lw_fn_ET": …, "lw_fp_ET": …, …}``.
    """
    preset = get_lesionwise_preset(preset)
    pred_masks = region_masks(pred_labels, scheme, preset.regions)
    ref_masks = region_masks(ref_labels, scheme, preset.regions)
    row: dict[str, float] = {}
    for region, params in preset.regions.items():
        score = lesionwise_score(pred_masks[region], ref_masks[region], params, preset.merge_prediction, spacing)
        row |= {f"lw_dice_{region}": score.dice, f"lw_hd95_{region}": score.hd95,
                f"lw_tp_{region}": score.n_tp, f"lw_fn_{region}": score.n_fn, f"lw_fp_{region}": score.n_fp}
    return row
