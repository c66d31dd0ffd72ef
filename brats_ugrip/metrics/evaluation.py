"""Score cases and folders of predictions against BraTS references with a named metric set.

Metric sets (:data:`METRIC_SETS`):

* ``regions``: Dice and HD95 of TC, WT, ET (:mod:`~brats_ugrip.metrics.regions`).
* ``brats2023-gli`` … ``brats2024-met``: the legacy (whole-region) and lesion-wise scores of that challenge and
  year, as its official code computes them (:mod:`~brats_ugrip.metrics.lesionwise`; the rules and the official
  script of each set are in :mod:`~brats_ugrip.metrics.rules`).
* ``brats2025``: panoptica with the BraTS 2025 settings (:mod:`~brats_ugrip.metrics.panoptic`).

Folder layout: references ``REF/<ID>/<ID>-seg.nii.gz`` (BraTS case folders, also ``_seg``), or flat
``REF/<ID>-seg.nii.gz`` / ``REF/<ID>.nii.gz``; predictions ``PRED/<ID>.nii.gz``. A reference without a prediction is
scored as the worst case (see :func:`worst_case`), never skipped; its row says ``prediction_missing``.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brats_ugrip.errors import ConfigError, DataError
from brats_ugrip.io import load_nifti, read_volume
from brats_ugrip.labels import LabelScheme, get_scheme
from brats_ugrip.metrics.lesionwise import challenge_scores
from brats_ugrip.metrics.regions import BRATS_MAX_HD95, Spacing, label_map_scores
from brats_ugrip.metrics.rules import LESIONWISE_PRESETS, image_diagonal
from brats_ugrip.progress import progress_task

CaseScorer = Callable[[np.ndarray, np.ndarray, LabelScheme, Spacing], dict[str, float]]
COUNT_NAMES = frozenset({"tp", "fp", "fn"})


@dataclass(frozen=True)
class MetricSet:
    """A named set of per-case scores.

    Args:
        name: registry key, the value of ``--metrics``.
        score: ``(pred_labels, ref_labels, scheme, spacing) → {column: value}``.
        max_hd95: the HD95 a missing prediction scores (the challenge's convention); None: the image diagonal in
            voxels (official 2024 MET).
        official: the official code and year the set reproduces, for reports.
    """

    name: str
    score: CaseScorer
    max_hd95: float | None
    official: str

    def cap(self, shape: tuple[int, ...]) -> float:
        """The HD95 cap for an image of ``shape``."""
        return image_diagonal(shape) if self.max_hd95 is None else self.max_hd95


def _lesionwise_set(preset: str) -> MetricSet:
    def score(pred: np.ndarray, ref: np.ndarray, scheme: LabelScheme, spacing: Spacing) -> dict[str, float]:
        return challenge_scores(pred, ref, scheme, preset, spacing)
    rules = LESIONWISE_PRESETS[preset]
    return MetricSet(preset, score, rules.max_hd95, rules.official)


def _panoptic_scores(pred: np.ndarray, ref: np.ndarray, scheme: LabelScheme, spacing: Spacing) -> dict[str, float]:
    from brats_ugrip.metrics.panoptic import panoptic_scores  # panoptica is slow to import: only when used

    return panoptic_scores(pred, ref, scheme, spacing)


METRIC_SETS: dict[str, MetricSet] = {
    "regions": MetricSet("regions", label_map_scores, BRATS_MAX_HD95,
                         "none: this project's Dice and HD95 (BraTS 2023/2024 definitions) of TC, WT, ET"),
    **{name: _lesionwise_set(name) for name in LESIONWISE_PRESETS},
    "brats2025": MetricSet("brats2025", _panoptic_scores, 373.0,  # panoptic.BRATS2025_MAX_HD95
                           "BrainLesion/panoptica with the brats-evaluation BraTS 2025 settings (2025)"),
}


def get_metric_set(name: str) -> MetricSet:
    """Look a metric set up by name; unknown names raise :class:`ConfigError` listing the choices."""
    try:
        return METRIC_SETS[name]
    except KeyError:
        raise ConfigError("metrics", f"unknown metric set {name!r}; choose one of {sorted(METRIC_SETS)}") from None


def evaluate_case(pred_labels: np.ndarray, ref_labels: np.ndarray, scheme: str | LabelScheme, metrics: str,
                  spacing: Spacing = (1.0, 1.0, 1.0)) -> dict[str, float]:
    """Scores of one case.

    Args:
        pred_labels, ref_labels: integer label maps ``(X, Y, Z)`` in ``scheme``.
        scheme: label scheme or its name.
        metrics: metric set name (see :data:`METRIC_SETS`).
        spacing: voxel size in mm.

    Returns:
        flat ``{column: value}``, e.g. ``dice_ET``, ``hd95_TC``, ``lw_dice_WT``, ``lw_hd95_ET``, ``pan_f1_ET``.

    Raises:
        DataError: the shapes differ or a label is outside ``scheme``.
    """
    metric_set, scheme = get_metric_set(metrics), get_scheme(scheme)
    if pred_labels.shape != ref_labels.shape:
        raise DataError(f"prediction shape {pred_labels.shape} differs from reference shape {ref_labels.shape}")
    scheme.check(pred_labels, "prediction")
    scheme.check(ref_labels, "reference")
    return metric_set.score(pred_labels, ref_labels, scheme, tuple(float(s) for s in spacing))


def worst_case(ref_labels: np.ndarray, scheme: str | LabelScheme, metrics: str,
               spacing: Spacing = (1.0, 1.0, 1.0)) -> dict[str, float]:
    """The scores of a missing prediction: every HD95 at the set's maximum, every other score 0.

    Lesion counts are those of an empty prediction (no TP, no FP, every reference lesion a FN).
    """
    row = evaluate_case(np.zeros_like(ref_labels), ref_labels, scheme, metrics, spacing)
    max_hd95 = get_metric_set(metrics).cap(ref_labels.shape)
    for column in row:
        names = set(column.split("_"))
        if "hd95" in names:
            row[column] = max_hd95
        elif not names & COUNT_NAMES:
            row[column] = 0.0
    return row


def find_reference_cases(ref_dir: Path) -> dict[str, Path]:
    """``{case_id: segmentation path}`` of a reference folder, in the layouts of the module docstring, sorted."""
    ref_dir = Path(ref_dir)
    if not ref_dir.is_dir():
        raise DataError(f"{ref_dir}: reference folder not found")
    cases: dict[str, Path] = {}
    for entry in sorted(ref_dir.iterdir()):
        if entry.is_dir():
            for suffix in ("-seg.nii.gz", "_seg.nii.gz"):
                if (entry / f"{entry.name}{suffix}").is_file():
                    cases[entry.name] = entry / f"{entry.name}{suffix}"
                    break
        elif entry.name.endswith(".nii.gz"):
            stem = entry.name.removesuffix(".nii.gz")
            cases[stem.removesuffix("-seg").removesuffix("_seg")] = entry
    if not cases:
        raise DataError(f"{ref_dir}: no reference segmentations found; expected <ID>/<ID>-seg.nii.gz, "
                        "<ID>-seg.nii.gz or <ID>.nii.gz")
    return cases


def _check_shapes(case_id: str, pred_path: Path, ref_path: Path) -> None:
    pred_shape, ref_shape = load_nifti(pred_path).shape[:3], load_nifti(ref_path).shape[:3]
    if pred_shape != ref_shape:
        raise DataError(f"case {case_id}: prediction {pred_path} has shape {pred_shape} but reference {ref_path} "
                        f"has shape {ref_shape}; predictions must be in the reference geometry")


def read_label_map(path: Path, scheme: LabelScheme) -> np.ndarray:
    """An integer label map ``(X, Y, Z)`` from a NIfTI file; :class:`DataError` naming the file if it holds
    non-integer values or labels outside ``scheme``."""
    data, _ = read_volume(path, dtype=np.float32)
    labels = np.rint(data)
    if not np.array_equal(labels, data):
        raise DataError(f"{path}: holds non-integer values; expected a label map (is it a probability map?)")
    labels = labels.astype(np.int16)
    scheme.check(labels, str(path))
    return labels


def score_files(case_id: str, pred_path: Path | None, ref_path: Path, scheme: str, metrics: str) -> dict[str, float]:
    """The CSV row of one case: ``case_id``, ``prediction_missing`` and the scores (spacing from the reference)."""
    label_scheme = get_scheme(scheme)
    ref_labels = read_label_map(ref_path, label_scheme)
    spacing = tuple(float(z) for z in load_nifti(ref_path).header.get_zooms()[:3])
    if pred_path is None:
        return {"case_id": case_id, "prediction_missing": True} | worst_case(ref_labels, label_scheme, metrics, spacing)
    pred_labels = read_label_map(pred_path, label_scheme)
    # Both files were checked above, with their names in any error: score without checking again.
    scores = get_metric_set(metrics).score(pred_labels, ref_labels, label_scheme, spacing)
    return {"case_id": case_id, "prediction_missing": False} | scores


def evaluate_dirs(pred_dir: str | os.PathLike[str], ref_dir: str | os.PathLike[str], scheme: str = "brats2023",
                  metrics: str = "regions", workers: int = 1) -> pd.DataFrame:
    """Score every reference case against ``pred_dir/<ID>.nii.gz``, in parallel processes (progress: brats_ugrip.progress).

    Returns:
        one row per reference case (sorted by id): ``case_id``, ``prediction_missing`` and the metric columns.
        Missing predictions are in ``DataFrame.attrs["missing"]``; extra predictions with no reference in
        ``attrs["unmatched_predictions"]``.

    Raises:
        DataError: a folder or file is missing or unreadable, a label is outside the scheme, or a prediction's
            shape differs from its reference (named by case).
    """
    get_metric_set(metrics)
    get_scheme(scheme)
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder not found")
    references = find_reference_cases(Path(ref_dir))
    predictions: dict[str, Path | None] = {}
    for case_id in references:
        path = pred_dir / f"{case_id}.nii.gz"
        predictions[case_id] = path if path.is_file() else None
    missing = [case_id for case_id, path in predictions.items() if path is None]
    for case_id, pred_path in predictions.items():  # headers only: fail before any scoring
        if pred_path is not None:
            _check_shapes(case_id, pred_path, references[case_id])

    jobs = [(case_id, predictions[case_id], references[case_id], scheme, metrics) for case_id in references]
    rows: dict[str, dict[str, float]] = {}
    with progress_task(f"scoring ({metrics})", len(jobs)) as task:
        if workers <= 1:
            for job in jobs:
                rows[job[0]] = score_files(*job)
                task.advance()
        else:
            with ProcessPoolExecutor(workers) as pool:
                futures = {pool.submit(score_files, *job): job[0] for job in jobs}
                try:
                    for future in as_completed(futures):
                        rows[futures[future]] = future.result()
                        task.advance()
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)  # stop at the first bad case
                    raise
    table = pd.DataFrame([rows[case_id] for case_id in references])
    table.attrs["missing"] = missing
    expected = {f"{case_id}.nii.gz" for case_id in references}
    table.attrs["unmatched_predictions"] = sorted(p.name for p in pred_dir.glob("*.nii.gz") if p.name not in expected)
    return table


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and median of every score column over cases (NaN ignored); metric × statistic."""
    scores = table.drop(columns=["case_id", "prediction_missing"], errors="ignore").select_dtypes("number")
    return pd.DataFrame({"mean": scores.mean(), "std": scores.std(), "median": scores.median()})
