"""Seconds per case: full-volume fp32 sliding window vs the project's inference (brain box, bf16, compile), in one run.

    python bench/infer.py [--ckpt C | --model segresnet --init-filters 8 --train-epochs 30]
                          [--size full|N] [--roi X Y Z] [--overlap 0.5] [--sw-batch-size 4]
                          [--precision 32|bf16] [--compile] [--tta] [--test-cases 3] [--repeat 3] [--device cuda]

Phantoms at ``--size`` (``full``: the 240×240×155 BraTS grid; a number: cubes): ``--test-cases`` of them (a seed
of their own) are predicted; ``--train-cases`` others train a model with the project's own ``train``
(window-sized patches, schedule-free AdamW; not timed), or ``--ckpt`` gives a trained one (``--roi`` then
defaults to its inference window). Timed paths, each through ``predict_preprocessed`` (windows, blending,
paste-back, label map; preprocessing excluded), seconds per case (per case the minimum of ``--repeat``):

* **full fp32**: the windows over the whole grid, fp32, eager: the baseline.
* **box fp32**: the project's brain bounding box (12 → 8 windows on the BraTS grid; 1.5× is cropping's bound).
* **box bf16** (``--precision bf16``, GPUs), **box bf16 + compile** (``--compile``): the project's fast settings.
* **box, flip TTA batched** (``--tta``): the 8 flips go through the network with their window, in one batch,
  vs **8 separate passes** (one sliding window per flip): what batching saves.

Each row's mean Dice per region over the test cases against the phantoms' references, and the largest |ΔDice| to
the full fp32 path (goal ≤ 0.001). Agreement needs a trained network: a network's group/instance norms see each
window's share of
background, and only a network that learnt the task predicts the same whatever that share.
Goal on an H100: ≤ 0.22 s per case for MedNeXt-B (``--ckpt`` of a MedNeXt-B run, ``--size full``; for timings
alone, ``--model mednext_b --init-filters 32 --train-epochs 0`` uses an untrained network, Dice meaningless).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brats_ugrip.checkpoints import load_model
from brats_ugrip.cli import console, run
from brats_ugrip.config import InferenceConfig
from brats_ugrip.data import cases_from_dir, make_datalist, save_datalist
from brats_ugrip.inference import (
    ALL_FLIPS,
    CasePrediction,
    crop_prediction,
    predict_preprocessed,
    prepare_model,
    sliding_window_probabilities,
)
from brats_ugrip.io import read_volume
from brats_ugrip.labels import REGIONS, get_scheme
from brats_ugrip.metrics.regions import dice
from brats_ugrip.models import create_model
from brats_ugrip.preprocess import PreprocessedCase, preprocess_case
from brats_ugrip.synthetic.anatomy import BRATS_SHAPE
from brats_ugrip.synthetic.phantom import write_phantoms
from brats_ugrip.training import train

FULL_VOLUME_MARGIN = 10_000  # a brain-box margin larger than any volume: the "box" is the whole grid


def window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Windows MONAI's sliding window places on ``shape`` (its scan interval: ``int(roi × (1 − overlap))``)."""
    count = 1
    for size, window in zip(shape, roi):
        if size > window:
            count *= math.ceil((size - window) / max(int(window * (1 - overlap)), 1)) + 1
    return count


def train_model(data_dir: Path, work: Path, args: argparse.Namespace) -> torch.nn.Module:
    """A network trained by the project on the phantoms in ``data_dir`` (window-sized patches; fold 0 validates)."""
    datalist_path = save_datalist(make_datalist(data_dir, n_folds=3, seed=0, relative_to=work), work / "datalist.json")
    config = {
        "data": {"datalist": str(datalist_path), "roi_size": list(args.roi), "batch_size": 2, "samples_per_case": 4,
                 "cache_dir": str(work / "cache")},
        "model": {"name": args.model, "init_filters": args.init_filters},
        "optim": {"name": "adamw_sf", "lr": 0.003, "warmup_steps": 20},
        "trainer": {"max_epochs": args.train_epochs, "val_every": args.train_epochs, "seed": 0,
                    "accelerator": "gpu" if args.device == "cuda" else "cpu"},
        "inference": {"overlap": args.overlap, "sw_batch_size": args.sw_batch_size},
        "logging": {"mode": "disabled"},
    }
    with console.status(f"training {args.model} for {args.train_epochs} epochs on {args.train_cases} phantoms"):
        result = train(config, work / "run")
    console.print(f"trained: validation Dice {result['best_val_dice']:.3f}")
    model, _ = load_model(result["best_checkpoint"])
    return model


def separate_flip_passes(model: torch.nn.Module, case: PreprocessedCase, settings: InferenceConfig,
                         scheme: str) -> CasePrediction:
    """Flip TTA as 8 sliding-window passes, one per flipped volume (what batching the flips replaces)."""
    image = torch.as_tensor(np.asarray(case.image, dtype=np.float32))[None]
    single = dataclasses.replace(settings, tta=False)
    total = sum(sliding_window_probabilities(model, image.flip(f) if f else image, single).flip(f) if f
                else sliding_window_probabilities(model, image, single) for f in ALL_FLIPS)
    return crop_prediction(case, (total / len(ALL_FLIPS))[0].cpu().numpy(), settings.threshold, scheme)


def timed(predict: Callable[[], CasePrediction], repeat: int, device: str) -> tuple[CasePrediction, float, float]:
    """The prediction and the minimum wall and CPU seconds over ``repeat`` calls."""
    seconds, cpu_seconds = [], []
    for _ in range(repeat):
        start, cpu_start = time.perf_counter(), time.process_time()
        prediction = predict()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    return prediction, min(seconds), min(cpu_seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="a trained checkpoint (default: train a small network here)")
    parser.add_argument("--model", default="segresnet", help="network to train without --ckpt (default segresnet)")
    parser.add_argument("--init-filters", type=int, default=8, help="its width (default 8)")
    parser.add_argument("--train-epochs", type=int, default=30,
                        help="its training epochs (default 30; 0: untrained, for timings only)")
    parser.add_argument("--train-cases", type=int, default=9, help="phantoms it trains on (default 9)")
    parser.add_argument("--size", default="96", help="'full' (240×240×155) or a cube edge (default 96)")
    parser.add_argument("--roi", type=int, nargs=3, help="window (default: the checkpoint's, else 48 64 48)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--precision", choices=("32", "bf16"), default=None,
                        help="the project path's precision (default bf16 on a GPU, 32 on a CPU)")
    parser.add_argument("--compile", action="store_true", help="add a row with the network compiled")
    parser.add_argument("--tta", action="store_true", help="add flip-TTA rows: batched vs 8 separate passes")
    parser.add_argument("--test-cases", type=int, default=3, help="phantoms predicted; Dice is their mean (default 3)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed predictions per case and row (the minimum is kept)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    precision = args.precision or ("bf16" if args.device == "cuda" else "32")
    fast_name = "fp32" if precision == "32" else precision
    shape = BRATS_SHAPE if args.size == "full" else (int(args.size),) * 3
    scheme = get_scheme("brats2023")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # The predicted cases have a seed of their own: they are never among the training phantoms.
        case_dirs = write_phantoms(work / "test", args.test_cases, shape, seed=1, progress=True)
        if args.ckpt:
            model, meta = load_model(args.ckpt)
            name = meta["model"]["name"]
            args.roi = args.roi or meta["config"]["inference"]["roi_size"] or meta["config"]["data"]["roi_size"]
        else:
            args.roi = args.roi or [48, 64, 48]
            name = args.model
            if args.train_epochs > 0:
                write_phantoms(work / "train", args.train_cases, shape, seed=0, progress=True)
                model = train_model(work / "train", work, args)
            else:  # timings only
                torch.manual_seed(0)
                model = create_model(args.model, init_filters=args.init_filters)
        model = model.to(args.device).eval()
        cases = cases_from_dir(case_dirs[0].parent)
        references = [scheme.to_regions(read_volume(case.label, np.int16)[0]) for case in cases]
        full = [preprocess_case(c.images, None, scheme, margin=FULL_VOLUME_MARGIN, case_id=c.case_id) for c in cases]
        box = [preprocess_case(c.images, None, scheme, case_id=c.case_id) for c in cases]
        base = InferenceConfig(roi_size=tuple(args.roi), overlap=args.overlap, sw_batch_size=args.sw_batch_size)
        fast = dataclasses.replace(base, precision=precision)
        rows: list[tuple[str, list[PreprocessedCase], torch.nn.Module, InferenceConfig, Callable]] = [
            ("full fp32", full, model, base, predict_preprocessed),
            ("box fp32", box, model, base, predict_preprocessed)]
        if precision != "32":
            rows.append((f"box {fast_name}", box, model, fast, predict_preprocessed))
        if args.compile:
            compiled = dataclasses.replace(fast, compile=True)
            rows.append((f"box {fast_name} + compile", box, prepare_model(model, compiled), compiled, predict_preprocessed))
        if args.tta:
            tta = dataclasses.replace(fast, tta=True)
            rows += [(f"box {fast_name}, flip TTA batched", box, model, tta, predict_preprocessed),
                     (f"box {fast_name}, flip TTA 8 passes", box, model, tta, separate_flip_passes)]

        results: list[dict[str, Any]] = []
        for label, preprocessed, network, settings, predict in rows:
            seconds, cpu_seconds, labels, case_dice = 0.0, 0.0, [], []
            with console.status(f"{label}: warm-up and {args.repeat} timed predictions of {len(cases)} cases"):
                predict(network, preprocessed[0], settings, scheme)  # warm-up: allocator, cuDNN autotuning, compilation
                for pre, reference in zip(preprocessed, references):
                    prediction, case_seconds, case_cpu = timed(lambda: predict(network, pre, settings, scheme),
                                                               args.repeat, args.device)
                    seconds, cpu_seconds = seconds + case_seconds, cpu_seconds + case_cpu
                    labels.append(prediction.labels)
                    case_dice.append([dice(p, t) for p, t in zip(scheme.to_regions(prediction.labels), reference)])
            results.append({"path": label, "volume": list(preprocessed[0].image.shape[1:]),
                            "windows": window_count(preprocessed[0].image.shape[1:], args.roi, args.overlap),
                            "seconds": round(seconds / len(cases), 4), "cpu_seconds": round(cpu_seconds / len(cases), 3),
                            "dice": {r: round(float(v), 5) for r, v in zip(REGIONS, np.mean(case_dice, axis=0))},
                            "labels": labels})
    baseline = results[0]
    for r in results:
        r["speedup"] = round(baseline["seconds"] / r["seconds"], 3)
        r["max_dice_difference"] = round(max(abs(r["dice"][k] - baseline["dice"][k]) for k in REGIONS), 6)
        r["voxels_differing"] = (sum(int((a != b).sum()) for a, b in zip(r.pop("labels"), baseline["labels"]))
                                 if r is not baseline else 0)
    baseline.pop("labels")
    # The project's inference: its fastest brain-box setting without TTA (issue 3's goal: ≥ 1.8× the full path).
    project = min((r for r in results if r["path"].startswith("box") and "TTA" not in r["path"]), key=lambda r: r["seconds"])
    result = {"bench": "infer", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "model": name, "checkpoint": args.ckpt, "size": list(shape),
              "roi": list(args.roi), "overlap": args.overlap, "sw_batch_size": args.sw_batch_size, "rows": results,
              "project_path": project["path"], "project_speedup": project["speedup"],
              "project_max_dice_difference": project["max_dice_difference"]}
    print(json.dumps(result))
    print("\n| path | volume | windows | s / case | CPU s | speed-up | Dice TC | Dice WT | Dice ET | max |ΔDice| |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['path']} | {'×'.join(map(str, r['volume']))} | {r['windows']} | {r['seconds']:.3f} | "
              f"{r['cpu_seconds']:.2f} | {r['speedup']:.2f}× | " + " | ".join(f"{r['dice'][k]:.4f}" for k in REGIONS)
              + f" | {r['max_dice_difference']:.5f} |")
    print(f"\nproject inference ({project['path']}): {project['seconds']:.3f} s per case, {project['speedup']:.2f}× the "
          f"full-volume fp32 path, max |ΔDice| {project['max_dice_difference']:.5f} (goal ≤ 0.001)")
    return 0


if __name__ == "__main__":
    run(main)
