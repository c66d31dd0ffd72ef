"""Sliding-window inference on the brain's bounding box, with flip TTA, back into the input geometry.

A case is preprocessed exactly as for training (RAS, cropped to the brain box, normalised), so the windows cover
the brain only: on a 240×240×155 BraTS volume with a 128×160×112 window and overlap 0.5, 8 windows instead of 12
(``bench/infer.py``). Probabilities are blended with gaussian weights, thresholded per region channel and
turned into a label map of the scheme (innermost region wins), then pasted back into the input's shape and
orientation.

Flip TTA averages the probabilities of the 8 flips of the three axes; the flipped copies of each window go
through the network batched with the window itself (at most ``sw_batch_size`` windows per forward pass), not as
8 separate sliding-window passes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from brats_ugrip.config import InferenceConfig, RunConfig
from brats_ugrip.data import Case
from brats_ugrip.errors import BratsUgripError
from brats_ugrip.io import write_label_map
from brats_ugrip.labels import LabelScheme, get_scheme
from brats_ugrip.preprocess import BRAIN_MARGIN, PreprocessedCase, preprocess_case

SPATIAL_DIMS = (2, 3, 4)
ALL_FLIPS: tuple[tuple[int, ...], ...] = tuple(c for k in range(4) for c in combinations(SPATIAL_DIMS, k))


def inference_settings(config: RunConfig) -> InferenceConfig:
    """The run's inference settings with the window size resolved (``inference.roi_size`` or ``data.roi_size``)."""
    return dataclasses.replace(config.inference, roi_size=config.inference_roi)


class FlipTTA(nn.Module):
    """Wraps a network: ``(N, 4, *roi)`` windows → sigmoid probabilities ``(N, 3, *roi)``, averaged over ``flips``.

    The flipped copies of the windows are stacked into one batch and run through the network in forward passes
    of at most ``max_batch`` windows (default: all at once), so flip TTA costs no extra sliding-window pass and
    its memory stays bounded by ``sw_batch_size``, as without TTA."""

    def __init__(self, model: nn.Module, flips: Sequence[tuple[int, ...]] = ((),), max_batch: int | None = None):
        super().__init__()
        self.model = model
        self.flips = tuple(flips)
        self.max_batch = max_batch

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        batch = torch.cat([windows.flip(f) if f else windows for f in self.flips])
        logits = [self.model(part) for part in batch.split(self.max_batch or len(batch))]
        probabilities = torch.sigmoid(torch.cat(logits).float())
        chunks = probabilities.split(windows.shape[0])
        return torch.stack([c.flip(f) if f else c for c, f in zip(chunks, self.flips)]).mean(0)


def prepare_model(model: nn.Module, settings: InferenceConfig) -> nn.Module:
    """The network in eval mode, compiled when ``settings.compile`` (the first windows then pay the compilation,
    seconds to a minute; worth it from a few cases on). Compile once per process and reuse the result."""
    model = model.eval()
    return torch.compile(model) if settings.compile else model


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` runs: its parameters' device, or the CPU for a network without parameters (an ONNX Runtime
    session wrapped by :class:`brats_ugrip.onnx_model.OnnxNetwork`, which takes CPU tensors)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _autocast(device: torch.device, settings: InferenceConfig) -> contextlib.AbstractContextManager:
    # bf16 applies on GPUs only; CPU inference runs in fp32 whatever the setting.
    if settings.precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def sliding_window_probabilities(model: nn.Module, image: torch.Tensor, settings: InferenceConfig) -> torch.Tensor:
    """Region probabilities of a whole (cropped) volume.

    Args:
        model: a network returning region logits; it is put in eval mode.
        image: ``(B, 4, x, y, z)`` on any device; moved to the model's device.
        settings: window ``roi_size`` (required), ``overlap``, ``sw_batch_size``, ``mode``, ``tta``, ``precision``.

    Returns:
        ``(B, 3, x, y, z)`` float32 probabilities (TC, WT, ET) on the model's device.
    """
    if settings.roi_size is None:
        raise ValueError("settings.roi_size is not resolved; use inference_settings(config)")
    model.eval()
    device = model_device(model)
    predictor = FlipTTA(model, ALL_FLIPS if settings.tta else ((),), max_batch=settings.sw_batch_size)
    with _autocast(device, settings):
        probabilities = sliding_window_inference(
            image.to(device), roi_size=settings.roi_size, sw_batch_size=settings.sw_batch_size, predictor=predictor,
            overlap=settings.overlap, mode=settings.mode)
    return probabilities.float()


@dataclass
class CasePrediction:
    """A case's prediction.

    Attributes:
        case_id: the case's id.
        labels: uint8 ``(X, Y, Z)`` label map in the scheme's labels, in the input's shape and orientation.
        crop_probabilities: float32 ``(3, x, y, z)`` TC, WT, ET on the preprocessed brain crop.
        case: the preprocessed case (its geometry restores arrays into the input's).
    """

    case_id: str
    labels: np.ndarray
    crop_probabilities: np.ndarray
    case: PreprocessedCase = dataclasses.field(repr=False)

    @functools.cached_property
    def probabilities(self) -> np.ndarray:
        """float32 ``(3, X, Y, Z)`` in the input's shape and orientation (0 outside the brain box), restored on
        first use: writing label maps never pays for pasting three float channels into the full volume."""
        return self.case.restore(self.crop_probabilities)


def crop_prediction(case: PreprocessedCase, crop_probabilities: np.ndarray, threshold: float,
                    scheme: LabelScheme | str) -> CasePrediction:
    """Threshold the region probabilities of ``case``'s crop, then restore the label map into the input geometry
    (labelling the crop and pasting one uint8 channel back is several times cheaper than the other way round)."""
    labels = get_scheme(scheme).to_labels(crop_probabilities > threshold)
    return CasePrediction(case.case_id, case.restore(labels[None])[0], crop_probabilities, case)


def predict_preprocessed(model: nn.Module, case: PreprocessedCase, settings: InferenceConfig,
                         scheme: LabelScheme | str = "brats2023") -> CasePrediction:
    """Predict a preprocessed case; the label map in its input geometry."""
    image = torch.as_tensor(np.asarray(case.image, dtype=np.float32))[None]
    crop = sliding_window_probabilities(model, image, settings)[0].cpu().numpy()
    return crop_prediction(case, crop, settings.threshold, scheme)


def predict_case(model: nn.Module, image_paths: Sequence[str | os.PathLike[str]], settings: InferenceConfig,
                 scheme: LabelScheme | str = "brats2023", case_id: str | None = None,
                 margin: int = BRAIN_MARGIN) -> CasePrediction:
    """Read the four modality files (``t1c, t1n, t2f, t2w``), predict, and return probabilities and the label map
    in the geometry of the input files.

    Args:
        margin: voxels added around the brain box (a margin larger than the volume gives full-volume inference).
    """
    preprocessed = preprocess_case(image_paths, None, scheme, margin=margin, case_id=case_id)
    return predict_preprocessed(model, preprocessed, settings, scheme)


# --- a folder of cases: the one loop (infer, the ensemble command and the MLCube runtime) ---------------------------


class CasePredictor(Protocol):
    """What :func:`predict_cases` runs: one model (:class:`ModelPredictor`) or an ensemble
    (``brats_ugrip.ensembling.predict.Ensemble``)."""

    scheme: str

    def predict_case(self, image_paths: Sequence[str | os.PathLike[str]], case_id: str | None = None,
                     **options: Any) -> Any: ...


@dataclass
class ModelPredictor:
    """One network with its inference settings and output label scheme, as a :class:`CasePredictor`."""

    model: nn.Module
    settings: InferenceConfig
    scheme: str

    def predict_case(self, image_paths: Sequence[str | os.PathLike[str]], case_id: str | None = None,
                     **options: Any) -> CasePrediction:
        return predict_case(self.model, image_paths, self.settings, self.scheme, case_id=case_id, **options)


def write_labels(out_dir: Path, prediction: Any, reference: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``OUT/<ID>.nii.gz``, the prediction's label map in the geometry of ``reference``."""
    return {"labels": write_label_map(out_dir / f"{prediction.case_id}.nii.gz", prediction.labels, reference)}


@dataclass
class CaseResult:
    """How one case went: the label map ``written`` (None when skipped or failed), ``seconds`` of prediction, the
    ``problems`` that made it skipped or failed, and the traceback of an unexpected failure."""

    case_id: str
    written: Path | None
    seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)
    traceback: str | None = None


def predict_cases(predictor: CasePredictor, cases: Sequence[Case], out: str | os.PathLike[str], *,
                  write: Callable[[Path, Any, str | os.PathLike[str]], dict[str, Path]] = write_labels,
                  check: Callable[[Case], list[str]] | None = None, keep_going: bool = False,
                  on_case: Callable[[Case, CaseResult, Any], None] | None = None, **options: Any) -> list[CaseResult]:
    """Predict every case of ``cases`` and write it into ``out`` (created), in order.

    Args:
        write: writes a prediction (default: its label map, ``OUT/<ID>.nii.gz``); returns the paths by kind.
        check: the problems that make a case skipped (empty: predict it).
        keep_going: a case that fails is recorded in its result and the next goes on (MedPerf's contract: one
            broken case must not cost the others their predictions); otherwise the error propagates.
        on_case: called after each case with the case, its result and its prediction (None when skipped or failed): progress,
            overlays, log lines.
        options: passed to ``predictor.predict_case`` (e.g. an ensemble's ``probabilities``, ``uncertainty``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[CaseResult] = []
    for case in cases:
        result = CaseResult(case.case_id, None, problems=list(check(case)) if check is not None else [])
        prediction = None
        if not result.problems:
            start = time.perf_counter()
            try:
                prediction = predictor.predict_case(case.images, case_id=case.case_id, **options)
                result.written = write(out, prediction, case.images[0])["labels"]
            except Exception as error:
                if not keep_going:
                    raise
                prediction = None
                result.problems = [f"{error.__class__.__name__}: {error}"]
                if not isinstance(error, BratsUgripError):
                    result.traceback = traceback.format_exc()
            result.seconds = time.perf_counter() - start
        results.append(result)
        if on_case is not None:
            on_case(case, result, prediction)
    return results
