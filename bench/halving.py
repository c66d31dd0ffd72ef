"""What asynchronous successive halving (``sweeps/halving.py``) saves on a grid, and what it risks: a simulation.

    python bench/halving.py [--configs 64] [--folds 3] [--seeds 200] [--etas 2 3 4] [--workers 24]
    python bench/halving.py --curves curves.csv          # recorded curves: config,fold,epoch,dice per line

Each configuration × fold is a learning curve of validation Dice per epoch. Without ``--curves`` the curves come
from a documented parametric family (per seed):

- configuration ``c`` has a latent quality ``u ~ U(0, 1)``; its asymptote is ``A = 0.70 + 0.15 u + 0.05 v``
  (``v ~ U(0, 1)``: the part not visible in its speed) and its time constant ``τ = 3 · e^{2 u'}`` epochs (3–22) with
  ``u' = w u + (1 − w) U(0, 1)`` (``--crossing w``, 0.6 by default): better configurations tend to learn
  *slower*, so curves cross and late bloomers exist, the hard case for early stopping (``--crossing 0``: speed
  tells nothing of quality);
- ``dice(t) = A − (A − 0.10) e^{−t/τ}``, plus a per-fold offset ``N(0, 0.01)`` and per-evaluation noise
  ``N(0, 0.004)`` (a validation fold of ~250 BraTS cases).

A discrete-event simulation runs ASHA with ``--workers`` parallel slots (the sweep's array parallelism): every
configuration's folds start at the first rung; when a fold reaches a rung it reports, and the rule of
``sweeps/halving.py`` (the project's code, not a copy) promotes configurations; promoted folds go ahead of new
work. GPU-hours are epochs trained. The grid's best configuration is the one a full grid would select (best mean
over folds of the observed Dice at ``max_epochs``); ASHA keeps the best of those that reached ``max_epochs``.

Prints one JSON line and a Markdown table: GPU-hours relative to the full grid, how often ASHA keeps the grid's
best, and the mean and 95th-percentile Dice gap to it, for each ``eta``. Goal: ≤ 40 % of the GPU-hours with the
best kept in ≥ 90 % of seeds, or a gap ≤ 0.005.
"""
from __future__ import annotations

import argparse
import csv
import heapq
import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brats_ugrip.cli import run
from brats_ugrip.sweeps.halving import HalvingSchedule, config_scores, promotions

GOAL_COST, GOAL_KEPT, GOAL_GAP = 0.40, 0.90, 0.005


def parametric_curves(n_configs: int, n_folds: int, max_epochs: int, rng: np.random.Generator,
                      crossing: float = 0.6) -> np.ndarray:
    """Observed Dice ``[config, fold, epoch - 1]`` for epochs 1..max_epochs (see the module docstring)."""
    u = rng.uniform(size=n_configs)
    u_speed = np.clip(crossing * u + (1 - crossing) * rng.uniform(size=n_configs), 0, 1)
    asymptote = 0.70 + 0.15 * u + 0.05 * rng.uniform(size=n_configs)
    tau = 3.0 * np.exp(2.0 * u_speed)
    t = np.arange(1, max_epochs + 1)
    clean = asymptote[:, None] - (asymptote[:, None] - 0.10) * np.exp(-t[None, :] / tau[:, None])
    fold_offset = rng.normal(0, 0.01, size=(n_configs, n_folds, 1))
    noise = rng.normal(0, 0.004, size=(n_configs, n_folds, max_epochs))
    return clean[:, None, :] + fold_offset + noise


def recorded_curves(path: Path) -> np.ndarray:
    """Curves from a CSV of ``config,fold,epoch,dice`` rows (epochs from 1; every config × fold complete)."""
    rows = list(csv.DictReader(path.open()))
    configs = sorted({r["config"] for r in rows})
    folds = sorted({int(r["fold"]) for r in rows})
    epochs = max(int(r["epoch"]) for r in rows)
    curves = np.full((len(configs), len(folds), epochs), np.nan)
    for r in rows:
        curves[configs.index(r["config"]), folds.index(int(r["fold"])), int(r["epoch"]) - 1] = float(r["dice"])
    if np.isnan(curves).any():
        raise SystemExit(f"{path}: every config × fold needs a Dice for every epoch 1..{epochs}")
    return curves


@dataclass
class Outcome:
    epochs_trained: int
    kept: int


def simulate(curves: np.ndarray, schedule: HalvingSchedule, workers: int) -> Outcome:
    """Run ASHA on ``curves`` with ``workers`` slots; epochs trained and the configuration kept."""
    n_configs, n_folds, _ = curves.shape
    rungs = schedule.rungs
    # Work is (priority, order, config, fold): promotions (0) go ahead of first-rung work (1), in order of arrival.
    queue = [(1, c * n_folds + f, c, f) for c in range(n_configs) for f in range(n_folds)]
    order = len(queue)
    target = dict.fromkeys(((c, f) for c in range(n_configs) for f in range(n_folds)), 0)  # rung each fold trains to
    active = [0] * len(rungs)  # folds queued or running towards each rung
    active[0] = len(queue)
    reached: list[dict[tuple[int, int], float]] = [{} for _ in rungs]  # rung → (config, fold) → score
    promoted: list[set[int]] = [set() for _ in rungs]
    running: list[tuple[float, int, int]] = []  # (finish time, config, fold)
    now, trained = 0.0, 0

    def advance(c: int, f: int) -> None:
        nonlocal order
        target[(c, f)] += 1
        active[target[(c, f)]] += 1
        order += 1
        heapq.heappush(queue, (0, order, c, f))

    while queue or running:
        while queue and len(running) < workers:
            _, _, c, f = heapq.heappop(queue)
            k = target[(c, f)]
            epochs = rungs[k] - (rungs[k - 1] if k else 0)
            trained += epochs
            heapq.heappush(running, (now + epochs, c, f))
        now, c, f = heapq.heappop(running)
        k = target[(c, f)]
        active[k] -= 1
        reached[k][(c, f)] = float(curves[c, f, rungs[k] - 1])
        if k + 1 < len(rungs) and c in promoted[k]:
            advance(c, f)  # a late fold of a configuration already promoted follows it
        for rung in range(len(rungs) - 1):
            closed = sum(active[: rung + 1]) == 0
            for config in promotions(config_scores(reached[rung]), promoted[rung], schedule.eta, closed):
                promoted[rung].add(config)
                for fold in range(n_folds):
                    if (config, fold) in reached[rung] and target[(config, fold)] == rung:
                        advance(config, fold)
    final = config_scores(reached[-1])
    kept = max(final, key=lambda config: (final[config], -config))
    return Outcome(trained, kept)


def measure(curves_of_seed, n_seeds: int, etas: Sequence[int], min_epochs: int, max_epochs: int,
            workers: int) -> list[dict[str, float]]:
    rows = []
    for eta in etas:
        schedule = HalvingSchedule(min_epochs=min_epochs, eta=eta, max_epochs=max_epochs)
        costs, kept_best, gaps = [], [], []
        for seed in range(n_seeds):
            curves = curves_of_seed(seed)
            outcome = simulate(curves, schedule, workers)
            final = curves[:, :, max_epochs - 1].mean(axis=1)
            best = int(np.argmax(final))
            costs.append(outcome.epochs_trained / (curves.shape[0] * curves.shape[1] * max_epochs))
            kept_best.append(outcome.kept == best)
            gaps.append(float(final[best] - final[outcome.kept]))
        rows.append({"eta": eta, "rungs": schedule.rungs, "gpu_hours_vs_grid": float(np.mean(costs)),
                     "best_kept": float(np.mean(kept_best)), "gap_mean": float(np.mean(gaps)),
                     "gap_p95": float(np.percentile(gaps, 95))})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=int, default=64)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--etas", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--min-epochs", type=int, default=5)
    parser.add_argument("--max-epochs", type=int, default=135)
    parser.add_argument("--crossing", type=float, default=0.6, help="weight of quality in learning slowness (0..1)")
    parser.add_argument("--workers", type=int, default=24, help="parallel slots (the sweep's array parallelism)")
    parser.add_argument("--curves", type=Path, help="recorded curves CSV (config,fold,epoch,dice) instead of the family")
    args = parser.parse_args(argv)
    if args.curves:
        recorded = recorded_curves(args.curves)
        args.max_epochs, args.seeds = recorded.shape[2], 1
        curves_of_seed = lambda seed: recorded  # noqa: E731
    else:
        curves_of_seed = lambda seed: parametric_curves(args.configs, args.folds, args.max_epochs,  # noqa: E731
                                                        np.random.default_rng(seed), args.crossing)
    rows = measure(curves_of_seed, args.seeds, args.etas, args.min_epochs, args.max_epochs, args.workers)
    print(json.dumps({"bench": "halving", "configs": args.configs, "folds": args.folds, "seeds": args.seeds,
                      "workers": args.workers, "min_epochs": args.min_epochs,
                      "crossing": None if args.curves else args.crossing, "curves": str(args.curves or "parametric"),
                      "results": rows,
                      "python": platform.python_version()}))
    print("\n| eta | rungs | GPU-hours vs full grid | grid's best kept | Dice gap mean | gap p95 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        met = r["gpu_hours_vs_grid"] <= GOAL_COST and (r["best_kept"] >= GOAL_KEPT or r["gap_p95"] <= GOAL_GAP)
        print(f"| {r['eta']} | {r['rungs']} | {r['gpu_hours_vs_grid']:.1%} | {r['best_kept']:.0%} | "
              f"{r['gap_mean']:.4f} | {r['gap_p95']:.4f} |" + (" goal met" if met else ""))
    return 0


if __name__ == "__main__":
    run(main)
