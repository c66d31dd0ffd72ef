"""Predict label maps: ``python -m brats_ugrip.infer --ckpt C --input CASE_DIR_OR_DATALIST --out DIR``.

``--input`` is a case folder (``ID/ID-t1c.nii.gz`` ...), a folder of case folders, or a datalist JSON (its
``testing`` cases, or ``--section training``/``all``). Each case gives ``DIR/<ID>.nii.gz``: a label map in the
checkpoint's label scheme (or ``--scheme``) with the affine and shape of the case's images. A case with NaN or
infinite voxels, a checkpoint with non-finite weights, or a full disk stops the command with one line naming the
file (exit 2); every map written is complete (atomic writes). Window size, overlap,
TTA ... come from the checkpoint's config (``inference`` section) unless given here.

``--onnx model.onnx`` instead of ``--ckpt`` runs a model exported by ``brats_ugrip.mlcube.export`` with onnxruntime (CPU)
through the same preprocessing, sliding window, labelling and paste-back; its settings and label scheme come from
the sidecar ``model.json`` written next to it.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from brats_ugrip.cli import console, progress_bar, run
from brats_ugrip.config import InferenceConfig
from brats_ugrip.data import Case, Datalist, cases_from_dir
from brats_ugrip.errors import CheckpointError, DataError

if TYPE_CHECKING:  # torch is imported when there is work to do, not for --help
    from torch import nn


def input_cases(path: str | Path, section: str = "testing") -> list[Case]:
    """Cases of a case folder, a folder of case folders, or a datalist JSON section (training/testing/all)."""
    path = Path(path)
    if path.is_file():
        datalist = Datalist.load(path)
        cases = {"training": datalist.training, "testing": datalist.testing,
                 "all": datalist.training + datalist.testing}[section]
        if not cases:
            raise DataError(f"{path}: the datalist has no {section} cases; choose --section training or all")
        return cases
    return cases_from_dir(path)


def load_network(args: argparse.Namespace) -> tuple[nn.Module, InferenceConfig, str]:
    """The network (a checkpoint's, or an ONNX model's session), its inference settings and output label scheme."""
    if args.onnx:
        from brats_ugrip.onnx_model import load_onnx_model, sidecar_settings

        model, sidecar = load_onnx_model(args.onnx)
        return model, sidecar_settings(sidecar), args.scheme or sidecar["label_scheme"]
    from brats_ugrip.checkpoints import load_model
    from brats_ugrip.config import config_from_dict
    from brats_ugrip.inference import inference_settings

    model, meta = load_model(args.ckpt, map_location=args.device)
    if "config" in meta:
        config = config_from_dict(meta["config"])
        return model, inference_settings(config), args.scheme or config.data.scheme
    if args.roi:
        return model, InferenceConfig(), args.scheme or "brats2023"
    raise CheckpointError(f"{args.ckpt}: its metadata holds no run config to take the window size from; give --roi")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brats_ugrip.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint (best.ckpt, last.ckpt, a soup)")
    source.add_argument("--onnx", help="ONNX model written by brats_ugrip.mlcube.export (runs on the CPU with onnxruntime)")
    parser.add_argument("--input", required=True, help="case folder, folder of case folders, or datalist JSON")
    parser.add_argument("--out", required=True, help="output folder for <ID>.nii.gz label maps")
    parser.add_argument("--section", choices=("testing", "training", "all"), default="testing",
                        help="datalist section to predict (default testing)")
    parser.add_argument("--scheme", help="label scheme of the output (default: the checkpoint's data.scheme)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="flip test-time augmentation")
    parser.add_argument("--overlap", type=float, help="sliding-window overlap")
    parser.add_argument("--sw-batch-size", type=int, help="windows per forward pass")
    parser.add_argument("--roi", type=int, nargs=3, metavar=("X", "Y", "Z"), help="window size")
    parser.add_argument("--precision", choices=("32", "bf16"), help="bf16 autocast (GPUs; CPUs run fp32)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the network once (pays off from a few cases on)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when there is a GPU)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --out names an existing file, not a folder; give a folder for the label maps")

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    from brats_ugrip.inference import ModelPredictor, predict_cases, prepare_model

    model, settings, scheme = load_network(args)
    changes = {"tta": args.tta, "overlap": args.overlap, "sw_batch_size": args.sw_batch_size,
               "roi_size": tuple(args.roi) if args.roi else None, "precision": args.precision, "compile": args.compile}
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
    if args.onnx and settings.compile:
        console.print("--compile ignored: onnxruntime runs the ONNX model")
        settings = dataclasses.replace(settings, compile=False)
    cases = input_cases(args.input, args.section)
    predictor = ModelPredictor(prepare_model(model, settings), settings, scheme)
    with progress_bar() as bar:
        task = bar.add_task(f"predicting {len(cases)} cases", total=len(cases))
        predict_cases(predictor, cases, out, on_case=lambda *_: bar.advance(task))
    console.print(f"wrote {len(cases)} label maps to {out}")
    return 0


if __name__ == "__main__":
    run(main)
