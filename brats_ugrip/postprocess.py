"""Label-map post-processing and region probabilities → labels: what every prediction path applies last.

The rules, applied to a label map of a scheme (each off, 0, by default):

* ``min_component_size``: connected components of a region smaller than the size are removed, outermost first:
  a small whole-tumour component becomes background, a small tumour-core component becomes oedema, a small
  enhancing component becomes non-enhancing core.
* ``et_to_netc_below``: when the case's whole enhancing volume is below this many voxels (after the rule above),
  every enhancing voxel is relabelled non-enhancing core (NETC): a small false-positive ET costs Dice 0 on a case
  without ET, the BraTS empty-mask convention.

:func:`per_region` reads a per-region setting (one number, ``[TC, WT, ET]`` or ``{TC, WT, ET}``) with errors naming
the key; ensemble specs and fits use it for weights, thresholds and sizes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from brats_ugrip.errors import ConfigError
from brats_ugrip.labels import REGIONS, LabelScheme, get_scheme

COMPONENTS = ndimage.generate_binary_structure(3, 3)
"""26-connectivity, as the BraTS lesion-wise metrics label lesions."""

PerRegion = tuple[float, float, float]


def _number(value: Any, key: str, source: str | None, low: float, high: float, open_interval: bool,
            integer: bool) -> float | int:
    """``value`` checked to be a finite number (an integer when ``integer``) in ``[low, high]`` (open ends when
    ``open_interval``); a :class:`ConfigError` naming ``key`` otherwise."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not math.isfinite(value):
        raise ConfigError(key, f"expected {kind}, got {value!r}", source)
    outside = not low < value < high if open_interval else not low <= value <= high
    if outside:
        bounds = f"in ({low}, {high})" if open_interval else f"≥ {low}" if math.isinf(high) else f"in [{low}, {high}]"
        raise ConfigError(key, f"must be {bounds}, got {value}", source)
    return int(value) if integer else float(value)


def per_region(value: Any, key: str, source: str | None = None, *, low: float = 0.0, high: float = math.inf,
               open_interval: bool = False, integer: bool = False) -> tuple:
    """Read a per-region setting: one number (all regions), a list ``[TC, WT, ET]`` or a mapping ``{TC, WT, ET}``.

    Every value must lie in ``[low, high]`` (``(low, high)`` when ``open_interval``). Errors are
    :class:`ConfigError` naming ``key`` and the region (``models[1].weights.ET``).
    """
    if isinstance(value, dict):
        unknown = sorted(set(map(str, value)) - set(REGIONS))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", f"unknown region; use {', '.join(REGIONS)}", source)
        missing = [r for r in REGIONS if r not in value]
        if missing:
            raise ConfigError(f"{key}.{missing[0]}", "missing; give a value for each of TC, WT, ET", source)
        items = [(f"{key}.{r}", value[r]) for r in REGIONS]
    elif isinstance(value, (list, tuple)):
        if len(value) != len(REGIONS):
            raise ConfigError(key, f"expected 3 values for TC, WT, ET, got {list(value)}", source)
        items = [(f"{key}.{r}", v) for r, v in zip(REGIONS, value)]
    else:
        items = [(key, value)] * len(REGIONS)
    return tuple(_number(v, path, source, low, high, open_interval, integer) for path, v in items)


def region_mapping(values: Sequence[float]) -> dict[str, float]:
    """``(TC, WT, ET)`` → ``{"TC": .., "WT": .., "ET": ..}`` with plain Python numbers (for YAML)."""
    return {r: (int(v) if isinstance(v, (int, np.integer)) else float(v)) for r, v in zip(REGIONS, values)}


def check_keys(values: dict[str, Any], allowed: Sequence[str], prefix: str, source: str | None) -> None:
    """A :class:`ConfigError` naming the first key of ``values`` not in ``allowed`` (under ``prefix``)."""
    unknown = sorted(set(map(str, values)) - set(allowed))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(key, f"unknown key; valid keys here are {', '.join(allowed)}", source)


@dataclass(frozen=True)
class PostProcessing:
    """Label-map post-processing (see the module docstring); every rule is off (0) by default.

    Attributes:
        min_component_size: voxels per region ``(TC, WT, ET)``; components smaller than it are removed.
        et_to_netc_below: voxels; a case's enhancing tumour smaller than it is relabelled NETC.
    """

    min_component_size: tuple[int, int, int] = (0, 0, 0)
    et_to_netc_below: int = 0

    @property
    def enabled(self) -> bool:
        return any(self.min_component_size) or self.et_to_netc_below > 0

    def apply(self, labels: np.ndarray, scheme: LabelScheme | str) -> np.ndarray:
        """Post-process a label map ``(X, Y, Z)`` of ``scheme``: a new map, or ``labels`` itself when every rule is off."""
        if not self.enabled:
            return labels
        scheme = get_scheme(scheme)
        out = labels.copy()
        groups = scheme.region_labels()
        # Outermost first, so that a removed whole-tumour component takes its core with it.
        for region, replacement in (("WT", 0), ("TC", scheme.edema), ("ET", scheme.core)):
            size = self.min_component_size[REGIONS.index(region)]
            if size <= 0:
                continue
            components, count = ndimage.label(np.isin(out, groups[region]), COMPONENTS)
            if count == 0:
                continue
            small = np.bincount(components.ravel()) < size
            small[0] = False  # background
            out[small[components]] = replacement
        if self.et_to_netc_below > 0:
            enhancing = out == scheme.enhancing
            if enhancing.sum() < self.et_to_netc_below:
                out[enhancing] = scheme.core
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"min_component_size": region_mapping(self.min_component_size), "et_to_netc_below": self.et_to_netc_below}

    @classmethod
    def from_dict(cls, values: Any, key: str = "postprocessing", source: str | None = None) -> PostProcessing:
        if values is None:
            return cls()
        if not isinstance(values, dict):
            raise ConfigError(key, f"expected a mapping (min_component_size, et_to_netc_below), got {values!r}", source)
        check_keys(values, ("min_component_size", "et_to_netc_below"), key, source)
        sizes = per_region(values.get("min_component_size", 0), f"{key}.min_component_size", source, integer=True)
        below = _number(values.get("et_to_netc_below", 0), f"{key}.et_to_netc_below", source, 0, math.inf, False, True)
        return cls(sizes, below)


def labels_from_probabilities(probabilities: np.ndarray, thresholds: Sequence[float], scheme: LabelScheme | str,
                              postprocessing: PostProcessing = PostProcessing()) -> np.ndarray:
    """Region probabilities ``(3, X, Y, Z)`` → post-processed label map ``(X, Y, Z)`` (uint8).

    Each channel is thresholded with its own threshold (``p > t``); regions become labels by the scheme.
    """
    regions = np.stack([channel > t for channel, t in zip(probabilities, thresholds, strict=True)])
    return postprocessing.apply(get_scheme(scheme).to_labels(regions), scheme)


# --- uncertainty ----------------------------------------------------------------------------------------------
