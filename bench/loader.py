"""Training-loader throughput per worker count vs the samples/s a training step consumes, measured in one run.

    python bench/loader.py [--cases 8] [--size full|N] [--roi 64 64 64] [--batch-size 2] [--workers 0 1 2]
                           [--batches 20] [--step-seconds S | --model segresnet --init-filters 8]
                           [--device cpu|cuda] [--precision 32|bf16-mixed] [--deep-supervision]

Phantoms are written to a temporary folder and the preprocessed-case cache is filled once (not timed). For each
worker count the training loader comes from ``make_loaders``, as training builds it (tumour-biased patches read
from the memory-mapped cache, flips and intensity jitter in the workers, persistent workers, pinned memory when
CUDA is present), and is drained for ``--batches`` batches, rounded up to whole rounds of one batch per worker.
The first round pays the workers' start-up and is reported apart (``first_round_s``); the rate is measured over
the other rounds: samples/s, and samples/s per worker (with 0 workers the main process loads, between steps).

Consumption is ``batch_size / step time``, the step time either given (``--step-seconds``; MedNeXt-B bf16 at
128×160×112, batch 2, takes ≈ 0.255 s on an H100, 0.201 s compiled: see ``bench/train_step.py``) or measured
here: forward + backward + AdamW step of ``--model`` on a batch of the same size (``bench/train_step.py``'s bare
loop), median of ``--steps`` after two warm-up steps.

``workers_needed`` is the smallest measured count ≥ 1 whose rate is at least ``--target`` (2) × the consumption
(0 workers never overlaps loading with the step, so it cannot keep a GPU fed); when no measured count reaches
it, it is extrapolated linearly from the per-worker rate of the largest count measured
(``workers_needed_from``). Worker counts from the machine's core count up cannot show scaling, the main process
needing a core too (``cpu_count`` in the JSON line). Prints a JSON line, a Markdown table and the recommendation.

On a GPU node, at the seed's patch:

    python bench/loader.py --size full --roi 128 160 112 --workers 0 1 2 4 8 --step-seconds 0.201
    python bench/loader.py --size full --roi 128 160 112 --workers 1 2 4 8 --model mednext_b --init-filters 32 \\
        --deep-supervision --precision bf16-mixed --device cuda
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from brats_ugrip.bench.train_step import bare_steps
from brats_ugrip.cli import console, run, track
from brats_ugrip.data import Datalist, make_datalist
from brats_ugrip.errors import ConfigError
from brats_ugrip.loaders import make_loaders
from brats_ugrip.models import get_spec, resolve_kwargs
from brats_ugrip.preprocess import CaseCache
from brats_ugrip.synthetic.anatomy import BRATS_SHAPE
from brats_ugrip.synthetic.phantom import write_phantoms

WARMUP_STEPS = 2


@dataclass(frozen=True)
class LoaderRate:
    """One worker count's figures: start-up round, steady rate, and the rate per worker (per process for 0)."""

    workers: int
    first_round_s: float
    samples_per_s: float

    @property
    def per_worker(self) -> float:
        return self.samples_per_s / max(self.workers, 1)


def measure_loader(datalist: Datalist, roi: Sequence[int], batch_size: int, cache_dir: Path, workers: int,
                   batches: int) -> LoaderRate:
    """Drain the project's training loader with ``workers`` workers; returns its rate."""
    rounds_of = max(workers, 1)
    total = rounds_of * max(2, math.ceil(batches / rounds_of))  # ≥ 2 rounds: the first one is start-up
    cases = datalist.training
    loader, _ = make_loaders(datalist, datalist.folds[0], datalist.label_scheme, roi, batch_size, cache_dir, workers,
                             samples_per_case=math.ceil(total * batch_size / len(cases)), train_cases=cases)
    start = time.perf_counter()
    iterator = iter(loader)
    for _ in range(rounds_of):
        next(iterator)
    first_round = time.perf_counter() - start
    for _ in range(total - rounds_of):
        next(iterator)
    steady = time.perf_counter() - start - first_round
    del iterator, loader  # shuts the persistent workers down before the next count starts its own
    return LoaderRate(workers, first_round, (total - rounds_of) * batch_size / steady)


def measure_step(model_name: str, model_kwargs: dict[str, Any], roi: Sequence[int], batch_size: int,
                 device: str, precision: str, steps: int) -> float:
    """Median seconds of a training step of ``model_name`` on ``batch_size × roi`` patches (the bare loop of
    ``bench/train_step.py``, which the project's step matches within a few per cent), after warm-up steps."""
    seconds = bare_steps(model_name, model_kwargs, roi, batch_size, precision, False, WARMUP_STEPS + steps, device)
    return statistics.median(seconds[WARMUP_STEPS:])


def workers_needed(rates: Sequence[LoaderRate], target: float) -> tuple[int, str]:
    """The smallest measured worker count ≥ 1 reaching ``target`` samples/s, else one extrapolated from the
    per-worker rate of the largest count measured; and which of the two (``"measured"``/``"extrapolated"``)."""
    for rate in sorted(rates, key=lambda r: r.workers):
        if rate.workers >= 1 and rate.samples_per_s >= target:
            return rate.workers, "measured"
    largest = max(rates, key=lambda r: r.workers)
    return max(1, math.ceil(target / largest.per_worker)), "extrapolated"


def significant(value: float) -> float:
    """``value`` to 4 significant digits, for the JSON line (rates span 1e-3 to 1e6 samples/s)."""
    return float(f"{value:.4g}")


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The registry settings of ``--model`` given on the command line."""
    return {"init_filters": args.init_filters, **({"deep_supervision": True} if args.deep_supervision else {})}


def check_args(args: argparse.Namespace) -> None:
    """Reject bad options before any phantom is written."""
    if args.size != "full" and not args.size.isdigit():
        raise ConfigError("--size", f"expected 'full' or a cube side in voxels, got {args.size!r}")
    for key, value in (("--cases", args.cases), ("--batch-size", args.batch_size), ("--batches", args.batches),
                       ("--steps", args.steps), ("--target", args.target), *(("--roi", r) for r in args.roi)):
        if value <= 0:
            raise ConfigError(key, f"must be positive, got {value}")
    if any(w < 0 for w in args.workers):
        raise ConfigError("--workers", f"worker counts must be ≥ 0, got {args.workers}")
    if args.step_seconds is not None:
        if args.step_seconds <= 0:
            raise ConfigError("--step-seconds", f"must be positive, got {args.step_seconds}")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "CUDA is not available here; use --device cpu, or give --step-seconds")
    resolve_kwargs(args.model, **model_kwargs(args))  # unknown model or setting: an error now, not after the loaders
    divisor = get_spec(args.model).divisor
    if any(r % divisor for r in args.roi):
        raise ConfigError("--roi", f"{args.model} downsamples by {divisor}: every size must be a multiple of "
                          f"{divisor}, got {args.roi}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", default="96", help="'full' for the BraTS grid 240×240×155, or a cube side")
    parser.add_argument("--roi", type=int, nargs=3, default=[64, 64, 64], help="training patch (seed: 128 160 112)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to measure")
    parser.add_argument("--batches", type=int, default=20, help="batches drained per worker count (start-up included)")
    parser.add_argument("--target", type=float, default=2.0, help="loader rate wanted, in multiples of consumption")
    step = parser.add_mutually_exclusive_group()
    step.add_argument("--step-seconds", type=float, help="seconds of one training step (skips the model)")
    step.add_argument("--model", default="segresnet", help="network whose step is measured (registry name)")
    parser.add_argument("--init-filters", type=int, default=8, help="width of --model (MedNeXt-B's real one: 32)")
    parser.add_argument("--deep-supervision", action="store_true", help="MedNeXt with deep supervision, as the seed")
    parser.add_argument("--precision", choices=("32", "bf16-mixed"), default="32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (after 2 warm-up steps)")
    args = parser.parse_args(argv)
    check_args(args)
    size = BRATS_SHAPE if args.size == "full" else int(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        data, cache_dir = Path(tmp) / "data", Path(tmp) / "cache"
        write_phantoms(data, args.cases, size, seed=0, workers=min(args.cases, os.cpu_count() or 1), progress=True)
        datalist = Datalist.from_dict(make_datalist(data, n_folds=2))
        cache = CaseCache(cache_dir)
        for case in track(datalist.training, "filling the cache"):
            cache.get(case, datalist.label_scheme)
        rates = [measure_loader(datalist, args.roi, args.batch_size, cache_dir, workers, args.batches)
                 for workers in track(args.workers, "loader worker counts")]
    if args.step_seconds is not None:
        step_s, step_source = args.step_seconds, "given"
    else:
        console.print(f"measuring the training step of {args.model} on {args.device}")
        step_s = measure_step(args.model, model_kwargs(args), args.roi, args.batch_size, args.device, args.precision,
                              args.steps)
        step_source = (f"{args.model} f{args.init_filters}{' ds' if args.deep_supervision else ''} "
                       f"{'fp32' if args.precision == '32' else 'bf16'} on {args.device}")
    consumption = args.batch_size / step_s
    needed, needed_from = workers_needed(rates, args.target * consumption)
    cpu_count = len(os.sched_getaffinity(0))
    loaders = [{"workers": r.workers, "first_round_s": significant(r.first_round_s),
                "samples_per_s": significant(r.samples_per_s), "samples_per_s_per_worker": significant(r.per_worker),
                "ratio": significant(r.samples_per_s / consumption)} for r in rates]
    result = {"bench": "loader", "cases": args.cases, "size": args.size, "roi": args.roi, "batch_size": args.batch_size,
              "cpu_count": cpu_count, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "torch": torch.__version__, "step_s": significant(step_s), "step_source": step_source,
              "consumed_samples_per_s": significant(consumption), "target_ratio": args.target, "loaders": loaders,
              "workers_needed": needed, "workers_needed_from": needed_from}
    print(json.dumps(result))
    print("\n| workers | first round (s) | samples/s | samples/s per worker | × consumption |\n|---|---|---|---|---|")
    for r in rates:
        print(f"| {r.workers} | {r.first_round_s:.2f} | {r.samples_per_s:.1f} | {r.per_worker:.1f} | "
              f"{r.samples_per_s / consumption:.1f}× |")
    print(f"\nA step ({step_source}) takes {step_s:.3f} s: it consumes {consumption:.2f} samples/s.")
    caveat = (f" Counts from this machine's {cpu_count} cores up cannot show scaling (the main process needs a "
              "core too)." if max(args.workers) >= cpu_count else "")
    print(f"Recommendation: num_workers = {needed} ({needed_from}) loads ≥ {args.target:g}× the "
          f"{consumption:.2f} samples/s a step consumes at roi {'×'.join(map(str, args.roi))}, batch "
          f"{args.batch_size}.{caveat}")
    return 0


if __name__ == "__main__":
    run(main)
