"""Weighted ensembles: the spec file, streaming per-channel averaging, thresholds, post-processing, uncertainty.

For N models with per-channel weights ``w_n = (w_TC, w_WT, w_ET)`` the ensemble's probabilities are, channel by
channel, ``y_c = Σ_n w_nc · f_nc(x) / Σ_n w_nc`` where ``f_n`` is model n's sliding-window probabilities (its own
window, overlap, TTA) on the case's brain crop. They are accumulated **streaming**: one model's output is in memory
at a time besides the running sum (``bench/ensemble_memory.py``); a model whose three weights are 0 is not run.
``y`` is thresholded per channel, turned into a label map by the label scheme (innermost region wins), optionally
post-processed, and pasted back into the input geometry.

An ensemble spec (``ensemble.yaml``) holds everything needed to run it, and is what ``mlcube/`` packages::

    format: 1
    label_scheme: brats2023            # optional: default the models' (they must agree)
    thresholds: {TC: 0.5, WT: 0.5, ET: 0.45}
    models:                            # paths relative to this file
      - path: models/fold0.ckpt
        weights: {TC: 0.6, WT: 0.5, ET: 0.7}
        inference: {tta: true, overlap: 0.5}   # optional overrides of the checkpoint's inference settings
      - path: models/fold1.ckpt
        weights: 1.0                   # one number: the same weight for TC, WT and ET
    postprocessing:                    # each rule off (0) by default
      min_component_size: {TC: 0, WT: 50, ET: 0}   # voxels (26-connected components)
      et_to_netc_below: 0              # voxels
    fit: {...}                         # written by ensembling/fit.py: method, fold, scores (informative)

Post-processing rules, applied to the label map:

* ``min_component_size``: connected components of a region smaller than the size are removed, outermost first:
  a small whole-tumour component becomes background, a small tumour-core component becomes oedema, a small
  enhancing component becomes non-enhancing core.
* ``et_to_netc_below``: when the case's whole enhancing volume is below this many voxels (after the rule above),
  every enhancing voxel is relabelled non-enhancing core (NETC): a small false-positive ET costs Dice 0 on a case
  without ET, the BraTS empty-mask convention.

Uncertainty maps (one 3-D map, the maximum over TC, WT, ET): ``entropy`` is the binary entropy in bits of the
averaged probabilities; ``disagreement`` is ``1 − |2q − 1|`` with ``q`` the weighted share of models voting for the
region (0: all agree, 1: an even split).
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from brats_ugrip.atomic import atomic_write_yaml
from brats_ugrip.checkpoints import load_model
from brats_ugrip.config import InferenceConfig, apply_overrides, config_from_dict
from brats_ugrip.data import MODALITIES
from brats_ugrip.errors import CheckpointError, ConfigError
from brats_ugrip.files import read_yaml
from brats_ugrip.inference import inference_settings, prepare_model, sliding_window_probabilities
from brats_ugrip.io import load_nifti, write_label_map, write_volume
from brats_ugrip.labels import REGIONS, SCHEMES, LabelScheme, get_scheme
from brats_ugrip.models import OUT_CHANNELS, get_spec
from brats_ugrip.preprocess import BRAIN_MARGIN, PreprocessedCase, preprocess_case

SPEC_FORMAT = 1
INFERENCE_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(InferenceConfig) if f.name != "threshold")
"""Per-model inference settings a spec may override (thresholds are the ensemble's, per channel)."""
UNCERTAINTY_KINDS: tuple[str, str] = ("entropy", "disagreement")
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


def _check_keys(values: dict[str, Any], allowed: Sequence[str], prefix: str, source: str | None) -> None:
    unknown = sorted(set(map(str, values)) - set(allowed))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(key, f"unknown key; valid keys here are {', '.join(allowed)}", source)


# --- post-processing ------------------------------------------------------------------------------------------


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
        _check_keys(values, ("min_component_size", "et_to_netc_below"), key, source)
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


def entropy_map(probabilities: torch.Tensor) -> torch.Tensor:
    """Binary entropy in bits of region probabilities ``(3, *spatial)``, maximum over regions: ``(*spatial)``."""
    p = probabilities.clamp(1e-7, 1 - 1e-7)
    entropy = -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))
    return entropy.amax(dim=0)


def disagreement_map(vote_share: torch.Tensor) -> torch.Tensor:
    """``1 − |2q − 1|`` of the weighted share ``q`` ``(3, *spatial)`` of models voting for each region, maximum over
    regions: 0 where every model agrees, 1 where they split evenly."""
    return (1 - (2 * vote_share - 1).abs()).amax(dim=0)


class WeightedSum:
    """Running per-channel weighted sum ``Σ_n w_n ⊙ x_n`` of ``(3, *spatial)`` tensors; :meth:`mean` divides by
    ``Σ_n w_n`` channel by channel. Holds one tensor (the sum) whatever the number of terms."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.weight = np.zeros(len(REGIONS), dtype=np.float64)

    def add(self, values: torch.Tensor, weights: Sequence[float]) -> None:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float32), device=values.device).view(-1, *([1] * (values.ndim - 1)))
        if self.total is None:
            self.total = values * w
        else:
            self.total.addcmul_(values, w)
        self.weight += np.asarray(weights, dtype=np.float64)

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("nothing was added")
        if (self.weight <= 0).any():
            raise ValueError(f"a channel has total weight 0: {self.weight.tolist()}")
        return self.total / torch.as_tensor(self.weight, dtype=torch.float32, device=self.total.device).view(
            -1, *([1] * (self.total.ndim - 1)))


# --- the spec -------------------------------------------------------------------------------------------------


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
        _check_keys(values, ("format", "label_scheme", "thresholds", "models", "postprocessing", "fit"), "", source)
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
    _check_keys(entry, ("path", "weights", "inference"), key, source)
    if not isinstance(entry.get("path"), str) or not entry["path"]:
        raise ConfigError(f"{key}.path", "required: the checkpoint's path (relative to the spec file)", source)
    weights = per_region(entry.get("weights", 1.0), f"{key}.weights", source)
    inference = entry.get("inference") or {}
    if not isinstance(inference, dict):
        raise ConfigError(f"{key}.inference", f"expected a mapping of inference settings, got {inference!r}", source)
    _check_keys(inference, INFERENCE_KEYS, f"{key}.inference", source)
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
        _check_keys(loaded, ("weights", "thresholds", "postprocessing", "label_scheme"), "", source)
        weights = loaded.pop("weights")
        if not isinstance(weights, list) or len(weights) != len(paths):
            raise ConfigError("weights", f"expected a list of {len(paths)} entries (one per --models checkpoint, in "
                              f"order), got {weights!r}", source)
        for i, (model, w) in enumerate(zip(values["models"], weights)):
            model["weights"] = per_region(w, f"weights[{i}]", source)
        values.update(loaded)
    return EnsembleSpec.from_dict(values, ".", source)


# --- running an ensemble --------------------------------------------------------------------------------------


def model_channels(model: nn.Module, divisor: int) -> tuple[int, int]:
    """``(input channels, output channels)`` of a network: its first convolution's inputs, and the channels of its
    output on a small zero volume (``2 × divisor`` voxels a side: instance norms need 2 voxels at the bottom)."""
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is None:
        raise CheckpointError(f"{model.__class__.__name__}: no convolution found; not a segmentation network")
    device = next(model.parameters()).device
    with torch.no_grad():
        output = model.eval()(torch.zeros(1, first.in_channels, *(2 * divisor,) * 3, device=device))
    if isinstance(output, (list, tuple)):
        output = output[0]
    return first.in_channels, int(output.shape[1])


@dataclass
class LoadedMember:
    """A model of an ensemble, loaded.

    Attributes:
        path: its checkpoint.  model: the network in eval mode.  meta: the checkpoint's metadata.
        settings: its inference settings (checkpoint's config + the spec's overrides, window size resolved).
        scheme: the label scheme it was trained with.
    """

    path: Path
    model: nn.Module
    meta: dict[str, Any]
    settings: InferenceConfig
    scheme: str


def load_member(member: EnsembleMember, key: str, device: str | torch.device) -> LoadedMember:
    """Load one model and check it: 4 input channels, 3 region outputs, valid inference overrides."""
    model, meta = load_model(member.path, map_location=device)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{member.path}: its metadata holds no run config (window size, label scheme, "
                              "inference settings); ensemble checkpoints written by brats-ugrip training or soups")
    try:
        overrides = {f"inference.{k}": v for k, v in member.inference.items()}
        config = config_from_dict(apply_overrides(meta["config"], overrides))
    except ConfigError as error:
        raise ConfigError(f"{key}.{error.key_path}", str(error).split(": ", 1)[1], str(member.path)) from None
    in_channels, out_channels = model_channels(model, get_spec(meta["model"]["name"]).divisor)
    if in_channels != len(MODALITIES) or out_channels != OUT_CHANNELS:
        raise CheckpointError(f"{member.path}: takes {in_channels} input channels and predicts {out_channels}; an ensemble "
                              f"member must take the {len(MODALITIES)} modalities ({', '.join(MODALITIES)}) and predict "
                              f"the {OUT_CHANNELS} regions ({', '.join(REGIONS)})")
    settings = inference_settings(config)
    return LoadedMember(Path(member.path), prepare_model(model, settings), meta, settings, config.data.scheme)


def check_compatible(members: Sequence[LoadedMember], label_scheme: str | None) -> str:
    """The ensemble's output scheme; a clear error when the models disagree on their label scheme and the spec
    does not name one."""
    schemes = {m.scheme for m in members}
    if label_scheme is not None:
        return label_scheme
    if len(schemes) > 1:
        listing = "; ".join(f"{m.path.name}: {m.scheme}" for m in members)
        raise CheckpointError(f"the models were trained with different label schemes ({listing}); ensemble models "
                              "of one dataset, or set `label_scheme` in the spec to choose the output labels (every "
                              "model predicts the regions TC, WT, ET)")
    return schemes.pop()


@dataclass
class EnsemblePrediction:
    """An ensemble's prediction of one case, in the input geometry.

    Attributes:
        case_id: the case's id.
        labels: uint8 ``(X, Y, Z)`` label map (thresholded, post-processed).
        probabilities: float32 ``(3, X, Y, Z)`` averaged TC, WT, ET probabilities, or None when not asked for.
        uncertainty: float32 ``(X, Y, Z)`` uncertainty map in [0, 1], or None when not asked for.
    """

    case_id: str
    labels: np.ndarray
    probabilities: np.ndarray | None = None
    uncertainty: np.ndarray | None = None


class Ensemble:
    """The models of a spec loaded on a device (each once), checked for compatibility, predicting cases.

    Args:
        spec: the ensemble.
        device: where the models run.
        members: already loaded models of ``spec`` (see :meth:`with_spec`); loaded from the spec when None.
    """

    def __init__(self, spec: EnsembleSpec, device: str | torch.device = "cpu",
                 members: Sequence[LoadedMember] | None = None):
        self.spec = spec
        self.device = torch.device(device)
        self.members = list(members) if members is not None else [
            load_member(m, f"models[{i}]", self.device) for i, m in enumerate(spec.members)]
        self.scheme = check_compatible(self.members, spec.label_scheme)

    def with_spec(self, spec: EnsembleSpec) -> Ensemble:
        """The same loaded models with another spec's weights, thresholds and post-processing."""
        if [Path(m.path).resolve() for m in spec.members] != [m.path.resolve() for m in self.members]:
            raise ValueError("with_spec needs a spec of the same models in the same order")
        return Ensemble(spec, self.device, self.members)

    @property
    def active(self) -> list[tuple[LoadedMember, PerRegion]]:
        """The models with a positive weight on some channel, with their weights (the others are not run)."""
        return [(loaded, m.weights) for loaded, m in zip(self.members, self.spec.members) if any(w > 0 for w in m.weights)]

    @torch.no_grad()
    def average(self, image: torch.Tensor, votes: bool = False,
                on_model: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weighted average of the models' probabilities, streaming.

        Args:
            image: ``(1, 4, x, y, z)`` preprocessed image (brain crop).
            votes: also return the weighted share of models voting for each region.
            on_model: called after each model (progress bars).

        Returns:
            ``(probabilities (3, x, y, z), vote share (3, x, y, z) or None)`` float32 on the ensemble's device.
        """
        average, share = WeightedSum(), WeightedSum() if votes else None
        thresholds = torch.tensor(self.spec.thresholds, dtype=torch.float32, device=self.device).view(3, 1, 1, 1)
        for loaded, weights in self.active:
            probabilities = sliding_window_probabilities(loaded.model, image, loaded.settings)[0].to(self.device)
            average.add(probabilities, weights)
            if share is not None:
                share.add((probabilities > thresholds).float(), weights)
            del probabilities
            if on_model is not None:
                on_model()
        return average.mean(), share.mean() if share is not None else None

    def predict_preprocessed(self, case: PreprocessedCase, probabilities: bool = False, uncertainty: str | None = None,
                             on_model: Callable[[], None] | None = None) -> EnsemblePrediction:
        """Predict a preprocessed case; the label map (and optional maps) in the input geometry.

        Args:
            probabilities: also return the averaged probabilities.
            uncertainty: None, ``"entropy"`` or ``"disagreement"``.
        """
        if uncertainty is not None and uncertainty not in UNCERTAINTY_KINDS:
            raise ConfigError("uncertainty", f"unknown kind {uncertainty!r}; choose one of {', '.join(UNCERTAINTY_KINDS)}")
        image = torch.as_tensor(np.asarray(case.image, dtype=np.float32))[None]
        average, share = self.average(image, uncertainty == "disagreement", on_model)
        crop = average.cpu().numpy()
        labels = labels_from_probabilities(crop, self.spec.thresholds, self.scheme, self.spec.postprocessing)
        result = EnsemblePrediction(case.case_id, case.restore(labels[None])[0])
        if probabilities:
            result.probabilities = case.restore(crop)
        if uncertainty is not None:
            voxelwise = entropy_map(average) if uncertainty == "entropy" else disagreement_map(share)
            result.uncertainty = case.restore(voxelwise.cpu().numpy()[None].astype(np.float32))[0]
        return result

    def predict_case(self, image_paths: Sequence[str | os.PathLike[str]], case_id: str | None = None,
                     margin: int = BRAIN_MARGIN, **kwargs: Any) -> EnsemblePrediction:
        """Read the four modality files (``t1c, t1n, t2f, t2w``) and predict (keywords of :meth:`predict_preprocessed`)."""
        case = preprocess_case(image_paths, None, self.scheme, margin=margin, case_id=case_id)
        return self.predict_preprocessed(case, **kwargs)


def write_prediction(out_dir: str | os.PathLike[str], prediction: EnsemblePrediction,
                     reference: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``OUT/<ID>.nii.gz`` (labels) and, when present, ``OUT/probabilities/<ID>.nii.gz`` (float32
    ``(X, Y, Z, 3)``: TC, WT, ET) and ``OUT/uncertainty/<ID>.nii.gz`` (float32), in the geometry of ``reference``
    (one of the case's images). Returns the written paths by kind."""
    out_dir = Path(out_dir)
    name = f"{prediction.case_id}.nii.gz"
    written = {"labels": write_label_map(out_dir / name, prediction.labels, reference)}
    affine = load_nifti(reference).affine
    if prediction.probabilities is not None:
        written["probabilities"] = write_volume(out_dir / "probabilities" / name,
                                                np.moveaxis(prediction.probabilities, 0, -1).astype(np.float32), affine)
    if prediction.uncertainty is not None:
        written["uncertainty"] = write_volume(out_dir / "uncertainty" / name, prediction.uncertainty.astype(np.float32),
                                              affine)
    return written
