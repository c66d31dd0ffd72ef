"""The rules of each BraTS challenge's official scoring code, in one table (:data:`LESIONWISE_PRESETS`).

Each metric set ``brats20YY-xxx`` reproduces one official script, named in :attr:`LesionwisePreset.official`:

* 2023: ``rachitsaluja/BraTS-2023-Metrics`` ``metrics.py`` with ``challenge_name`` BraTS-GLI, -SSA, -PED, -MEN, -MET.
* 2024: ``rachitsaluja/BraTS-2024-Metrics`` ``metrics_GLI.py``, ``metrics_SSA.py``, ``metrics_PED.py``,
  ``metrics_MET.py``. (``metrics_MEN_RT.py`` scores a GTV label that no label scheme here has: not offered.)

What the table says, region by region and set by set (the steps are in :mod:`~brats_ugrip.metrics.lesionwise`):

=================  =========  ===================  ==========  ========  =====================================
set                dilation   threshold            HD95 cap    cleanup   ET / NETC / SNFH merged by touching
=================  =========  ===================  ==========  ========  =====================================
brats2023-gli      3          50 mm³               374         no        no
brats2023-ssa      3          50 mm³               374         no        no
brats2023-ped      3          50 mm³               374         no        no
brats2023-men      1          50 mm³               374         no        no
brats2023-met      1          2 mm³                374         no        no
brats2024-gli      3 (NETC 5) 20 (ET 10)           337         yes       ET←NETC, NETC←ET, SNFH←ET then ←NETC
brats2024-ssa      3          50                   374         yes       ET←NETC
brats2024-ped      5          10                   374         yes       no
brats2024-met      1          2                    diagonal    yes       ET←NETC
=================  =========  ===================  ==========  ========  =====================================

* **threshold**: reference lesions of volume ≤ threshold (voxel count × voxel volume, mm³) are not scored. With
  *cleanup* (2024), predicted lesions of ≤ threshold **voxels** (a count, not mm³: they differ off 1 mm grids)
  are deleted first, and the legacy Dice/HD95 are computed on that cleaned prediction too.
* **HD95 cap**: the HD95 of a missed lesion, of each false positive, and of a region present on one side only.
  2024 GLI uses 337; ``diagonal`` is the official MET rule ``sqrt(X² + Y² + Z²)`` of the image shape in voxels
  (373.13 on 240×240×155).
* **2024 GLI SNFH dilates 3 times**: the official code means 5 but tests a misspelt name (``"SFNH"``), so 3 is what
  teams were scored with, and what this table says.
* **merged by touching** (official ``combine_lesions_*``): lesions of a region that touch (18-neighbourhood) lesions
  of a partner region are relabelled by the partner lesion they touch, so two ET lesions on one NETC lesion score
  as one ET lesion. 2024 PED has no such step, nor does any 2023 set.

A region with ``scored=False`` (NETC in 2024 SSA and MET) is not reported; its lesions only serve as partners.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from brats_ugrip.errors import ConfigError
from brats_ugrip.metrics.regions import BRATS_MAX_HD95

BRATS2024_GLI_MAX_HD95: float = 337.0
"""The HD95 cap of the official BraTS 2024 GLI code (mm)."""


@dataclass(frozen=True)
class LesionParams:
    """Rules of one region: ``dilation`` iterations (18-connected structure) that merge nearby lesions, and the
    ``threshold``: reference lesions of ≤ threshold mm³ are not scored (with cleanup, predicted lesions of ≤
    threshold voxels are deleted). ``scored=False``: the region is only a touching partner of another."""

    dilation: int
    threshold: float
    scored: bool = True


@dataclass(frozen=True)
class LesionwisePreset:
    """The rules of one official scoring script.

    Args:
        name: registry key and ``--metrics`` value, e.g. ``"brats2024-gli"``.
        official: the official code this set reproduces (repository, script, challenge name).
        regions: rules per region (TC, WT, ET, NETC, SNFH), scored ones in report order.
        max_hd95: HD95 cap in mm; None is the image diagonal in voxels (2024 MET).
        merge_prediction: 2024 cleanup: prediction lesions are merged by dilation like the reference, those of
            ≤ threshold voxels deleted, and the legacy Dice/HD95 computed on what is left.
        touch_partners: region → partner regions, in the official order, whose lesions merge the region's
            lesions that touch the same partner lesion.
    """

    name: str
    official: str
    regions: Mapping[str, LesionParams]
    max_hd95: float | None
    merge_prediction: bool
    touch_partners: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def scored_regions(self) -> tuple[str, ...]:
        return tuple(name for name, params in self.regions.items() if params.scored)


def _same(dilation: int, threshold: float, *names: str) -> dict[str, LesionParams]:
    return {name: LesionParams(dilation, threshold) for name in names}


_V2023 = "rachitsaluja/BraTS-2023-Metrics metrics.py"
_V2024 = "rachitsaluja/BraTS-2024-Metrics"
_PARTNER = False  # readability: LesionParams(..., scored=_PARTNER)

LESIONWISE_PRESETS: dict[str, LesionwisePreset] = {p.name: p for p in (
    LesionwisePreset("brats2023-gli", f"{_V2023} (BraTS-GLI, 2023)", _same(3, 50, "WT", "TC", "ET"),
                     BRATS_MAX_HD95, False),
    LesionwisePreset("brats2023-ssa", f"{_V2023} (BraTS-SSA, 2023)", _same(3, 50, "WT", "TC", "ET"),
                     BRATS_MAX_HD95, False),
    LesionwisePreset("brats2023-ped", f"{_V2023} (BraTS-PED, 2023)", _same(3, 50, "WT", "TC", "ET"),
                     BRATS_MAX_HD95, False),
    LesionwisePreset("brats2023-men", f"{_V2023} (BraTS-MEN, 2023)", _same(1, 50, "WT", "TC", "ET"),
                     BRATS_MAX_HD95, False),
    LesionwisePreset("brats2023-met", f"{_V2023} (BraTS-MET, 2023)", _same(1, 2, "WT", "TC", "ET"),
                     BRATS_MAX_HD95, False),
    LesionwisePreset("brats2024-gli", f"{_V2024} metrics_GLI.py (BraTS-GLI, 2024)",
                     {**_same(3, 20, "WT", "TC"), "NETC": LesionParams(5, 20), "SNFH": LesionParams(3, 20),
                      "ET": LesionParams(3, 10)},
                     BRATS2024_GLI_MAX_HD95, True,
                     {"NETC": ("ET",), "ET": ("NETC",), "SNFH": ("ET", "NETC")}),
    LesionwisePreset("brats2024-ssa", f"{_V2024} metrics_SSA.py (BraTS-SSA, 2024)",
                     {**_same(3, 50, "WT", "TC", "ET"), "NETC": LesionParams(3, 50, scored=_PARTNER)},
                     BRATS_MAX_HD95, True, {"ET": ("NETC",)}),
    LesionwisePreset("brats2024-ped", f"{_V2024} metrics_PED.py (BraTS-PED, 2024)", _same(5, 10, "WT", "TC", "ET"),
                     BRATS_MAX_HD95, True),
    LesionwisePreset("brats2024-met", f"{_V2024} metrics_MET.py (BraTS-MET, 2024)",
                     {**_same(1, 2, "WT", "TC", "ET"), "NETC": LesionParams(1, 2, scored=_PARTNER)},
                     None, True, {"ET": ("NETC",)}),
)}


def get_lesionwise_preset(name: str | LesionwisePreset) -> LesionwisePreset:
    """Look a preset up by name (see :data:`LESIONWISE_PRESETS`)."""
    if isinstance(name, LesionwisePreset):
        return name
    try:
        return LESIONWISE_PRESETS[name]
    except KeyError:
        raise ConfigError("preset", f"unknown lesion-wise preset {name!r}; choose one of {sorted(LESIONWISE_PRESETS)}"
                          ) from None


def image_diagonal(shape: tuple[int, ...]) -> float:
    """``sqrt(X² + Y² + Z²)`` of an image shape in voxels: the official 2024 MET HD95 cap."""
    return float(sum(int(n) ** 2 for n in shape) ** 0.5)


def hd95_cap(preset: LesionwisePreset, shape: tuple[int, ...]) -> float:
    """The HD95 cap (mm) of ``preset`` for an image of ``shape``."""
    return image_diagonal(shape) if preset.max_hd95 is None else preset.max_hd95
