"""Epoch data time with and without the preprocessed-case cache, on phantoms, measured in one run.

    python bench/cache.py [--cases 20] [--size full|N] [--roi 128]

An "epoch" draws one training patch per case through ``TrainDataset`` (read, preprocess unless cached, random
crop, flips, intensity jitter), in the main process. Prints a JSON line and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from brats_ugrip.cli import run
from brats_ugrip.data import cases_from_dir
from brats_ugrip.datasets import TrainDataset
from brats_ugrip.preprocess import CaseCache
from synthetic.phantom import write_phantoms


def epoch_seconds(dataset: TrainDataset) -> float:
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
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
        fill = epoch_seconds(cached)  # first epoch fills the cache
        times = {"nifti": epoch_seconds(uncached), "cached": epoch_seconds(cached)}
    result = {"bench": "cache", "cases": args.cases, "size": args.size, "roi": roi[0],
              "epoch_s_nifti": round(times["nifti"], 3), "epoch_s_cached": round(times["cached"], 3),
              "epoch_s_first_fill": round(fill, 3), "speedup": round(times["nifti"] / times["cached"], 1)}
    print(json.dumps(result))
    print("\n| epoch data time | seconds | per case (ms) |\n|---|---|---|")
    for name in ("nifti", "cached"):
        print(f"| {name} | {times[name]:.3f} | {1000 * times[name] / args.cases:.1f} |")
    print(f"\nspeed-up of the cache: **{result['speedup']}×**")
    return 0


if __name__ == "__main__":
    run(main)
