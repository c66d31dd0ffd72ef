"""Label schemes: BraTS label maps ⇄ the three nested region channels TC, WT, ET.

Region channels are always ordered ``(TC, WT, ET)`` as in MONAI's BraTS transforms. Every scheme has three
tumour labels: *core* (tumour core that is not enhancing), *edema* (whole tumour outside the core) and
*enhancing*. Regions are unions of them::

    TC = {core, enhancing}    WT = {core, edema, enhancing}    ET = {enhancing}

``to_labels`` is the exact inverse of ``to_regions`` on consistent channels (ET ⊂ TC ⊂ WT). Inconsistent
(predicted) channels are resolved by the rule **the innermost positive region wins**: a voxel with ET on is
enhancing; otherwise with TC on it is core; otherwise with WT on it is edema; otherwise background. So an ET
voxel outside WT is still labelled enhancing, and the resulting map is consistent by construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brats_ugrip.errors import DataError

REGIONS: tuple[str, str, str] = ("TC", "WT", "ET")


@dataclass(frozen=True)
class LabelScheme:
    """One labelling convention.

    Args:
        name: registry name, e.g. ``"brats2023"``.
        core, edema, enhancing: the integer label of each tumour class.
        label_names: human names of the labels, for reports.
    """

    name: str
    core: int
    edema: int
    enhancing: int
    label_names: dict[int, str]

    @property
    def labels(self) -> tuple[int, ...]:
        """All valid label values, background included, sorted."""
        return tuple(sorted({0, self.core, self.edema, self.enhancing}))

    def region_labels(self) -> dict[str, tuple[int, ...]]:
        """The labels that make up each region."""
        return {
            "TC": (self.core, self.enhancing),
            "WT": (self.core, self.edema, self.enhancing),
            "ET": (self.enhancing,),
        }

    def check(self, label_map: np.ndarray, source: str = "label map") -> None:
        """Raise :class:`DataError` naming ``source`` and the values if ``label_map`` has labels outside the scheme."""
        values = np.unique(label_map)
        bad = [v for v in values.tolist() if v not in self.labels]
        if bad:
            raise DataError(
                f"{source}: label value(s) {bad} are not in the {self.name!r} scheme (valid: {list(self.labels)}); "
                "pick the scheme that matches the data (brats2023, brats2021 or msd)"
            )

    def to_regions(self, label_map: np.ndarray, source: str = "label map") -> np.ndarray:
        """Label map ``(*spatial)`` → boolean region channels ``(3, *spatial)`` ordered TC, WT, ET."""
        label_map = np.asarray(label_map)
        if not np.issubdtype(label_map.dtype, np.integer):
            rounded = np.rint(label_map)
            if not np.array_equal(rounded, label_map):
                raise DataError(f"{source}: label map holds non-integer values; is this an image instead of a segmentation?")
            label_map = rounded.astype(np.int16)
        self.check(label_map, source)
        groups = self.region_labels()
        return np.stack([np.isin(label_map, groups[r]) for r in REGIONS])

    def to_labels(self, regions: np.ndarray, dtype: np.dtype = np.uint8) -> np.ndarray:
        """Region channels ``(3, *spatial)`` (bool, or probabilities thresholded at 0.5) → label map ``(*spatial)``.

        Inconsistent channels follow the innermost-wins rule of the module docstring.
        """
        regions = np.asarray(regions)
        if regions.shape[0] != 3:
            raise ValueError(f"expected 3 region channels (TC, WT, ET), got shape {regions.shape}")
        if regions.dtype != bool:
            regions = regions > 0.5
        tc, wt, et = regions
        out = np.zeros(regions.shape[1:], dtype=dtype)
        out[wt] = self.edema
        out[tc] = self.core
        out[et] = self.enhancing
        return out


SCHEMES: dict[str, LabelScheme] = {
    "brats2023": LabelScheme("brats2023", core=1, edema=2, enhancing=3,
                             label_names={0: "background", 1: "NETC", 2: "SNFH", 3: "ET"}),
    "brats2021": LabelScheme("brats2021", core=1, edema=2, enhancing=4,
                             label_names={0: "background", 1: "NCR", 2: "ED", 4: "ET"}),
    "msd": LabelScheme("msd", core=2, edema=1, enhancing=3,
                       label_names={0: "background", 1: "edema", 2: "non-enhancing tumour", 3: "enhancing tumour"}),
}


def get_scheme(name: str | LabelScheme) -> LabelScheme:
    """Look a scheme up by name (``brats2023``, ``brats2021``, ``msd``)."""
    if isinstance(name, LabelScheme):
        return name
    try:
        return SCHEMES[name]
    except KeyError:
        raise DataError(f"unknown label scheme {name!r}; choose one of {sorted(SCHEMES)}") from None
