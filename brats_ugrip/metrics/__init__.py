"""BraTS metrics: region Dice/HD95, the official BraTS 2023/2024 scores (rules in one table), BraTS 2025 (panoptica).

Region channels are ordered TC, WT, ET; label maps are converted with a :class:`~brats_ugrip.labels.LabelScheme`.
"""
from brats_ugrip.metrics.evaluation import (
    METRIC_SETS,
    MetricSet,
    evaluate_case,
    evaluate_dirs,
    find_reference_cases,
    get_metric_set,
    summary,
    worst_case,
)
from brats_ugrip.metrics.lesionwise import (
    LESIONWISE_PRESETS,
    LesionParams,
    LesionwisePreset,
    LesionwiseScore,
    challenge_scores,
    get_lesionwise_preset,
    lesionwise_score,
    lesionwise_scores,
)
from brats_ugrip.metrics.regions import (
    BRATS_MAX_HD95,
    dice,
    hd95,
    label_map_scores,
    region_masks,
    region_scores,
)

__all__ = [
    "BRATS2025_MAX_HD95", "BRATS_MAX_HD95", "LESIONWISE_PRESETS", "METRIC_SETS", "LesionParams", "LesionwisePreset",
    "LesionwiseScore", "MetricSet", "brats2025_evaluator", "challenge_scores", "dice", "evaluate_case", "evaluate_dirs",
    "find_reference_cases", "get_lesionwise_preset", "get_metric_set", "hd95", "lesionwise_score",
    "lesionwise_scores", "panoptic_scores", "region_masks", "region_scores", "label_map_scores", "summary",
    "worst_case",
]
_PANOPTIC = ("BRATS2025_MAX_HD95", "brats2025_evaluator", "panoptic_scores")


def __getattr__(name: str):
    # panoptica takes seconds to import: only the 2025 metric set loads it, when it is used.
    if name in _PANOPTIC:
        from brats_ugrip.metrics import panoptic

        return getattr(panoptic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
