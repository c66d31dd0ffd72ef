"""Per-case time of a model package's infer task on full-size BraTS phantoms (240×240×155), measured in one run.

    python bench/mlcube_infer.py [--cases 2] [--init-filters 8] [--roi 128 128 128] [--overlap 0.5] [--tta]
                                 [--device cpu] [--threads N]

Builds a package (``mlcube/build.py``) from an untrained SegResNet of the given width (the time does not depend on
the weights), then runs the packaged ``infer`` task (``mlcube/runtime.py``) in this process on BraTS-SSA-named
phantoms. Per case: validating the four images, reading, preprocessing (RAS, brain crop, normalisation), sliding
window on the crop, restoring to the input geometry and writing the label map. Wall time per case and the
process's CPU time per case (all threads; the figure to compare on a shared machine, with the load average) are
printed as a JSON line and a Markdown table; model loading is reported apart.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from brats_ugrip.checkpoints import save_model_checkpoint
from brats_ugrip.cli import run
from brats_ugrip.config import config_from_dict
from brats_ugrip.mlcube.build import build_package
from brats_ugrip.mlcube.runtime import load_package, run_infer
from brats_ugrip.models import create_model, resolve_kwargs
from brats_ugrip.synthetic.anatomy import BRATS_SHAPE
from brats_ugrip.synthetic.phantom import write_phantoms


def tiny_package(root: Path, init_filters: int, roi: Sequence[int], overlap: float, tta: bool) -> Path:
    """A package of an untrained SegResNet; returns its folder."""
    config = config_from_dict({"data": {"datalist": "unused.json", "roi_size": list(roi)},
                               "model": {"name": "segresnet", "init_filters": init_filters},
                               "inference": {"overlap": overlap, "tta": tta, "sw_batch_size": 1}}).to_dict()
    kwargs = resolve_kwargs("segresnet", init_filters=init_filters)
    checkpoint = save_model_checkpoint(root / "model.ckpt", create_model("segresnet", **kwargs).state_dict(),
                                       {"model": {"name": "segresnet", "kwargs": kwargs}, "config": config})
    return build_package(checkpoint, "brats2024-ssa", root / "package").root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--init-filters", type=int, default=8, help="SegResNet width (multiple of 8)")
    parser.add_argument("--roi", type=int, nargs=3, default=(128, 128, 128))
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation (8 flips)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_phantoms(root / "data", args.cases, BRATS_SHAPE, seed=0, prefix="BraTS-SSA")
        for seg in (root / "data").glob("*/*-seg.nii.gz"):
            seg.unlink()  # MedPerf's data has no labels
        package = tiny_package(root, args.init_filters, args.roi, args.overlap, args.tta)
        workspace = package / "mlcube" / "workspace"
        start = time.perf_counter()
        load_package(workspace / "parameters.yaml", workspace / "additional_files", args.device)
        load_s = time.perf_counter() - start
        (root / "predictions").mkdir()
        cpu_start = time.process_time()
        report = run_infer(root / "data", workspace / "parameters.yaml", root / "predictions",
                           workspace / "additional_files", args.device)
        cpu_s = time.process_time() - cpu_start
    if report.failed:
        raise SystemExit(f"cases failed: {[(r.case_id, r.problems) for r in report.failed]}")
    seconds = [r.seconds for r in report.results]
    result = {"bench": "mlcube_infer", "device": args.device, "threads": torch.get_num_threads(),
              "shape": list(BRATS_SHAPE), "model": f"segresnet init_filters={args.init_filters}", "roi": list(args.roi),
              "overlap": args.overlap, "tta": args.tta, "cases": len(seconds), "model_load_s": round(load_s, 2),
              "case_s_mean": round(statistics.mean(seconds), 2), "case_s": [round(s, 2) for s in seconds],
              "cpu_s_per_case": round(cpu_s / len(seconds), 2), "load_average": round(os.getloadavg()[0], 1)}
    print(json.dumps(result))
    print("\n| device | threads | model | roi | overlap | TTA | s / case (mean) | CPU s / case | cases |\n"
          "|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.device} | {result['threads']} | {result['model']} | {'×'.join(map(str, args.roi))} | {args.overlap} "
          f"| {'on' if args.tta else 'off'} | {result['case_s_mean']} | {result['cpu_s_per_case']} | {len(seconds)} |")
    return 0


if __name__ == "__main__":
    run(main)
