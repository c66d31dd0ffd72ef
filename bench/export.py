"""Seconds per case: the exported ONNX model on onnxruntime (CPU) vs the PyTorch checkpoint (CPU), same threads.

    python bench/export.py [--ckpt C | --model segresnet --init-filters 8] [--size 96] [--roi 48 48 48]
                           [--overlap 0.5] [--sw-batch-size 2] [--tta] [--threads 2] [--cases 2] [--repeat 3]

Setup (not timed): ``--cases`` phantoms at ``--size`` (a cube edge, or ``full`` for the 240×240×155 grid),
preprocessed once; the network of ``--ckpt``, or an untrained ``--model`` saved as a checkpoint with a run config
(timings only); its export with ``brats_ugrip.mlcube.export.export_onnx`` (export seconds and file size reported).
Timed, per case the minimum of ``--repeat`` calls of ``predict_preprocessed`` (sliding window, flip TTA when asked,
blending, labels, paste-back; preprocessing excluded: it is the same for both), each row at ``--threads`` intra-op
threads (``torch.set_num_threads`` for PyTorch, ``intra_op_num_threads`` for onnxruntime):

* **pytorch**: the checkpoint's network, eager fp32.
* **onnxruntime**: the exported file through the same pipeline (:class:`brats_ugrip.onnx_model.OnnxNetwork`).

The two take turns, prediction by prediction, so a burst of load on a shared machine hits both alike.

Prints a JSON line and a Markdown table: wall and CPU seconds per case and their ratios to PyTorch (> 1: onnxruntime
is faster), the largest probability difference and the label voxels that differ (parity goal: ≤ 1e-4 and 0), with
the largest distance to the threshold of PyTorch's probability at a differing voxel (a flip is possible only within
max |Δp| of the threshold: untrained networks put many voxels there).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brats_ugrip.checkpoints import load_model, save_model_checkpoint
from brats_ugrip.cli import console, run
from brats_ugrip.config import InferenceConfig, load_config
from brats_ugrip.data import cases_from_dir
from brats_ugrip.inference import CasePrediction, predict_preprocessed
from brats_ugrip.mlcube.export import export_onnx
from brats_ugrip.models import create_model, resolve_kwargs
from brats_ugrip.onnx_model import OnnxNetwork
from brats_ugrip.preprocess import preprocess_case
from brats_ugrip.synthetic.anatomy import BRATS_SHAPE
from brats_ugrip.synthetic.phantom import write_phantoms


def untrained_checkpoint(path: Path, args: argparse.Namespace) -> Path:
    """An untrained ``--model`` (seed 0) saved with a run config, as training would write it."""
    torch.manual_seed(0)
    model = create_model(args.model, init_filters=args.init_filters)
    config = load_config(base={"data": {"datalist": "none.json", "roi_size": list(args.roi)},
                               "model": {"name": args.model, "init_filters": args.init_filters}})
    meta = {"model": {"name": args.model, "kwargs": resolve_kwargs(args.model, init_filters=args.init_filters)},
            "config": config.to_dict()}
    return save_model_checkpoint(path, model.state_dict(), meta)


def time_networks(networks: dict[str, torch.nn.Module], cases: list, settings: InferenceConfig,
                  repeat: int) -> dict[str, tuple[float, float, list[CasePrediction]]]:
    """Per network: the mean over cases of the minimum wall and CPU seconds of ``repeat`` predictions, and the
    predictions. The networks take turns (case by case, repeat by repeat), so a burst of load on a shared machine
    hits both alike; CPU seconds count every thread of the process."""
    for network in networks.values():
        predict_preprocessed(network, cases[0], settings)  # warm-up: allocator, onnxruntime's first-run planning
    wall: dict[str, list[float]] = {name: [] for name in networks}
    cpu: dict[str, list[float]] = {name: [] for name in networks}
    predictions: dict[str, list[CasePrediction]] = {name: [] for name in networks}
    for case in cases:
        best = {name: (np.inf, np.inf) for name in networks}
        last: dict[str, CasePrediction] = {}
        for _ in range(repeat):
            for name, network in networks.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                last[name] = predict_preprocessed(network, case, settings)
                elapsed = (time.perf_counter() - start, time.process_time() - cpu_start)
                best[name] = (min(best[name][0], elapsed[0]), min(best[name][1], elapsed[1]))
        for name in networks:
            wall[name].append(best[name][0])
            cpu[name].append(best[name][1])
            predictions[name].append(last[name])
    return {name: (float(np.mean(wall[name])), float(np.mean(cpu[name])), predictions[name]) for name in networks}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="a trained checkpoint (default: an untrained --model, timings only)")
    parser.add_argument("--model", default="segresnet", help="network without --ckpt (default segresnet)")
    parser.add_argument("--init-filters", type=int, default=8, help="its width (default 8)")
    parser.add_argument("--size", default="96", help="'full' (240×240×155) or a cube edge (default 96)")
    parser.add_argument("--roi", type=int, nargs=3, default=[48, 48, 48], help="window (default 48 48 48)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=2)
    parser.add_argument("--tta", action="store_true", help="flip TTA (8 flips batched with each window)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of both runtimes (default 2)")
    parser.add_argument("--cases", type=int, default=2, help="phantoms predicted (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="timed predictions per case (the minimum is kept)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = BRATS_SHAPE if args.size == "full" else (int(args.size),) * 3
    settings = InferenceConfig(roi_size=tuple(args.roi), overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                               tta=args.tta)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_phantoms(work / "cases", args.cases, shape, seed=1, progress=True)
        cases = [preprocess_case(c.images, case_id=c.case_id) for c in cases_from_dir(work / "cases")]
        ckpt = Path(args.ckpt) if args.ckpt else untrained_checkpoint(work / "model.ckpt", args)
        model, meta = load_model(ckpt)
        start = time.perf_counter()
        onnx_path = export_onnx(ckpt, work / "model.onnx")
        export_seconds = time.perf_counter() - start
        networks = {"pytorch": model, "onnxruntime": OnnxNetwork(onnx_path, threads=args.threads)}
        with console.status(f"warm-up and {args.repeat} timed predictions of {len(cases)} cases per runtime"):
            timed = time_networks(networks, cases, settings, args.repeat)
        rows = [{"runtime": name, "seconds": round(wall, 4), "cpu_seconds": round(cpu, 3)}
                for name, (wall, cpu, _) in timed.items()]
        predictions = {name: found for name, (_, _, found) in timed.items()}
        result = summarise(args, settings.threshold, meta, rows, predictions, onnx_path, export_seconds,
                           cases[0].image.shape[1:])
    print(json.dumps(result))
    print_table(result)
    return 0


def summarise(args: argparse.Namespace, threshold: float, meta: dict[str, Any], rows: list[dict[str, Any]],
              predictions: dict[str, list[CasePrediction]], onnx_path: Path, export_seconds: float,
              crop: Sequence[int]) -> dict[str, Any]:
    """The JSON result: rows with their ratio to PyTorch and their parity with it."""
    import onnxruntime

    reference = predictions["pytorch"]
    for row in rows:
        mine = predictions[row["runtime"]]
        row["ratio_to_pytorch"] = round(rows[0]["seconds"] / row["seconds"], 3)
        row["cpu_ratio_to_pytorch"] = round(rows[0]["cpu_seconds"] / row["cpu_seconds"], 3)
        row["max_probability_difference"] = float(max(
            np.abs(a.crop_probabilities - b.crop_probabilities).max() for a, b in zip(mine, reference)))
        row["label_voxels_differing"] = int(sum((a.labels != b.labels).sum() for a, b in zip(mine, reference)))
        # A label can only flip where PyTorch's probability lies within max |Δp| of the threshold: how far from
        # it the region voxels that differ lie (0 when none differ).
        margins = [np.abs(b.crop_probabilities - threshold)[(a.crop_probabilities > threshold)
                                                              != (b.crop_probabilities > threshold)]
                   for a, b in zip(mine, reference)]
        row["max_threshold_margin_of_differing"] = float(max((m.max() for m in margins if m.size), default=0.0))
    return {"bench": "export", "model": meta["model"]["name"], "kwargs": meta["model"]["kwargs"],
            "checkpoint": args.ckpt, "size": args.size, "crop": list(map(int, crop)), "roi": list(args.roi),
            "overlap": args.overlap, "sw_batch_size": args.sw_batch_size, "tta": args.tta, "threads": args.threads,
            "cases": args.cases, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "onnx_bytes": onnx_path.stat().st_size, "export_seconds": round(export_seconds, 2), "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['model']} {result['kwargs']}, phantoms {result['size']} (brain crop "
          f"{'×'.join(map(str, result['crop']))}), window {'×'.join(map(str, result['roi']))}, overlap "
          f"{result['overlap']}, TTA {'on' if result['tta'] else 'off'}, {result['threads']} threads; ONNX file "
          f"{result['onnx_bytes'] / 1e6:.2f} MB, exported in {result['export_seconds']:.1f} s\n")
    print("| runtime | s / case | speed vs PyTorch | CPU s / case | CPU-time ratio | max |Δp| | label voxels differing "
          "| their max |p − t| |\n|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['runtime']} | {row['seconds']:.3f} | {row['ratio_to_pytorch']:.2f}× | {row['cpu_seconds']:.2f} | "
              f"{row['cpu_ratio_to_pytorch']:.2f}× | "
              f"{row['max_probability_difference']:.1e} | {row['label_voxels_differing']} | "
              f"{row['max_threshold_margin_of_differing']:.1e} |")


if __name__ == "__main__":
    run(main)
