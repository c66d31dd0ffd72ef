"""Ensemble specs: the ``ensemble.yaml`` file, its members, and a spec from a list of checkpoints.

For N models with per-channel weights ``w_n = (w_TC, w_WT, w_ET)`` the ensemble's probabilities are, channel by
channel, ``y_c = Σ_n w_nc · f_nc(x) / Σ_n w_nc`` (``ensembling/predict.py`` runs it). A spec holds everything
needed to run an ensemble, and is what ``mlcube/`` packages::

    format: 1
    label_scheme: brats2023            # optional: default the models' (they must agree)
    thresholds: {TC: 0.5, WT: 0.5, ET: 0.45}
    models:                            # paths relative to this file
      - path: models/fold0.ckpt
        weights: {TC: 0.6, WT: 0.5, ET: 0.7}
        inference: {tta: true, overlap: 0.5}   # optional overrides of the checkpoint's inference settings
      - path: models/fold1.ckpt
        weights: 1.0                   # one number: the same weight for TC, WT and ET
    postprocessing:                    # each rule off (0) by default (brats_ugrip/postprocess.py)
      min_component_size: {TC: 0, WT: 50, ET: 0}   # voxels (26-connected components)
      et_to_netc_below: 0              # voxels
    fit: {...}                         # written by ensembling/fit.py: method, fold, scores (informative)

Loading validates every key and value; errors are :class:`ConfigError` naming the file and the key
(``models[1].weights.ET``). Nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brats_ugrip.atomic import atomic_write_yaml
from brats_ugrip.config import InferenceConfig
from brats_ugrip.errors import ConfigError
from brats_ugrip.files import read_yaml
from brats_ugrip.labels import REGIONS, SCHEMES
from brats_ugrip.postprocess import PerRegion, PostProcessing, check_keys, per_region, region_mapping

SPEC_FORMAT = 1
INFERENCE_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(InferenceConfig) if f.name != "threshold")
"""Per-model inference settings a spec may override (thresholds are the ensemble's, per channel)."""


@dataclass
class EnsembleMember:
    """One model of an ensemble.

    Attributes:
        path: the checkpoint (absolute once loaded).
        weights: ``(TC, WT, ET)`` weights, ≥ 0.
        inference: overrides of the checkpoint's inference settings (keys of :data:`INFERENCE_KEYS`).
    """

    path: Path
    weights: PerRegion = (1.0, 1.0, 1.0)
    inference: dict[str, Any] = field(default_factory=dict)


@dataclass
class EnsembleSpec:
    """An ensemble: models with per-channel weights, per-channel thresholds, post-processing (module docstring).

    Attributes:
        members: the models.
        thresholds: ``(TC, WT, ET)`` thresholds on the averaged probabilities.
        label_scheme: scheme of the written label maps; None uses the models' (which must then agree).
        postprocessing: label-map post-processing (off by default).
        fit: how the weights were chosen and scored (written by ``ensembling/fit.py``), informative only.
    """

    members: list[EnsembleMember]
    thresholds: PerRegion = (0.5, 0.5, 0.5)
    label_scheme: str | None = None
    postprocessing: PostProcessing = PostProcessing()
    fit: dict[str, Any] | None = None

    @property
    def weights(self) -> np.ndarray:
        """``(N, 3)`` float64 weights, rows in model order, columns TC, WT, ET."""
        return np.array([m.weights for m in self.members], dtype=np.float64)

    def with_weights(self, weights: np.ndarray, **changes: Any) -> EnsembleSpec:
        """A copy with new ``(N, 3)`` weights (and other fields, e.g. ``thresholds``)."""
        members = [dataclasses.replace(m, weights=tuple(float(v) for v in row))
                   for m, row in zip(self.members, weights, strict=True)]
        spec = dataclasses.replace(self, members=members, **changes)
        spec.validate()
        return spec

    def validate(self, source: str | None = None) -> None:
        """Checks across models: every channel needs a positive total weight."""
        if not self.members:
            raise ConfigError("models", "an ensemble needs at least one model", source)
        totals = self.weights.sum(axis=0)
        for region, total in zip(REGIONS, totals):
            if total <= 0:
                raise ConfigError("models", f"every model has {region} weight 0; give at least one model a positive "
                                  f"{region} weight", source)

    @classmethod
    def from_dict(cls, values: Any, base_dir: str | os.PathLike[str] = ".", source: str | None = None) -> EnsembleSpec:
        """Build and validate a spec from YAML content; relative model paths are relative to ``base_dir``."""
        if not isinstance(values, dict):
            raise ConfigError("<root>", "an ensemble spec must be a YAML mapping with a `models` list", source)
        check_keys(values, ("format", "label_scheme", "thresholds", "models", "postprocessing", "fit"), "", source)
        if values.get("format", SPEC_FORMAT) != SPEC_FORMAT:
            raise ConfigError("format", f"unsupported spec format {values['format']!r}; this version reads "
                              f"{SPEC_FORMAT}", source)
        scheme = values.get("label_scheme")
        if scheme is not None and scheme not in SCHEMES:
            raise ConfigError("label_scheme", f"unknown label scheme {scheme!r}; choose one of {sorted(SCHEMES)}", source)
        models = values.get("models")
        if not isinstance(models, list) or not models:
            raise ConfigError("models", "required: a list of models, each with a `path` (and `weights`)", source)
        members = [_member_from_dict(entry, f"models[{i}]", Path(base_dir), source) for i, entry in enumerate(models)]
        thresholds = per_region(values.get("thresholds", 0.5), "thresholds", source, low=0.0, high=1.0, open_interval=True)
        fit = values.get("fit")
        if fit is not None and not isinstance(fit, dict):
            raise ConfigError("fit", f"expected a mapping, got {fit!r}", source)
        spec = cls(members, thresholds, scheme, PostProcessing.from_dict(values.get("postprocessing"), source=source), fit)
        spec.validate(source)
        return spec

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EnsembleSpec:
        """Read an ``ensemble.yaml``; model paths are relative to its folder."""
        path = Path(path)
        return cls.from_dict(read_yaml(path, what="ensemble spec"), path.parent, str(path))

    def to_dict(self, base_dir: str | os.PathLike[str] = ".") -> dict[str, Any]:
        """Plain YAML content, model paths relative to ``base_dir``."""
        base = Path(base_dir).resolve()
        models = []
        for member in self.members:
            entry: dict[str, Any] = {"path": os.path.relpath(Path(member.path).resolve(), base),
                                     "weights": region_mapping(member.weights)}
            if member.inference:
                entry["inference"] = {k: list(v) if isinstance(v, tuple) else v for k, v in member.inference.items()}
            models.append(entry)
        values: dict[str, Any] = {"format": SPEC_FORMAT}
        if self.label_scheme:
            values["label_scheme"] = self.label_scheme
        values.update(thresholds=region_mapping(self.thresholds), models=models,
                      postprocessing=self.postprocessing.to_dict())
        if self.fit is not None:
            values["fit"] = self.fit
        return values

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the spec atomically, model paths relative to its folder."""
        path = Path(path)
        return atomic_write_yaml(path, self.to_dict(path.parent))


def _member_from_dict(entry: Any, key: str, base_dir: Path, source: str | None) -> EnsembleMember:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict):
        raise ConfigError(key, f"expected a mapping with `path` and `weights`, got {entry!r}", source)
    check_keys(entry, ("path", "weights", "inference"), key, source)
    if not isinstance(entry.get("path"), str) or not entry["path"]:
        raise ConfigError(f"{key}.path", "required: the checkpoint's path (relative to the spec file)", source)
    weights = per_region(entry.get("weights", 1.0), f"{key}.weights", source)
    inference = entry.get("inference") or {}
    if not isinstance(inference, dict):
        raise ConfigError(f"{key}.inference", f"expected a mapping of inference settings, got {inference!r}", source)
    check_keys(inference, INFERENCE_KEYS, f"{key}.inference", source)
    path = Path(os.path.expanduser(entry["path"]))
    return EnsembleMember((base_dir / path).resolve(), weights, dict(inference))


def spec_from_checkpoints(paths: Sequence[str | os.PathLike[str]],
                          weights_file: str | os.PathLike[str] | None = None) -> EnsembleSpec:
    """A spec for the checkpoints ``paths`` with equal weights, or with the weights of ``weights_file``.

    ``weights_file`` is YAML with ``weights``: one entry per checkpoint, in order (a number, ``[TC, WT, ET]`` or
    ``{TC, WT, ET}``), and optionally ``thresholds``, ``postprocessing`` and ``label_scheme`` as in a spec.
    """
    values: dict[str, Any] = {"models": [{"path": str(Path(p).resolve())} for p in paths]}
    source = None
    if weights_file is not None:
        source = str(weights_file)
        loaded = read_yaml(weights_file, what="weights file")
        if not isinstance(loaded, dict) or "weights" not in loaded:
            raise ConfigError("weights", "required: a list with one entry of (TC, WT, ET) weights per model", source)
        check_keys(loaded, ("weights", "thresholds", "postprocessing", "label_scheme"), "", source)
        weights = loaded.pop("weights")
        if not isinstance(weights, list) or len(weights) != len(paths):
            raise ConfigError("weights", f"expected a list of {len(paths)} entries (one per --models checkpoint, in "
                              f"order), got {weights!r}", source)
        for i, (model, w) in enumerate(zip(values["models"], weights)):
            model["weights"] = per_region(w, f"weights[{i}]", source)
        values.update(loaded)
    return EnsembleSpec.from_dict(values, ".", source)


# --- running an ensemble --------------------------------------------------------------------------------------
