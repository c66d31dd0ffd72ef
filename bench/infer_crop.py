"""Sliding-window inference on the brain's bounding box vs on the full volume, measured in one run.

    python bench/infer_crop.py [--model segresnet] [--init-filters 8] [--fit-steps 100] [--ckpt C] [--repeat 1]

Two 240×240×155 phantoms: a small network is fitted on 32³ patches of the first (so that its predictions are
confident, as a trained model's are; accuracy is not the point), or ``--ckpt`` gives a trained one; the second
is then predicted both ways with the same settings (window 128×160×112, overlap 0.5, gaussian blending, 4
windows per batch): *full* runs the windows over the whole 240×240×155 grid, *crop* (the project's default)
over the brain's bounding box. Timed: ``predict_preprocessed`` (windows, blending, paste-back, label map),
preprocessing excluded; wall and CPU seconds (CPU time is the steadier figure on a shared machine). Prints a
JSON line and a Markdown table with window counts, seconds per case, the speed-up and the Dice of each region
against the phantom's reference for both paths.

Expected: ≈1.5× (12 vs 8 windows). The Dice of the two paths agrees to ±0.001 only for a well-trained network
(``--ckpt`` on a GPU node): the barely fitted CPU default reacts to each window's content (its group-norm
statistics change with the share of background in a window), so its Dice columns are a sanity check, not the
consistency figure; ``max_dice_difference_in_box`` and ``voxels_differing_outside_box`` say where they differ.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from brats_ugrip.checkpoints import load_model
from brats_ugrip.cli import console, run
from brats_ugrip.config import InferenceConfig, LossConfig
from brats_ugrip.data import cases_from_dir
from brats_ugrip.datasets import TrainDataset
from brats_ugrip.inference import predict_preprocessed
from brats_ugrip.io import read_volume
from brats_ugrip.labels import REGIONS, get_scheme
from brats_ugrip.losses import SegmentationLoss
from brats_ugrip.metrics.regions import dice
from brats_ugrip.models import create_model
from brats_ugrip.preprocess import CaseCache, preprocess_case
from synthetic.anatomy import BRATS_SHAPE
from synthetic.phantom import write_phantoms

FULL_VOLUME_MARGIN = 10_000  # a brain-box margin larger than any volume: the "crop" is the whole grid


def window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Windows MONAI's sliding window places on ``shape`` (its scan interval: ``int(roi × (1 − overlap))``)."""
    count = 1
    for size, window in zip(shape, roi):
        if size > window:
            count *= math.ceil((size - window) / max(int(window * (1 - overlap)), 1)) + 1
    return count


def fit(model: torch.nn.Module, case_dir: Path, cache_dir: Path, steps: int, roi: int = 32, batch: int = 2) -> float:
    """AdamW steps on tumour-biased patches of one case; returns the mean loss of the last 10 steps."""
    torch.manual_seed(0)
    dataset = TrainDataset(cases_from_dir(case_dir), "brats2023", (roi,) * 3, CaseCache(cache_dir),
                           samples_per_case=steps * batch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True)
    loss_fn = SegmentationLoss(LossConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses: list[float] = []
    model.train()
    with console.status(f"fitting for {steps} steps"):
        for item in loader:
            loss = loss_fn(model(item["image"]), item["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses[-10:]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="segresnet", help="registry name (default segresnet)")
    parser.add_argument("--init-filters", type=int, default=8, help="network width (small for CPU)")
    parser.add_argument("--fit-steps", type=int, default=100)
    parser.add_argument("--ckpt", help="a trained checkpoint to use instead of fitting a small network")
    parser.add_argument("--roi", type=int, nargs=3, default=(128, 160, 112))
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="timed predictions per path (the minimum is kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    settings = InferenceConfig(roi_size=tuple(args.roi), overlap=args.overlap, sw_batch_size=args.sw_batch_size)
    scheme = get_scheme("brats2023")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        fit_dir, test_dir = write_phantoms(data, 2, BRATS_SHAPE, seed=0, progress=True)
        if args.ckpt:
            model, meta = load_model(args.ckpt)
            name, last_loss = meta["model"]["name"], float("nan")
        else:
            model, name = create_model(args.model, init_filters=args.init_filters), args.model
            last_loss = fit(model, fit_dir, Path(tmp) / "cache", args.fit_steps)
        model = model.to(args.device).eval()
        with torch.no_grad():  # warm-up (allocator, threads, cuDNN)
            model(torch.zeros(1, 4, *args.roi, device=args.device))
        (case,) = cases_from_dir(test_dir)
        reference = scheme.to_regions(read_volume(case.label, np.int16)[0])
        results = {}
        for path, margin in (("full", FULL_VOLUME_MARGIN), ("crop", 2)):
            pre = preprocess_case(case.images, None, scheme, margin=margin, case_id=case.case_id)
            seconds, cpu_seconds = [], []
            for _ in range(args.repeat):
                start, cpu_start = time.perf_counter(), time.process_time()
                prediction = predict_preprocessed(model, pre, settings, scheme)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - start)
                cpu_seconds.append(time.process_time() - cpu_start)
            predicted = scheme.to_regions(prediction.labels)
            if path == "crop":  # the brain box in the input geometry
                box = pre.restore(np.ones((1, *pre.geometry.crop_shape), dtype=bool))[0]
            results[path] = {"shape": list(pre.image.shape[1:]), "windows": window_count(pre.image.shape[1:], args.roi, args.overlap),
                             "seconds": min(seconds), "cpu_seconds": min(cpu_seconds), "labels": prediction.labels,
                             "regions": predicted,
                             "dice": {r: dice(p, t) for r, p, t in zip(REGIONS, predicted, reference)}}
    full, crop = results["full"], results["crop"]
    dice_difference = max(abs(full["dice"][r] - crop["dice"][r]) for r in REGIONS)
    # The full-volume prediction without what it finds outside the brain box: the effect of window placement alone.
    full_in_box = {r: dice(p & box, t) for r, p, t in zip(REGIONS, full["regions"], reference)}
    dice_difference_in_box = max(abs(full_in_box[r] - crop["dice"][r]) for r in REGIONS)
    result = {
        "bench": "infer_crop", "device": args.device, "model": name, "checkpoint": args.ckpt,
        "init_filters": None if args.ckpt else args.init_filters, "roi": list(args.roi), "overlap": args.overlap,
        "fit_loss": round(last_loss, 4),
        **{f"{k}_{path}": v for path, r in results.items() for k, v in (
            ("shape", r["shape"]), ("windows", r["windows"]), ("seconds", round(r["seconds"], 3)),
            ("cpu_seconds", round(r["cpu_seconds"], 3)))},
        "speedup": round(full["seconds"] / crop["seconds"], 3),
        "speedup_cpu_time": round(full["cpu_seconds"] / crop["cpu_seconds"], 3),
        **{f"dice_{r}_{path}": round(res["dice"][r], 5) for path, res in results.items() for r in REGIONS},
        "max_dice_difference": round(dice_difference, 6),
        "max_dice_difference_in_box": round(dice_difference_in_box, 6),
        "voxels_differing": int((full["labels"] != crop["labels"]).sum()),
        "voxels_differing_outside_box": int((full["labels"] != crop["labels"])[~box].sum()),
    }
    print(json.dumps(result))
    print("\n| path | volume | windows | s / case | CPU s / case | Dice TC | Dice WT | Dice ET |\n"
          "|---|---|---|---|---|---|---|---|")
    for path, r in results.items():
        print(f"| {path} | {'×'.join(map(str, r['shape']))} | {r['windows']} | {r['seconds']:.3f} | {r['cpu_seconds']:.1f} | "
              + " | ".join(f"{r['dice'][region]:.4f}" for region in REGIONS) + " |")
    print(f"\ncrop speed-up {result['speedup']:.2f}× (CPU time {result['speedup_cpu_time']:.2f}×), "
          f"max |ΔDice| {dice_difference:.5f} ({dice_difference_in_box:.5f} within the brain box), "
          f"{result['voxels_differing']} voxels labelled differently "
          f"({result['voxels_differing_outside_box']} outside the brain box, where the crop path predicts nothing)")
    return 0


if __name__ == "__main__":
    run(main)
