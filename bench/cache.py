"""Epoch data time with and without the preprocessed-case cache, on phantoms, measured in one run.

    python bench/cache.py [--cases 20] [--size full|N] [--roi 128]

An "epoch" draws one training patch per case through ``TrainDataset`` in the main process. Two figures per
path: *load* (read, preprocess unless cached, cut the tumour-biased patch: what the cache replaces) and *item*
(load plus flips and the intensity-jitter draw, identical in both paths; the jitter is applied on the device). Prints a JSON line and a Markdown
table.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from collections.abc import Sequence
from pathlib import Path

from brats_ugrip.cli import run
from brats_ugrip.data import cases_from_dir
from brats_ugrip.datasets import TrainDataset
from brats_ugrip.preprocess import CaseCache
from brats_ugrip.synthetic.phantom import write_phantoms


def epoch_seconds(dataset: TrainDataset, augment: bool) -> float:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index] if augment else dataset.patch(index, generator)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--size", default="full", help="'full' for the BraTS grid 240×240×155, or a cube side")
    parser.add_argument("--roi", type=int, default=128)
    args = parser.parse_args(argv)
    size = (240, 240, 155) if args.size == "full" else int(args.size)
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
