"""Per-region Dice and HD95 (the "legacy" BraTS scores) on TC, WT, ET.

Definitions
    * **Dice** ``2|P ∩ R| / (|P| + |R|)``, counted in numpy as the official code does.
    * **HD95** is the BraTS 2023/2024 official one: DeepMind's ``surface-distance`` package (Apache-2.0),
      ``compute_surface_distances(reference, prediction, spacing)`` then ``compute_robust_hausdorff(…, 95)``. Each
      surface element is weighted by its area in mm², the 95th percentile is taken in each direction, and the
      larger of the two is returned. Masks are binary (see :mod:`~brats_ugrip.metrics.lesionwise` for the official
      2024 code, which passes numbered lesion maps to this call; that is not reproduced).

Empty masks follow the BraTS convention:

==================  =====  ============================================
prediction / ref    Dice   HD95
==================  =====  ============================================
both empty          1      0
exactly one empty   0      ``max_hd95``: :data:`BRATS_MAX_HD95` (374 mm)
==================  =====  ============================================

(The official code gets an infinite distance there and replaces it by its cap; a finite HD95 is never capped.)
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from surface_distance import compute_robust_hausdorff, compute_surface_distances

from brats_ugrip.labels import REGIONS, LabelScheme, get_scheme

BRATS_MAX_HD95: float = 374.0
"""HD95 (mm) scored when exactly one of prediction and reference is empty, and the cap for an infinite distance:
the BraTS 2023/2024 convention, the diagonal of the 240×240×155 grid at 1 mm (373.1 mm) rounded up."""

Spacing = Sequence[float]


def region_masks(label_map: np.ndarray, scheme: LabelScheme, names: Iterable[str] = REGIONS) -> dict[str, np.ndarray]:
    """Boolean masks ``(X, Y, Z)`` of the named regions of a label map: any of TC, WT, ET, NETC, SNFH.

    NETC and SNFH (BraTS 2023+ names) are the scheme's *core* label alone and its *edema* label alone.
    """
    groups = {**scheme.region_labels(), "NETC": (scheme.core,), "SNFH": (scheme.edema,)}
    return {name: np.isin(label_map, groups[name]) for name in names}


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the bounding box of a boolean mask grown by ``margin`` voxels (clipped at the edges); None if empty."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(max(int(hits[0]) - margin, 0), int(hits[-1]) + 1 + margin))
    return tuple(box)


def crop_to_union(pred: np.ndarray, ref: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to the bounding box of ``pred | ref`` grown by ``margin`` voxels.

    Dice and surface distances do not change, and MONAI's tensor ops then touch the tumour, not the whole head.
    """
    box = bounding_box(pred | ref, margin)
    return (pred, ref) if box is None else (pred[box], ref[box])


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks ``(X, Y, Z)``; 1 when both are empty, 0 when only one is."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    total = np.count_nonzero(pred) + np.count_nonzero(ref)
    # The BraTS convention (as the official code): both empty → 1, exactly one empty → 0.
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(pred & ref) / total


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Spacing = (1.0, 1.0, 1.0),
         max_hd95: float = BRATS_MAX_HD95) -> float:
    """Official BraTS HD95 in mm of two boolean masks ``(X, Y, Z)`` with voxel ``spacing``; empty cases as in the
    table above (``max_hd95`` when exactly one is empty)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    pred_any, ref_any = bool(pred.any()), bool(ref.any())
    if not pred_any and not ref_any:
        return 0.0
    if pred_any != ref_any:
        # Handled here: surface-distance 0.1 would reach np.Inf, which numpy 2 no longer has.
        return float(max_hd95)
    pred, ref = (np.ascontiguousarray(m) for m in crop_to_union(pred, ref))
    distances = compute_surface_distances(ref, pred, [float(s) for s in spacing])
    return float(compute_robust_hausdorff(distances, 95))


def region_scores(pred_regions: np.ndarray, ref_regions: np.ndarray, spacing: Spacing = (1.0, 1.0, 1.0),
                  names: Sequence[str] = REGIONS) -> dict[str, float]:
    """Dice and HD95 per region from boolean region channels ``(C, X, Y, Z)`` named ``names`` (default TC, WT, ET).

    Returns:
        ``{"dice_TC": …, "hd95_TC": …, …}``.
    """
    if pred_regions.shape != ref_regions.shape:
        raise ValueError(f"prediction shape {pred_regions.shape} differs from reference shape {ref_regions.shape}")
    scores: dict[str, float] = {}
    for name, pred, ref in zip(names, pred_regions.astype(bool), ref_regions.astype(bool), strict=True):
        scores[f"dice_{name}"] = dice(pred, ref)
        scores[f"hd95_{name}"] = hd95(pred, ref, spacing)
    return scores


def label_map_scores(labels: np.ndarray, reference: np.ndarray, scheme: LabelScheme | str,
                     spacing: Spacing = (1.0, 1.0, 1.0), with_hd95: bool = True) -> dict[str, float]:
    """The one scorer of a label map: Dice and (with ``with_hd95``) official HD95 in mm of TC, WT, ET.

    Args:
        labels: the predicted label map ``(X, Y, Z)`` in ``scheme``, as written to disk.
        reference: the reference label map ``(X, Y, Z)`` in ``scheme``, or its region channels ``(3, X, Y, Z)``
            ordered TC, WT, ET (as held-out sets keep them).

    Returns:
        ``{"dice_TC": …, "hd95_TC": …, …}`` (no ``hd95_*`` without ``with_hd95``). The labels are not checked
        here (:func:`~brats_ugrip.metrics.evaluation.evaluate_case` checks them once a case).
    """
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    masks = region_masks(labels, scheme)
    pred = np.stack([masks[r] for r in REGIONS])
    if reference.ndim == pred.ndim:
        ref = np.asarray(reference, bool)
    else:
        ref_masks = region_masks(reference, scheme)
        ref = np.stack([ref_masks[r] for r in REGIONS])
    if with_hd95:
        return region_scores(pred, ref, spacing)
    return {f"dice_{name}": dice(p, r) for name, p, r in zip(REGIONS, pred, ref, strict=True)}
