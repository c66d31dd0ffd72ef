"""BraTS 2023/2024 lesion-wise and legacy Dice and HD95, value for value as the official code computes them.

The rules of each challenge and year (dilations, thresholds, caps, cleanup, touching partners) are one table,
:data:`~brats_ugrip.metrics.rules.LESIONWISE_PRESETS`; the official scripts are named there. For each scored
region (TC, WT, ET, or the single labels NETC and SNFH) of two label maps:

1. **Reference lesions.** Dilate the region's reference ``dilation`` times with the 18-connected structure
   (``generate_binary_structure(3, 2)``), label the 26-connected components of the dilated mask (numbered in
   C-order, as ``cc3d`` numbers them) and give every reference voxel the label of the dilated component it lies
   in: nearby components count as one lesion.
2. **Prediction lesions.** 2023: the 26-connected components of the prediction. 2024 (*cleanup*): merged by
   dilation exactly as the reference, then lesions of ≤ ``threshold`` **voxels** are deleted.
3. **Touching partners** (2024 GLI, SSA, MET; both sides alike). The lesions of a region that touch
   (18-neighbourhood) a lesion of a partner region take the partner lesion's label: those touching the same one
   merge. As officially, a lesion that touches several partner lesions goes with the lowest-numbered one, and
   the partner maps are the partners' own step-1/2 lesions. So two ET lesions around one necrosis (NETC) lesion
   are one ET lesion in 2024 SSA and GLI; GLI also merges NETC lesions by ET, and SNFH lesions by ET then by NETC.
   2024 PED and every 2023 set have no such step.
4. **Legacy scores.** Dice and HD95 of the whole region: the reference against the prediction as step 2 left it
   (2024: after cleanup; 2023: as given).
5. **Matching.** For each reference lesion, the prediction lesions that meet the lesion dilated ``dilation``
   times are its true positives. Its Dice and HD95 are computed between the lesion and the union of those
   prediction lesions (no hit: Dice 0 and HD95 at the cap). A prediction lesion that meets no dilated reference
   lesion is a false positive.
6. **Score.** Reference lesions of volume ≤ ``threshold`` (voxel count × voxel volume, mm³, on both years) are
   dropped from the TP and FN lists. With ``n`` the remaining reference lesions and ``n_fp`` the false positives::

       LesionWise Dice = Σ Dice / (n + n_fp)
       LesionWise HD95 = (Σ HD95 + cap · n_fp) / (n + n_fp)

   and ``n + n_fp = 0`` (nothing to score, e.g. empty vs empty) gives Dice 1 and HD95 0.

HD95 is the official surfel-weighted one (:func:`~brats_ugrip.metrics.regions.hd95`, DeepMind's
``surface-distance``), with the spacing of the reference's header; scipy's labelling replaces ``cc3d`` (same
26-connectivity, same numbering).

One official behaviour is deliberately **not** reproduced: for the legacy HD95, the 2024 scripts pass the numbered
lesion maps (values 1..n) to ``compute_surface_distances``, whose neighbourhood code misreads labels ≥ 2. Here the
legacy HD95 is computed on binary masks, as the 2023 script does; it differs from the official 2024 value only when
a region has two or more lesions. Not covered: the resection cavity (RC, label 4 of BraTS 2024 GLI and MET), which
no label scheme here has.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_dilation, find_objects, generate_binary_structure, label

from brats_ugrip.labels import LabelScheme
from brats_ugrip.metrics.regions import BRATS_MAX_HD95, Spacing, bounding_box, dice, hd95, region_masks
from brats_ugrip.metrics.rules import (
    LESIONWISE_PRESETS,
    LesionParams,
    LesionwisePreset,
    get_lesionwise_preset,
    hd95_cap,
)

__all__ = ["LESIONWISE_PRESETS", "LesionParams", "LesionwisePreset", "LesionwiseScore", "ReferenceLesion",
           "challenge_scores", "drop_small_lesions", "get_lesionwise_preset", "lesions_merged_by_dilation",
           "lesionwise_score", "lesionwise_scores", "merge_touching", "score_lesions"]

CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
DILATION_STRUCTURE = generate_binary_structure(3, 2)


@dataclass(frozen=True)
class ReferenceLesion:
    """One (merged) reference lesion: its volume in mm³, its scores, whether any prediction hit it."""

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


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    # scipy reads iterations < 1 as "dilate until nothing changes"; here 0 means no dilation.
    return binary_dilation(mask, DILATION_STRUCTURE, iterations=iterations) if iterations > 0 else mask


def lesions_merged_by_dilation(mask: np.ndarray, dilation: int) -> np.ndarray:
    """Lesion labels ``(X, Y, Z)`` of a boolean mask: components (26-connected) of the mask dilated ``dilation``
    times, restricted to the mask, so that components closer than the dilation share one label (0 = background).
    Labels are numbered in C-order of the dilated components' first voxels (as ``cc3d`` numbers them); with
    ``dilation=0`` these are the plain 26-connected components."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    # Dilation grows the mask by at most `dilation` voxels a side: work on that box only (the order is kept).
    box = bounding_box(mask, margin=dilation)
    if box is not None:
        inner = mask[box]
        labels[box], _ = label(_dilate(inner, dilation), structure=CONNECTIVITY_26)
        labels[box][~inner] = 0
    return labels


def drop_small_lesions(lesions: np.ndarray, max_voxels: float) -> np.ndarray:
    """``lesions`` without the lesions of ≤ ``max_voxels`` voxels (the 2024 cleanup of predictions)."""
    keep = np.bincount(lesions.ravel()) > max_voxels
    keep[0] = False
    return np.where(keep[lesions], lesions, 0)


def _grown(box: tuple[slice, ...], margin: int, shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _union(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(len(boxes[0])))


def merge_touching(lesions: np.ndarray, partner: np.ndarray) -> np.ndarray:
    """The official ``relabel_nifti_image`` step: lesions that touch (18-neighbourhood) a partner lesion are
    relabelled by the lowest-numbered partner lesion they touch, so lesions with the same one merge; the others
    keep their label."""
    group = np.arange(int(lesions.max()) + 1)
    first_by_partner: dict[int, int] = {}
    for index, box in enumerate(find_objects(lesions), start=1):
        if box is None:
            continue
        near = _grown(box, 1, lesions.shape)
        touched = partner[near][_dilate(lesions[near] == index, 1)]
        touched = touched[touched > 0]
        if touched.size:
            group[index] = first_by_partner.setdefault(int(touched.min()), index)
    return group[lesions]


def score_lesions(pred_lesions: np.ndarray, ref_lesions: np.ndarray, params: LesionParams,
                  spacing: Spacing = (1.0, 1.0, 1.0), max_hd95: float = BRATS_MAX_HD95) -> LesionwiseScore:
    """Steps 5–6 of the module docstring on lesion maps (0 = background, one label per lesion)."""
    if pred_lesions.shape != ref_lesions.shape:
        raise ValueError(f"prediction shape {pred_lesions.shape} differs from reference shape {ref_lesions.shape}")
    pred_boxes = find_objects(pred_lesions)
    lesions: list[ReferenceLesion] = []
    matched: set[int] = set()
    for index, box in enumerate(find_objects(ref_lesions), start=1):
        if box is None:
            continue
        reach_box = _grown(box, params.dilation, ref_lesions.shape)
        reach = _dilate(ref_lesions[reach_box] == index, params.dilation)
        hits = np.unique(pred_lesions[reach_box][reach])
        hits = hits[hits > 0]
        matched.update(hits.tolist())
        # Score on the bounding box of the lesion and its hits: the hit lesions may reach beyond the reach box.
        scored = _union([box, *(pred_boxes[h - 1] for h in hits)])
        lesion = ref_lesions[scored] == index
        hit = np.isin(pred_lesions[scored], hits)
        # The official volume: voxel count × sx × sy × sz, in this order.
        volume = float(lesion.sum()) * spacing[0] * spacing[1] * spacing[2]
        lesions.append(ReferenceLesion(volume, dice(hit, lesion), hd95(hit, lesion, spacing, max_hd95),
                                       bool(hits.size)))

    predicted = {i for i, box in enumerate(pred_boxes, start=1) if box is not None}
    n_fp = len(predicted - matched)
    scored_lesions = [lesion for lesion in lesions if lesion.volume > params.threshold]
    denominator = len(scored_lesions) + n_fp
    if denominator == 0:
        lw_dice, lw_hd95 = 1.0, 0.0
    else:
        lw_dice = sum(lesion.dice for lesion in scored_lesions) / denominator
        lw_hd95 = (sum(lesion.hd95 for lesion in scored_lesions) + max_hd95 * n_fp) / denominator
    n_tp = sum(lesion.detected for lesion in scored_lesions)
    return LesionwiseScore(lw_dice, lw_hd95, n_tp, len(scored_lesions) - n_tp, n_fp, tuple(lesions))


def _prediction_lesions(mask: np.ndarray, params: LesionParams, cleanup: bool) -> np.ndarray:
    if not cleanup:
        return lesions_merged_by_dilation(mask, 0)
    return drop_small_lesions(lesions_merged_by_dilation(mask, params.dilation), params.threshold)


def lesionwise_score(pred: np.ndarray, ref: np.ndarray, params: LesionParams, merge_prediction: bool = False,
                     spacing: Spacing = (1.0, 1.0, 1.0), max_hd95: float = BRATS_MAX_HD95) -> LesionwiseScore:
    """Lesion-wise score of one binary region with no touching partners (steps 1, 2, 5, 6).

    Args:
        pred, ref: boolean masks ``(X, Y, Z)``.
        params: dilation and threshold of the region.
        merge_prediction: 2024 cleanup of the prediction (merge by dilation, delete lesions ≤ threshold voxels).
        spacing: voxel size in mm, for volumes and HD95.
        max_hd95: the cap of a missed lesion and of a false positive.
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return score_lesions(_prediction_lesions(pred, params, merge_prediction),
                         lesions_merged_by_dilation(ref, params.dilation), params, spacing, max_hd95)


def _lesion_maps(masks: Mapping[str, np.ndarray], preset: LesionwisePreset, is_prediction: bool
                 ) -> dict[str, np.ndarray]:
    """Steps 1–3 for every region of ``preset`` on one side (reference or prediction)."""
    own = {region: (_prediction_lesions(masks[region], params, preset.merge_prediction) if is_prediction
                    else lesions_merged_by_dilation(masks[region], params.dilation))
           for region, params in preset.regions.items()}
    merged = dict(own)
    for region, partners in preset.touch_partners.items():
        for partner in partners:  # each against the partner's own lesions, not its merged ones (as officially)
            merged[region] = merge_touching(merged[region], own[partner])
    return merged


def challenge_scores(pred_labels: np.ndarray, ref_labels: np.ndarray, scheme: LabelScheme,
                     preset: str | LesionwisePreset, spacing: Spacing = (1.0, 1.0, 1.0)) -> dict[str, float]:
    """Legacy and lesion-wise scores of every scored region of ``preset`` from two label maps ``(X, Y, Z)``.

    The labels are not checked here (:func:`~brats_ugrip.metrics.evaluation.evaluate_case` does it once a case).

    Returns:
        per region R: ``dice_R``, ``hd95_R`` (legacy), ``lw_dice_R``, ``lw_hd95_R``, ``lw_tp_R``, ``lw_fn_R``,
        ``lw_fp_R``.
    """
    preset = get_lesionwise_preset(preset)
    spacing = tuple(float(s) for s in spacing)
    cap = hd95_cap(preset, ref_labels.shape)
    ref_masks = region_masks(ref_labels, scheme, preset.regions)
    ref_lesions = _lesion_maps(ref_masks, preset, is_prediction=False)
    pred_lesions = _lesion_maps(region_masks(pred_labels, scheme, preset.regions), preset, is_prediction=True)
    row: dict[str, float] = {}
    for region in preset.scored_regions:
        pred = pred_lesions[region] > 0
        score = score_lesions(pred_lesions[region], ref_lesions[region], preset.regions[region], spacing, cap)
        row |= {f"dice_{region}": dice(pred, ref_masks[region]),
                f"hd95_{region}": hd95(pred, ref_masks[region], spacing, cap),
                f"lw_dice_{region}": score.dice, f"lw_hd95_{region}": score.hd95,
                f"lw_tp_{region}": score.n_tp, f"lw_fn_{region}": score.n_fn, f"lw_fp_{region}": score.n_fp}
    return row


def lesionwise_scores(pred_labels: np.ndarray, ref_labels: np.ndarray, scheme: LabelScheme,
                      preset: str | LesionwisePreset, spacing: Spacing = (1.0, 1.0, 1.0)) -> dict[str, float]:
    """The lesion-wise columns (``lw_*``) of :func:`challenge_scores`."""
    row = challenge_scores(pred_labels, ref_labels, scheme, preset, spacing)
    return {column: value for column, value in row.items() if column.startswith("lw_")}
