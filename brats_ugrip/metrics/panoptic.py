"""BraTS 2025 ("Lighthouse") instance-wise scores, computed by ``panoptica`` (Apache-2.0) itself.

The evaluator is built with the settings of the official BraTS 2025 ``gli`` configuration of the
``brats-evaluation`` package: semantic input, connected-component instances, **maximum bipartite matching on
Dice with threshold 1e-6** (any overlap can match, one-to-one), per-lesion and global DSC, NSD and HD95, and
the zero-TP edge cases (Dice and NSD 0, HD95 infinite; NaN when neither side has a lesion). Region groups come
from the label scheme: ET, TC, WT and the single labels NETC and SNFH (RC, label 4 of BraTS 2024+ GLI, is in no
scheme here).

Columns per region ``R`` (names of the official result parser in brackets)::

    pan_tp_R, pan_fp_R, pan_fn_R     matched / unmatched lesions
    pan_f1_R                         detection F1, panoptica's rq              [all_instance_f1]
    pan_dice_R, pan_nsd_R, pan_hd95_R mean over matched lesions (sq_*)         [lesionwise_*_mean]
    pan_pq_R                         panoptic quality pq_dsc = rq · sq_dsc
    pan_global_dice_R, pan_global_nsd_R, pan_global_hd95_R  whole-region scores [global_*]

An infinite HD95 is reported as :data:`BRATS2025_MAX_HD95` (373 mm), as the official parser does; the per-lesion
means are NaN when the case has no lesion on either side. panoptica computes the global scores in voxel units (it
does not pass the spacing to them), per-lesion NSD and HD95 in mm with the spacing given.

Please cite panoptica (https://github.com/BrainLesion/panoptica#citation) when reporting these scores.
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from functools import cache

import numpy as np
from panoptica import (
    ConnectedComponentsInstanceApproximator,
    InputType,
    MaxBipartiteMatching,
    Metric,
    Panoptica_Evaluator,
    disable_citation_reminder,
)
from panoptica.utils.edge_case_handling import EdgeCaseHandler, EdgeCaseResult, MetricZeroTPEdgeCaseHandling
from panoptica.utils.label_group import LabelGroup, LabelMergeGroup
from panoptica.utils.segmentation_class import SegmentationClassGroups

from brats_ugrip.labels import LabelScheme
from brats_ugrip.metrics.regions import Spacing

BRATS2025_MAX_HD95: float = 373.0
"""HD95 (mm) reported for an infinite distance in BraTS 2025: the diagonal of the SRI-24 grid (official parser)."""

PANOPTIC_REGIONS: tuple[str, ...] = ("ET", "TC", "WT", "NETC", "SNFH")

# Our column name → key of panoptica's PanopticaResult.to_dict().
RESULT_KEYS: dict[str, str] = {
    "pan_tp": "tp", "pan_fp": "fp", "pan_fn": "fn", "pan_f1": "rq",
    "pan_dice": "sq_dsc", "pan_nsd": "sq_nsd", "pan_hd95": "sq_hd95", "pan_pq": "pq_dsc",
    "pan_global_dice": "global_bin_dsc", "pan_global_nsd": "global_bin_nsd", "pan_global_hd95": "global_bin_hd95",
}

# The CLI prints one citation line itself; panoptica's banner would repeat in every worker process.
disable_citation_reminder()


def _zero_tp(result: EdgeCaseResult) -> MetricZeroTPEdgeCaseHandling:
    return MetricZeroTPEdgeCaseHandling(empty_prediction_result=result, empty_reference_result=result,
                                        no_instances_result=EdgeCaseResult.NAN, normal=result)


def brats2025_evaluator(scheme: LabelScheme) -> Panoptica_Evaluator:
    """A panoptica evaluator with the official BraTS 2025 ``gli`` settings, region groups taken from ``scheme``."""
    return _evaluator(scheme.core, scheme.edema, scheme.enhancing)


@cache
def _evaluator(core: int, edema: int, enhancing: int) -> Panoptica_Evaluator:
    metrics = [Metric.DSC, Metric.NSD, Metric.HD95]
    groups = {
        "et": LabelGroup([enhancing]),
        "tc": LabelMergeGroup([core, enhancing]),
        "wt": LabelMergeGroup([core, edema, enhancing]),
        "netc": LabelGroup([core]),
        "snfh": LabelGroup([edema]),
    }
    # Nested regions share labels on purpose; panoptica prints a notice about it on stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        class_groups = SegmentationClassGroups(groups)
    return Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=MaxBipartiteMatching(matching_metric=Metric.DSC, matching_threshold=1e-6),
        edge_case_handler=EdgeCaseHandler({Metric.DSC: _zero_tp(EdgeCaseResult.ZERO),
                                           Metric.NSD: _zero_tp(EdgeCaseResult.ZERO),
                                           Metric.HD95: _zero_tp(EdgeCaseResult.INF)}),
        segmentation_class_groups=class_groups,
        instance_metrics=metrics,
        global_metrics=metrics,
        log_times=False,
        verbose=False,
    )


def panoptic_scores(pred_labels: np.ndarray, ref_labels: np.ndarray, scheme: LabelScheme,
                    spacing: Spacing = (1.0, 1.0, 1.0)) -> dict[str, float]:
    """BraTS 2025 scores of two label maps ``(X, Y, Z)`` in ``scheme``, columns as in the module docstring.

    The labels are not checked here (:func:`~brats_ugrip.metrics.evaluation.evaluate_case` does it once a case).
    """
    with warnings.catch_warnings():
        # Global NSD runs without spacing and warns that its 0.5-voxel default tolerance is used (as officially).
        warnings.filterwarnings("ignore", message=".*threshold is set to 0.5.*", category=UserWarning)
        results = brats2025_evaluator(scheme).evaluate(
            np.asarray(pred_labels, dtype=np.int32), np.asarray(ref_labels, dtype=np.int32),
            voxelspacing=tuple(float(s) for s in spacing))
    row: dict[str, float] = {}
    for region in PANOPTIC_REGIONS:
        values = results[region.lower()].to_dict(True)
        for column, key in RESULT_KEYS.items():
            value = float(values[key]) if values.get(key) is not None else math.nan
            if column.endswith("hd95") and math.isinf(value):
                value = BRATS2025_MAX_HD95
            row[f"{column}_{region}"] = value
    return row
