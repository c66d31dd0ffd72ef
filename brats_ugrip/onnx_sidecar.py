"""The sidecar of an exported ONNX model: what ``infer --onnx`` reads to run it (the exporter is ``mlcube/export.py``).

Next to every ``X.onnx`` the exporter writes ``X.json`` (format :data:`SIDECAR_FORMAT`): the opset, the tensor
names (:data:`INPUT_NAME`, :data:`OUTPUT_NAME`), shapes and channels, the preprocessing, the checkpoint's inference
settings and label scheme, its model and the hash of the exported weights. Imports neither torch nor onnx.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from brats_ugrip.errors import CheckpointError

SIDECAR_FORMAT = 1
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def sidecar_path(onnx_path: str | os.PathLike[str]) -> Path:
    """The sidecar JSON of an ONNX file: ``model.onnx`` → ``model.json``."""
    return Path(onnx_path).with_suffix(".json")


def read_sidecar(onnx_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar of ``onnx_path``, checked for its format."""
    path = sidecar_path(onnx_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: the ONNX model's sidecar is missing (written next to it by "
                              "brats_ugrip.mlcube.export; it holds the window size, label scheme and tensor names)")
    try:
        sidecar = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{path}: not a brats-ugrip ONNX sidecar of format {SIDECAR_FORMAT}")
    return sidecar
