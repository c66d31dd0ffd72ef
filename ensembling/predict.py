"""Running an ensemble: loaded members, streaming per-channel averaging, uncertainty maps, written predictions.

The ensemble's probabilities are, channel by channel, ``y_c = Σ_n w_nc · f_nc(x) / Σ_n w_nc`` where ``f_n`` is
model n's sliding-window probabilities (its own window, overlap, TTA) on the case's brain crop. They are
accumulated **streaming**: one model's output is in memory at a time besides the running sum
(``bench/ensemble_memory.py``); a model whose three weights are 0 is not run. ``y`` is thresholded per channel,
turned into a label map by the label scheme (innermost region wins), optionally post-processed
(``brats_ugrip/postprocess.py``), and pasted back into the input geometry.

Uncertainty maps (one 3-D map, the maximum over TC, WT, ET): ``entropy`` is the binary entropy in bits of the
averaged probabilities; ``disagreement`` is ``1 − |2q − 1|`` with ``q`` the weighted share of models voting for the
region (0: all agree, 1: an even split).

A folder of cases goes through :func:`brats_ugrip.inference.predict_cases` (the one loop, shared with ``infer``
and the MLCube runtime) with :func:`write_prediction` as its writer.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from brats_ugrip.checkpoints import load_model
from brats_ugrip.config import InferenceConfig, apply_overrides, config_from_dict
from brats_ugrip.data import MODALITIES
from brats_ugrip.ensembling.spec import EnsembleMember, EnsembleSpec
from brats_ugrip.errors import CheckpointError, ConfigError
from brats_ugrip.inference import inference_settings, prepare_model, sliding_window_probabilities
from brats_ugrip.io import load_nifti, write_label_map, write_volume
from brats_ugrip.labels import REGIONS
from brats_ugrip.models import OUT_CHANNELS, get_spec
from brats_ugrip.postprocess import PerRegion, labels_from_probabilities
from brats_ugrip.preprocess import BRAIN_MARGIN, PreprocessedCase, preprocess_case

UNCERTAINTY_KINDS: tuple[str, str] = ("entropy", "disagreement")


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
