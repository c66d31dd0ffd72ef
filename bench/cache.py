"""Epoch data time with and without the preprocessed-case cache, on phantoms, measured in one run.

    python bench/cache.py [--cases 20] [--size full|N] [--roi 128]
    python bench/cache.py --disk-runs 6 [--cases 20] [--size 96]   # disk used vs runs: per-run caches vs one shared

An "epoch" draws one training patch per case through ``TrainDataset`` in the main process. Two figures per
path: *load* (read, preprocess unless cached, cut the tumour-biased patch: what the cache replaces) and *item*
(load plus flips and the intensity-jitter draw,
 identical in both paths; the jitter is applied on the device). Prints a JSON line and a Markdown
table.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from brats_ugrip.cli import run
from brats_ugrip.data import cases_from_dir
from brats_ugrip.loaders import TrainDataset
from brats_ugrip.preprocess import CaseCache, case_cache_dir
from brats_ugrip.run_files import own_cache
from brats_ugrip.sweeps import layout
from brats_ugrip.synthetic.phantom import write_phantoms


def epoch_seconds(dataset: TrainDataset, augment: bool) -> float:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index] if augment else dataset.patch(index, generator)
    return time.perf_counter() - start


def _disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def disk_vs_runs(cases: list, runs: int, root: Path) -> list[dict[str, int]]:
    """Bytes of preprocessed cache after 1…``runs`` runs of one sweep read every case: with the old rule (each run
    its own ``run_dir/cache``) and with the shared rule (:func:`case_cache_dir`: ``SWEEP_DIR/cache``)."""
    sweep = root / "sweep"
    rows = []
    for index in range(runs):
        run_dir = layout.run_dir_path(sweep, f"run{index}")
        # per run (before), shared by the sweep (now)
        for cache_dir in (own_cache(run_dir), case_cache_dir(None, run_dir, layout.case_cache(sweep))):
            cache = CaseCache(cache_dir)
            for case in cases:
                cache.get(case)
        per_run = sum(_disk(own_cache(d)) for d in run_dir.parent.iterdir())
        rows.append({"runs": index + 1, "per_run_bytes": per_run, "shared_bytes": _disk(layout.case_cache(sweep))})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--size", default="full", help="'full' for the BraTS grid 240×240×155, or a cube side")
    parser.add_argument("--roi", type=int, default=128)
    parser.add_argument("--disk-runs", type=int, metavar="N", help="measure cache disk use for 1…N runs and exit")
    args = parser.parse_args(argv)
    size = (240, 240, 155) if args.size == "full" else int(args.size)
    if args.disk_runs:
        import os

        os.environ.pop("BRATS_UGRIP_CACHE", None)  # the rule's sweep default, not a machine-wide cache
        with tempfile.TemporaryDirectory() as tmp:
            write_phantoms(Path(tmp) / "data", args.cases, size, seed=0)
            rows = disk_vs_runs(cases_from_dir(Path(tmp) / "data"), args.disk_runs, Path(tmp))
        print(json.dumps({"bench": "cache_disk", "cases": args.cases, "size": args.size, "rows": rows}))
        print("\n| runs | per-run caches (MB) | one shared cache (MB) |\n|---|---|---|")
        for row in rows:
            print(f"| {row['runs']} | {row['per_run_bytes'] / 1e6:.1f} | {row['shared_bytes'] / 1e6:.1f} |")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_phantoms(data, args.cases, size, seed=0)
        cases = cases_from_dir(data)
        roi = (args.roi if args.size == "full" else min(args.roi, size),) * 3
        uncached = TrainDataset(cases, "brats2023", roi, CaseCache(None))
        cache = CaseCache(Path(tmp) / "cache")
        cached = TrainDataset(cases, "brats2023", roi, cache)
        fill = epoch_seconds(cached, augment=False)  # the first epoch fills the cache
        times = {(name, augment): epoch_seconds(dataset, augment)
                 for name, dataset in (("nifti", uncached), ("cached", cached)) for augment in (False, True)}
    speedup = {kind: times["nifti", augment] / times["cached", augment]
               for kind, augment in (("load", False), ("item", True))}
    result = {"bench": "cache", "cases": args.cases, "size": args.size, "roi": roi[0],
              "epoch_s_first_fill": round(fill, 3),
              **{f"epoch_s_{name}_{'item' if augment else 'load'}": round(t, 3) for (name, augment), t in times.items()},
              **{f"speedup_{kind}": round(value, 1) for kind, value in speedup.items()}}
    print(json.dumps(result))
    print("\n| epoch data time | NIfTI (s) | cached (s) | speed-up |\n|---|---|---|---|")
    for kind, augment in (("load", False), ("item", True)):
        print(f"| {kind} | {times['nifti', augment]:.3f} | {times['cached', augment]:.3f} | {speedup[kind]:.1f}× |")
    return 0


if __name__ == "__main__":
    run(main)
