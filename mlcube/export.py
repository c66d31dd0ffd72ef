"""Export for serving: ONNX files (one per model), their JSON sidecars, and Triton model repositories.

    python -m brats_ugrip.mlcube.export --ckpt soup.ckpt --format onnx --out model.onnx
    python -m brats_ugrip.mlcube.export --spec ensemble.yaml --format onnx --out exported/
    python -m brats_ugrip.mlcube.export --ckpt soup.ckpt --format triton --out model_repository/ [--name brats_ugrip]

The ONNX graph is the network alone: input ``image`` float32 ``(batch, 4, x, y, z)``, channels ``t1c, t1n, t2f,
t2w``, preprocessed as for training (RAS, brain bounding box, per-channel z-score on non-zero voxels); output
``logits`` float32 ``(batch, 3, x, y, z)``, channels ``TC, WT, ET``, **logits** (apply a sigmoid for
probabilities). Batch and the three spatial axes are dynamic, so a sliding window of any size fits (each a
multiple of the network's ``spatial_divisor``). Deep supervision is never exported: the graph is traced in eval
mode, where MedNeXt returns its main head only. Sliding window, flip TTA, thresholds and labels stay outside the
graph: ``python -m brats_ugrip.infer --onnx model.onnx`` runs them with the same code as for checkpoints.

Next to every ``X.onnx`` a sidecar ``X.json`` (format :data:`SIDECAR_FORMAT`) records the opset, the tensor
names, shapes and channels, the preprocessing, the checkpoint's inference settings and label scheme, its model
and the hash of the exported weights (:func:`brats_ugrip.checkpoints.weights_hash`).

An ensemble (``--spec``) gives one ``NN-<checkpoint stem>.onnx`` (+ sidecar) per model, each with the spec's
per-model inference overrides, and ``ensemble.json`` with the spec's per-channel weights, thresholds, label scheme
and post-processing: the ensemble's probabilities are ``Σ_n w_nc · sigmoid(logits_n) / Σ_n w_nc`` per channel c.

A Triton model repository holds ``<name>/config.pbtxt`` (platform ``onnxruntime_onnx``, dims without the batch
axis, ``-1`` for the dynamic ones) and ``<name>/1/model.onnx`` with its sidecar ``model.json``; for an ensemble,
one such model per member (``<name>_NN``) and ``ensemble.json`` at the repository's root (Triton loads only the
repository's sub-folders).

The exporter is PyTorch's TorchScript-based one (``dynamo=False``): the dynamo exporter gives the same graphs
(same outputs to 1e-6 on SegResNet and MedNeXt) but needs ``onnxscript`` and takes ~10× longer (~12 s vs ~1 s
for a tiny MedNeXt); the TorchScript exporter is deprecated in PyTorch ≥ 2.9, and switching is one argument.

Importing this module, ``--help`` and argument errors do not import torch or onnx.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brats_ugrip.cli import console, run
from brats_ugrip.errors import CheckpointError, ConfigError
from brats_ugrip.onnx_sidecar import INPUT_NAME, OUTPUT_NAME, SIDECAR_FORMAT, read_sidecar, sidecar_path

if TYPE_CHECKING:
    from brats_ugrip.ensembling.spec import EnsembleSpec

DEFAULT_OPSET = 17
DYNAMIC_AXES = ("batch", "x", "y", "z")
ENSEMBLE_FILE = "ensemble.json"
TRITON_NAME = "brats_ugrip"
TRITON_MAX_BATCH = 8
TRITON_MODEL_FILE = "model.onnx"
_TRITON_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Checkpoint metadata worth carrying into the sidecar (provenance); the config is summarised, not copied.
_PROVENANCE_KEYS = ("fold", "epoch", "step", "val_metrics", "val_epoch", "init_id", "git_commit", "weights",
                    "created", "soup")


# --- ONNX -----------------------------------------------------------------------------------------------------


def export_onnx(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET,
                inference: dict[str, Any] | None = None) -> Path:
    """Export a checkpoint's network to ``out`` (ONNX) and write its sidecar next to it.

    Args:
        checkpoint: a brats-ugrip checkpoint (``best.ckpt``, a soup ...), read with safe loading.
        out: the ``.onnx`` file to write (atomically; folders created).
        opset: ONNX opset.
        inference: overrides of the checkpoint's inference settings recorded in the sidecar (an ensemble
            member's ``inference`` entry).

    Returns:
        the ONNX file's path.
    """
    import torch

    from brats_ugrip.atomic import atomic_path, atomic_write_json
    from brats_ugrip.checkpoints import load_model, weights_hash
    from brats_ugrip.models import IN_CHANNELS, get_spec

    out = Path(out)
    if out.suffix != ".onnx":
        raise ConfigError("--out", f"an ONNX file name ends in .onnx, got {out}")
    model, meta = load_model(checkpoint, map_location="cpu")
    divisor = get_spec(meta["model"]["name"]).divisor
    # Built first: a checkpoint without a run config is refused before anything is written.
    sidecar = _sidecar(meta, inference or {}, opset, divisor, weights_hash(model.state_dict()), Path(checkpoint))
    # Two levels at the bottom (2 × divisor a side): norms need more than one value per channel when tracing.
    sample = torch.zeros(1, IN_CHANNELS, *(2 * divisor,) * 3)
    axes = {0: DYNAMIC_AXES[0], 2: DYNAMIC_AXES[1], 3: DYNAMIC_AXES[2], 4: DYNAMIC_AXES[3]}
    with atomic_path(out) as tmp, warnings.catch_warnings():
        # Known and harmless here: the TorchScript exporter's deprecation notice, the tracer's note on the norms'
        # "more than one value per channel" check (a training-time check), constant folding of strided slices.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model.eval(), (sample,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, do_constant_folding=True)
        except RuntimeError as error:  # torch.onnx.OnnxExporterError is one: an opset or operator it cannot do
            reason = str(error).strip().splitlines()[0]
            raise ConfigError("--opset", f"torch.onnx cannot export {meta['model']['name']} at opset {opset} "
                              f"({reason}); the default {DEFAULT_OPSET} works") from error
        _check_onnx(tmp)
    atomic_write_json(sidecar_path(out), sidecar)
    return out


def _check_onnx(path: Path) -> None:
    """The ONNX checker's verdict, and exactly one input and one output: the main head, no deep supervision."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    inputs, outputs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise CheckpointError(f"the exported graph has inputs {inputs} and outputs {outputs}; expected "
                              f"[{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]")


def _sidecar(meta: dict[str, Any], inference: dict[str, Any], opset: int, divisor: int, weights: str,
             checkpoint: Path) -> dict[str, Any]:
    """The sidecar's content (module docstring)."""
    import dataclasses

    import onnx
    import torch

    from brats_ugrip.config import apply_overrides, config_from_dict
    from brats_ugrip.data import MODALITIES
    from brats_ugrip.inference import inference_settings
    from brats_ugrip.labels import REGIONS
    from brats_ugrip.preprocess import BRAIN_MARGIN

    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{checkpoint}: its metadata holds no run config (window size, label scheme); "
                              "export checkpoints written by brats-ugrip training or soups")
    config = config_from_dict(apply_overrides(meta["config"], {f"inference.{k}": v for k, v in inference.items()}))
    settings = dataclasses.asdict(inference_settings(config))
    settings.update(roi_size=list(settings["roi_size"]), compile=False)  # compile is PyTorch's; fp32 in ONNX
    return {
        "format": SIDECAR_FORMAT, "opset": opset,
        "exporter": f"torch.onnx TorchScript (dynamo=False), torch {torch.__version__}",
        "onnx": onnx.__version__,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [DYNAMIC_AXES[0], len(MODALITIES), *DYNAMIC_AXES[1:]],
                  "channels": list(MODALITIES)},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [DYNAMIC_AXES[0], len(REGIONS), *DYNAMIC_AXES[1:]],
                   "channels": list(REGIONS), "values": "logits: apply a sigmoid for probabilities"},
        "spatial_divisor": divisor,
        "preprocessing": {
            "orientation": "RAS (nibabel io_orientation of the t1c affine)",
            "crop": f"bounding box of the voxels non-zero in any channel, grown by {BRAIN_MARGIN} voxels",
            "normalisation": "per channel z-score over its non-zero voxels (std floored at 1e-8); zero voxels stay 0",
            "implementation": "brats_ugrip.preprocess.preprocess_case",
        },
        "postprocessing": "sigmoid; sliding-window gaussian blending; p > threshold per region; labels by the scheme "
                          "(innermost region wins); pasted back into the input geometry (brats_ugrip.inference)",
        "inference": settings, "label_scheme": config.data.scheme,
        "model": {**meta["model"], "deep_supervision_exported": False},
        "weights_hash": weights, "checkpoint": str(checkpoint.name),
        "provenance": {k: meta[k] for k in _PROVENANCE_KEYS if k in meta},
    }


# --- ensembles ------------------------------------------------------------------------------------------------


def _load_spec(spec: EnsembleSpec | str | os.PathLike[str]) -> EnsembleSpec:
    from brats_ugrip.ensembling.spec import EnsembleSpec

    return spec if isinstance(spec, EnsembleSpec) else EnsembleSpec.load(spec)


def ensemble_scheme(spec: EnsembleSpec, schemes: Sequence[str]) -> str:
    """The ensemble's output label scheme: the spec's, else the models' (which must agree), as
    :func:`brats_ugrip.ensembling.predict.check_compatible` decides for loaded models."""
    if spec.label_scheme is not None:
        return spec.label_scheme
    if len(set(schemes)) > 1:
        listing = "; ".join(f"{Path(m.path).name}: {s}" for m, s in zip(spec.members, schemes))
        raise CheckpointError(f"the models were trained with different label schemes ({listing}); set "
                              "`label_scheme` in the spec to choose the output labels")
    return schemes[0]


def _ensemble_manifest(spec: EnsembleSpec, files: Sequence[str], schemes: Sequence[str]) -> dict[str, Any]:
    from brats_ugrip.postprocess import region_mapping

    return {"format": SIDECAR_FORMAT, "label_scheme": ensemble_scheme(spec, schemes),
            "thresholds": region_mapping(spec.thresholds),
            "combination": "per channel c: sum_n w_nc * sigmoid(logits_n) / sum_n w_nc, each model with its own "
                           "sliding window (its sidecar's inference settings); then p_c > thresholds[c]",
            "models": [{"path": file, "weights": region_mapping(member.weights)}
                       for file, member in zip(files, spec.members)],
            "postprocessing": spec.postprocessing.to_dict()}


def export_ensemble(spec: EnsembleSpec | str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                    opset: int = DEFAULT_OPSET) -> Path:
    """Export every model of an ensemble spec to ``out_dir/NN-<checkpoint stem>.onnx`` (+ sidecars) and write
    ``out_dir/ensemble.json`` (weights, thresholds, label scheme, post-processing). Returns ``ensemble.json``."""
    from brats_ugrip.atomic import atomic_write_json

    spec, out_dir = _load_spec(spec), Path(out_dir)
    files, schemes = [], []
    for i, member in enumerate(spec.members):
        path = export_onnx(member.path, out_dir / f"{i:02d}-{Path(member.path).stem}.onnx", opset=opset,
                           inference=member.inference)
        files.append(path.name)
        schemes.append(read_sidecar(path)["label_scheme"])
    return atomic_write_json(out_dir / ENSEMBLE_FILE, _ensemble_manifest(spec, files, schemes))


# --- Triton ---------------------------------------------------------------------------------------------------


def triton_config(name: str, sidecar: dict[str, Any], max_batch_size: int = TRITON_MAX_BATCH) -> str:
    """``config.pbtxt`` (Triton's ``ModelConfig`` in protobuf text format) for an exported model.

    With ``max_batch_size > 0`` Triton's dims leave out the batch axis; ``-1`` marks the dynamic spatial axes."""
    if max_batch_size < 1:
        raise ConfigError("--max-batch-size", f"must be ≥ 1 (the exported batch axis is dynamic), got {max_batch_size}")

    def tensor(kind: str, spec: dict[str, Any]) -> str:
        dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in spec["shape"][1:])
        return (f"{kind} [\n  {{\n    name: \"{spec['name']}\"\n    data_type: TYPE_FP32\n    dims: [ {dims} ]\n"
                f"  }}\n]\n")

    return (f"name: \"{name}\"\nplatform: \"onnxruntime_onnx\"\nmax_batch_size: {max_batch_size}\n"
            f"default_model_filename: \"{TRITON_MODEL_FILE}\"\n"
            + tensor("input", sidecar["input"]) + tensor("output", sidecar["output"]))


def write_triton_repository(onnx_path: str | os.PathLike[str], repository: str | os.PathLike[str], *,
                            name: str = TRITON_NAME, max_batch_size: int = TRITON_MAX_BATCH, version: int = 1) -> Path:
    """Lay an exported model out as a Triton model: ``repository/name/config.pbtxt`` and
    ``repository/name/<version>/model.onnx`` (+ ``model.json``, its sidecar). Returns the model's folder."""
    from brats_ugrip.atomic import atomic_write_text

    if not _TRITON_NAME_PATTERN.fullmatch(name):
        raise ConfigError("--name", f"a Triton model name is a folder name of letters, digits, '_', '.', '-'; got {name!r}")
    if version < 1:
        raise ConfigError("version", f"Triton model versions are positive integers, got {version}")
    sidecar = read_sidecar(onnx_path)
    model_dir = Path(repository) / name
    target = model_dir / str(version) / TRITON_MODEL_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    if Path(onnx_path).resolve() != target.resolve():
        shutil.copyfile(onnx_path, target)
        shutil.copyfile(sidecar_path(onnx_path), sidecar_path(target))
    atomic_write_text(model_dir / "config.pbtxt", triton_config(name, sidecar, max_batch_size))
    return model_dir


def export_triton(checkpoint: str | os.PathLike[str], repository: str | os.PathLike[str], *,
                  name: str = TRITON_NAME, max_batch_size: int = TRITON_MAX_BATCH,
                  opset: int = DEFAULT_OPSET) -> Path:
    """Export a checkpoint straight into a Triton model repository; returns the model's folder."""
    onnx_path = export_onnx(checkpoint, Path(repository) / name / "1" / TRITON_MODEL_FILE, opset=opset)
    return write_triton_repository(onnx_path, repository, name=name, max_batch_size=max_batch_size)


def export_ensemble_triton(spec: EnsembleSpec | str | os.PathLike[str], repository: str | os.PathLike[str], *,
                           name: str = TRITON_NAME, max_batch_size: int = TRITON_MAX_BATCH,
                           opset: int = DEFAULT_OPSET) -> Path:
    """One Triton model ``<name>_NN`` per ensemble member, and ``repository/ensemble.json`` naming them with the
    spec's weights and thresholds (the weighted mean runs in the client: it needs each model's own sliding
    window). Returns ``ensemble.json``."""
    from brats_ugrip.atomic import atomic_write_json

    spec, repository = _load_spec(spec), Path(repository)
    names, schemes = [], []
    for i, member in enumerate(spec.members):
        model_name = f"{name}_{i:02d}"
        onnx_path = export_onnx(member.path, repository / model_name / "1" / TRITON_MODEL_FILE, opset=opset,
                                inference=member.inference)
        write_triton_repository(onnx_path, repository, name=model_name, max_batch_size=max_batch_size)
        names.append(model_name)
        schemes.append(read_sidecar(onnx_path)["label_scheme"])
    return atomic_write_json(repository / ENSEMBLE_FILE, _ensemble_manifest(spec, names, schemes))


# --- command line ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m brats_ugrip.mlcube.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a checkpoint (best.ckpt, last.ckpt, a soup)")
    source.add_argument("--spec", help="an ensemble spec (ensemble.yaml): one ONNX model per member")
    parser.add_argument("--format", choices=("onnx", "triton"), default="onnx",
                        help="onnx: an .onnx file (--ckpt) or a folder (--spec); triton: a model repository folder")
    parser.add_argument("--out", required=True,
                        help="the .onnx file (--ckpt, --format onnx), else a folder (created)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--name", default=TRITON_NAME, help=f"Triton model name (default {TRITON_NAME})")
    parser.add_argument("--max-batch-size", type=int, default=TRITON_MAX_BATCH,
                        help=f"Triton max_batch_size (default {TRITON_MAX_BATCH})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    triton = {"name": args.name, "max_batch_size": args.max_batch_size, "opset": args.opset}
    if args.spec and args.format == "onnx":
        written = export_ensemble(args.spec, args.out, opset=args.opset)
    elif args.spec:
        written = export_ensemble_triton(args.spec, args.out, **triton)
    elif args.format == "onnx":
        written = export_onnx(args.ckpt, args.out, opset=args.opset)
    else:
        written = export_triton(args.ckpt, args.out, **triton)
    console.print(f"wrote {written}", highlight=False)
    return 0


if __name__ == "__main__":
    run(main)
