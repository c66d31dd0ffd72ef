"""An exported ONNX model as a network of the project's inference pipeline.

:class:`OnnxNetwork` wraps an ONNX Runtime session as an ``nn.Module`` mapping ``(N, 4, x, y, z)`` windows to
``(N, 3, x, y, z)`` logits, so :func:`brats_ugrip.inference.sliding_window_probabilities` (windows, flip TTA,
gaussian blending) and everything after it (thresholds, labels, paste-back) run unchanged: one pipeline for
checkpoints and ONNX files. It runs on the CPU (onnxruntime's ``CPUExecutionProvider``) with as many threads as
torch uses, and has no parameters, so the pipeline keeps its tensors on the CPU.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brats_ugrip.config import InferenceConfig
from brats_ugrip.errors import CheckpointError
from brats_ugrip.onnx_sidecar import INPUT_NAME, OUTPUT_NAME, read_sidecar


class OnnxNetwork(nn.Module):
    """An ONNX Runtime session behaving as a network: float32 tensors in, float32 logits out (on the input's
    device; the session itself computes on the CPU).

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (default: ``torch.get_num_threads()``, what PyTorch would use).
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: the CPU provider's notes are not the user's business
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for unreadable files
            raise CheckpointError(f"{path}: onnxruntime cannot load it ({error.__class__.__name__}: {error})") from error
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
            raise CheckpointError(f"{path}: inputs {inputs} and outputs {outputs}; a brats-ugrip export has "
                                  f"[{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]")

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        array = windows.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0]
        return torch.from_numpy(logits).to(windows.device)


def load_onnx_model(path: str | os.PathLike[str], threads: int | None = None) -> tuple[OnnxNetwork, dict[str, Any]]:
    """The network of an exported ONNX file and its sidecar (:func:`brats_ugrip.onnx_sidecar.read_sidecar`)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: ONNX model not found")
    sidecar = read_sidecar(path)
    return OnnxNetwork(path, threads), sidecar


def sidecar_settings(sidecar: dict[str, Any]) -> InferenceConfig:
    """The inference settings an exported model was recorded with (fp32, not compiled: ONNX Runtime runs it)."""
    values = dict(sidecar["inference"])
    values.update(roi_size=tuple(values["roi_size"]), precision="32", compile=False)
    return InferenceConfig(**values)
