"""What successive halving (``sweeps/halving.py``) saves on a grid, and what it risks: a simulation comparing, on
the same curves and seeds, the full grid, plain ASHA (``promote: score``), ASHA ranking on predicted final scores
(``promote: predicted``) and Hyperband's brackets.

    python bench/halving.py [--configs 64] [--folds 3] [--seeds 200] [--etas 2 3 4] [--crossing 0 0.3 0.6]
    python bench/halving.py --curves SWEEP_DIR     # a full grid's recorded curves (or a config,fold,epoch,dice CSV)
    python bench/halving.py --lcdb [CACHE_DIR] --workers 4   # lcdb 0.1.0's real curves, fetched on first use

Each configuration × fold is a learning curve of validation Dice per epoch. Without ``--curves`` the curves come
from a documented parametric family (per seed):

- configuration ``c`` has a latent quality ``u ~ U(0, 1)``; its asymptote is ``A = 0.70 + 0.15 u + 0.05 v``
  (``v ~ U(0, 1)``: the part not visible in its speed) and its time constant ``τ = 3 · e^{2 u'}`` epochs (3–22) with
  ``u' = w u + (1 − w) U(0, 1)`` (``--crossing w``, 0.6 by default): better configurations tend to learn
  *slower*, so curves cross and late bloomers exist, the hard case for early stopping (``--crossing 0``: speed
  tells nothing of quality);
- ``dice(t) = A − (A − 0.10) e^{−t/τ}``, plus a per-fold offset ``N(0, 0.01)`` and per-evaluation noise
  ``N(0, 0.004)`` (a validation fold of ~250 BraTS cases).

With ``--lcdb`` each of lcdb's data sets is one problem: its learners are the configurations (one fold: the
mean over lcdb's seeds), the training-set size is the budget axis (rungs snapped to lcdb's sizes, first rung 64),
a rung's cost is the size trained to and the predictor sees every size up to the rung (as it sees every epoch),
and the gap is the regret in validation accuracy.

A discrete-event simulation runs ASHA with ``--workers`` parallel slots (the sweep's array parallelism): every
configuration's folds start at the first rung; when a fold reaches a rung it reports, and the rules of
``sweeps/halving.py`` (the project's code, not a copy) promote configurations; promoted folds go ahead of new
work. GPU-hours are epochs trained. Hyperband splits the grid among its brackets (:func:`hyperband`). The grid's
best configuration is the one a full grid would select (best mean over folds of the observed score at the last
budget); a schedule keeps the best of those that reached it.

Prints a Markdown table per family or data source (GPU-hours relative to the full grid, how often the grid's best
is kept, the mean and 95th-percentile gap to it, for each ``eta`` and rule) and one JSON line. Goal: ≤ 40 % of
the GPU-hours with a mean gap ≤ 0.005 ("goal met"), or half of plain ASHA's gap at the same budget.
"""
from __future__ import annotations

import argparse
import csv
import heapq
import json
import math
import platform
import subprocess
import sys
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brats_ugrip.cli import run
from brats_ugrip.errors import DataError
from brats_ugrip.sweeps.halving import HalvingSchedule, config_scores, predicted_ranking, predicted_scores, promotions

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
    """Curves from a CSV of ``config,fold,epoch,dice`` rows, or from a sweep directory (each run's validation
    Dice per epoch in ``runs/<id>/csv/metrics.csv``, its configuration and fold from ``sweep.db``): epochs from 1,
    cut at the shortest run (a sweep's curves are the full grid's only where every run trained).

    Raises:
        DataError: no such path, no curves, or a configuration × fold without a Dice at some epoch up to the cut.
    """
    if not path.exists():
        raise DataError(f"{path}: no such sweep directory or curves CSV")
    if path.is_dir():
        rows = _sweep_rows(path)
    else:
        with path.open() as handle:
            rows = [(r["config"], int(r["fold"]), int(r["epoch"]), float(r["dice"])) for r in csv.DictReader(handle)]
    if not rows:
        raise DataError(f"{path}: no validation Dice curves")
    configs = sorted({r[0] for r in rows})
    folds = sorted({r[1] for r in rows})
    last: dict[tuple[str, int], int] = {}
    for config, fold, epoch, _ in rows:
        last[(config, fold)] = max(last.get((config, fold), 0), epoch)
    epochs = min(last.get((c, f), 0) for c in configs for f in folds)
    curves = np.full((len(configs), len(folds), max(epochs, 1)), np.nan)
    for config, fold, epoch, dice in rows:
        if epoch <= epochs:
            curves[configs.index(config), folds.index(fold), epoch - 1] = dice
    if epochs < 1 or np.isnan(curves).any():
        raise DataError(f"{path}: every config × fold needs a Dice for every epoch 1..{epochs}")
    return curves


def _sweep_rows(sweep_dir: Path) -> list[tuple[str, int, int, float]]:
    from brats_ugrip.sweeps.layout import metrics_csv, sweep_db_path
    from brats_ugrip.sweeps.monitoring.promotion import config_key, fold_of
    from brats_ugrip.sweeps.state import SweepState

    if not sweep_db_path(sweep_dir).is_file():
        raise DataError(f"{sweep_dir}: not a sweep directory (no sweep.db)")
    rows = []
    with SweepState(sweep_db_path(sweep_dir)) as state:
        for run in state.runs():
            log = metrics_csv(run.run_dir)
            if not log.is_file():
                continue
            with log.open() as handle:
                for row in csv.DictReader(handle):
                    if row.get("val/dice_mean"):
                        rows.append((config_key(run), int(fold_of(run) or 0), int(row["epoch"]) + 1,
                                     float(row["val/dice_mean"])))
    return rows


@dataclass
class Outcome:
    epochs_trained: float
    kept: int


Ranker = Callable[[int, dict[tuple[int, int], float]], dict[int, float]]


def plain_ranker(rung: int, reached: dict[tuple[int, int], float]) -> dict[int, float]:
    """ASHA's own order: the mean score reached at the rung."""
    return config_scores(reached)


def predicted_ranker(curves: np.ndarray, rungs: Sequence[int], budgets: np.ndarray) -> Ranker:
    """The ``promote: predicted`` order (``sweeps/halving.py``'s :func:`predicted_scores` and
    :func:`predicted_ranking`, the project's code) on the curves' points up to each rung; a configuration's
    prediction is cached until another fold reports."""
    cache: dict[tuple[int, int, tuple[int, ...]], float] = {}
    horizon = int(budgets[-1])

    def rank(rung: int, reached: dict[tuple[int, int], float]) -> dict[int, float]:
        folds: dict[int, list[int]] = {}
        for c, f in reached:
            folds.setdefault(c, []).append(f)
        scores = {}
        for c, fs in folds.items():
            key = (rung, c, tuple(sorted(fs)))
            if key not in cache:
                end = rungs[rung]
                fold_curves = {(c, f): dict(zip(budgets[:end].tolist(), curves[c, f, :end].tolist())) for f in fs}
                fold_scores = {(c, f): reached[(c, f)] for f in fs}
                cache[key] = predicted_scores(fold_scores, fold_curves, int(budgets[end - 1]), horizon)[c].value
            scores[c] = cache[key]
        return predicted_ranking(scores, config_scores(reached))

    return rank


def simulate(curves: np.ndarray, schedule: HalvingSchedule, workers: int, rank: Ranker | None = None,
             rungs: Sequence[int] | None = None, budgets: np.ndarray | None = None,
             configs: Sequence[int] | None = None) -> Outcome:
    """Run ASHA on ``curves`` with ``workers`` slots; the cost trained and the configuration kept.

    ``rungs`` are positions on the curves' last axis (1-based; default the schedule's epochs), ``budgets`` the
    cost of reaching each position (default: epochs, 1, 2, ...), ``configs`` the configurations taking part
    (default all; Hyperband's brackets split them), ``rank`` the order promotions follow (default ASHA's)."""
    n_folds = curves.shape[1]
    rungs = list(rungs or schedule.rungs)
    budgets = np.arange(1, curves.shape[2] + 1, dtype=float) if budgets is None else budgets
    rank = rank or plain_ranker
    configs = list(range(curves.shape[0]) if configs is None else configs)
    # Work is (priority, order, config, fold): promotions (0) go ahead of first-rung work (1), in order of arrival.
    queue = [(1, i * n_folds + f, c, f) for i, c in enumerate(configs) for f in range(n_folds)]
    order = len(queue)
    target = dict.fromkeys(((c, f) for c in configs for f in range(n_folds)), 0)  # rung each fold trains to
    active = [0] * len(rungs)  # folds queued or running towards each rung
    active[0] = len(queue)
    reached: list[dict[tuple[int, int], float]] = [{} for _ in rungs]  # rung → (config, fold) → score
    promoted: list[set[int]] = [set() for _ in rungs]
    running: list[tuple[float, int, int]] = []  # (finish time, config, fold)
    now, trained = 0.0, 0.0

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
            cost = budgets[rungs[k] - 1] - (budgets[rungs[k - 1] - 1] if k else 0.0)
            trained += cost
            heapq.heappush(running, (now + cost, c, f))
        now, c, f = heapq.heappop(running)
        k = target[(c, f)]
        active[k] -= 1
        reached[k][(c, f)] = float(curves[c, f, rungs[k] - 1])
        if k + 1 < len(rungs) and c in promoted[k]:
            advance(c, f)  # a late fold of a configuration already promoted follows it
        for rung in range(len(rungs) - 1):
            closed = sum(active[: rung + 1]) == 0
            scores = rank(rung, reached[rung])
            for config in promotions(scores, promoted[rung], schedule.eta, closed, config_scores(reached[rung])):
                promoted[rung].add(config)
                for fold in range(n_folds):
                    if (config, fold) in reached[rung] and target[(config, fold)] == rung:
                        advance(config, fold)
    final = config_scores(reached[-1])
    kept = max(final, key=lambda config: (final[config], -config))
    return Outcome(trained, kept)


def hyperband(curves: np.ndarray, schedule: HalvingSchedule, workers: int, rungs: Sequence[int],
              budgets: np.ndarray, rng: np.random.Generator) -> Outcome:
    """Hyperband (Li et al., JMLR 2018) on a fixed grid: brackets ``s = s_max … 0`` start at rung ``s_max − s``
    with ``⌈(s_max + 1)/(s + 1)⌉ · eta^s`` configurations each (in that proportion, the grid shuffled once per
    seed and split among them); each bracket is ASHA with the plain rule, and the best configuration to reach
    the last rung in any bracket is kept."""
    s_max = len(rungs) - 1
    sizes = np.array([math.ceil((s_max + 1) / (s + 1)) * schedule.eta ** s for s in range(s_max, -1, -1)], float)
    counts = np.maximum(1, np.floor(sizes / sizes.sum() * curves.shape[0])).astype(int)
    counts[0] += curves.shape[0] - counts.sum()  # the most aggressive bracket takes the remainder
    order = rng.permutation(curves.shape[0])
    trained, winners, start = 0.0, [], 0
    for bracket, count in enumerate(counts):
        members = order[start:start + count].tolist()
        start += count
        if not members:
            continue
        outcome = simulate(curves, schedule, workers, rungs=rungs[bracket:], budgets=budgets, configs=members)
        trained += outcome.epochs_trained
        winners.append(outcome.kept)
    final = curves[:, :, rungs[-1] - 1].mean(axis=1)
    return Outcome(trained, max(winners, key=lambda c: (final[c], -c)))


METHODS = ("grid", "asha", "predicted", "hyperband")


def evaluate(curves: np.ndarray, budgets: np.ndarray, rungs: Sequence[int], schedule: HalvingSchedule, workers: int,
             rng: np.random.Generator) -> dict[str, tuple[float, bool, float]]:
    """Each method on the same curves: (cost as a fraction of the full grid's, grid's best kept, gap to it)."""
    final = curves[:, :, -1].mean(axis=1)
    best = int(np.argmax(final))
    full = curves.shape[0] * curves.shape[1] * float(budgets[-1])
    outcomes = {"grid": Outcome(full, best),
                "asha": simulate(curves, schedule, workers, rungs=rungs, budgets=budgets),
                "predicted": simulate(curves, schedule, workers, predicted_ranker(curves, rungs, budgets), rungs,
                                      budgets),
                "hyperband": hyperband(curves, schedule, workers, rungs, budgets, rng)}
    return {name: (o.epochs_trained / full, o.kept == best, float(final[best] - final[o.kept]))
            for name, o in outcomes.items()}


def measure(problems, etas: Sequence[int], min_budget: int, workers: int) -> list[dict[str, Any]]:
    """One row per eta × method over the problems (``problems()`` yields ``(curves, budgets)`` anew per call, the
    same for every eta and method: seeds of the family, recorded curves, or lcdb's data sets)."""
    rows = []
    for eta in etas:
        results: dict[str, list[tuple[float, bool, float]]] = {m: [] for m in METHODS}
        rung_text = None
        for index, (curves, budgets) in enumerate(problems()):
            schedule = HalvingSchedule(min_epochs=min(min_budget, int(budgets[-1])), eta=eta,
                                       max_epochs=int(budgets[-1]))
            rungs = budget_rungs(schedule, budgets)
            rung_text = rung_text or [int(budgets[r - 1]) for r in rungs]
            for name, result in evaluate(curves, budgets, rungs, schedule, workers,
                                         np.random.default_rng(index)).items():
                results[name].append(result)
        for name, values in results.items():
            costs, kept, gaps = (np.array(v, dtype=float) for v in zip(*values))
            rows.append({"eta": eta, "method": name, "rungs": rung_text, "problems": len(values),
                         "gpu_hours_vs_grid": float(costs.mean()), "best_kept": float(kept.mean()),
                         "gap_mean": float(gaps.mean()), "gap_p95": float(np.percentile(gaps, 95))})
    return rows


def budget_rungs(schedule: HalvingSchedule, budgets: np.ndarray) -> list[int]:
    """The schedule's rungs as positions (1-based) on the budget axis: each rung at the largest budget not above
    it (lcdb's training-set sizes are a grid of their own); repeats dropped, the last budget last."""
    positions = [int(np.searchsorted(budgets, rung, side="right")) for rung in schedule.rungs]
    return sorted({max(p, 1) for p in positions[:-1]} - {len(budgets)}) + [len(budgets)]


def lcdb_curves(cache: Path, metric: str = "accuracy", min_learners: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    """lcdb 0.1.0's curves (Mohr et al. 2022; MIT), one problem per data set: learners × 1 fold × training-set
    sizes, validation ``metric`` averaged over lcdb's 25 seeds, kept for learners with a score at every size of the
    data set (learners that timed out at some size are left out), data sets with ≥ ``min_learners`` of them.

    The sdist is fetched with pip into ``cache`` on first use (~68 MB) and its CSV read from the archive, so
    lcdb itself (and scikit-learn) need not be installed; the parsed curves are cached next to it."""
    import pandas as pd

    parsed = cache / f"lcdb-0.1.0-{metric}.npz"
    if not parsed.is_file():
        archive = cache / "lcdb-0.1.0.tar.gz"
        if not archive.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "lcdb==0.1.0", "--no-deps", "--no-binary",
                            ":all:", "-d", str(cache)], check=True, stdout=subprocess.DEVNULL)
        with tarfile.open(archive) as tar:
            member = tar.extractfile(f"lcdb-0.1.0/lcdb/database-{metric}.csv")
            frame = pd.read_csv(member, usecols=["openmlid", "learner", "size_train", "score_valid"])
        means = frame.groupby(["openmlid", "learner", "size_train"])["score_valid"].mean()
        arrays = {}
        for openmlid, table in means.groupby(level=0):
            wide = table.droplevel(0).unstack("size_train").dropna(axis=0, how="any")
            if len(wide) >= min_learners and wide.shape[1] >= 3:
                arrays[f"c{openmlid}"] = wide.to_numpy()
                arrays[f"b{openmlid}"] = wide.columns.to_numpy(dtype=float)
        np.savez_compressed(parsed, **arrays)
    data = np.load(parsed)
    ids = sorted(int(name[1:]) for name in data.files if name.startswith("c"))
    return [(data[f"c{i}"][:, None, :], data[f"b{i}"]) for i in ids]


def print_table(title: str, rows: list[dict[str, Any]], gap_name: str) -> None:
    print(f"\n{title}\n")
    print(f"| eta | rungs (first problem) | rule | GPU-hours vs full grid | grid's best kept | {gap_name} mean | p95 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        met = r["gpu_hours_vs_grid"] <= GOAL_COST and r["gap_mean"] <= GOAL_GAP and r["method"] != "grid"
        print(f"| {r['eta']} | {r['rungs']} | {r['method']} | {r['gpu_hours_vs_grid']:.1%} | {r['best_kept']:.0%} | "
              f"{r['gap_mean']:.4f} | {r['gap_p95']:.4f} |" + (" goal met" if met else ""))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=int, default=64)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--etas", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--min-epochs", type=int, default=5, help="first rung (lcdb: training-set size; default 64)")
    parser.add_argument("--max-epochs", type=int, default=135)
    parser.add_argument("--crossing", type=float, nargs="+", default=[0.6],
                        help="weight of quality in learning slowness (0..1); several: one table each")
    parser.add_argument("--workers", type=int, default=24, help="parallel slots (the sweep's array parallelism)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--curves", type=Path, help="recorded curves instead of the family: a sweep directory (a "
                                                    "full grid's runs) or a CSV of config,fold,epoch,dice")
    source.add_argument("--lcdb", type=Path, nargs="?", const=Path.home() / ".cache" / "brats-ugrip" / "lcdb",
                        help="lcdb 0.1.0's real curves (fetched with pip into this cache folder on first use)")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"bench": "halving", "workers": args.workers, "etas": args.etas,
                              "python": platform.python_version(), "tables": []}
    if args.lcdb:
        min_budget = 64 if args.min_epochs == 5 else args.min_epochs
        # a data set needs two rungs below its full size (at eta 2) for halving to decide anything
        data_sets = [(c, b) for c, b in lcdb_curves(args.lcdb) if b[-1] >= 4 * min_budget]
        tables = [(f"lcdb 0.1.0: {len(data_sets)} data sets (learners as configurations, training-set size as the "
                   f"budget, the cost: size trained), first rung {min_budget}", lambda: data_sets, min_budget, "regret")]
    elif args.curves:
        recorded = recorded_curves(args.curves)
        budgets = np.arange(1, recorded.shape[2] + 1, dtype=float)
        tables = [(f"recorded curves {args.curves}", lambda: [(recorded, budgets)], args.min_epochs, "Dice gap")]
    else:
        budgets = np.arange(1, args.max_epochs + 1, dtype=float)
        tables = [(f"parametric family, crossing {w}: {args.configs} configurations × {args.folds} folds, "
                   f"{args.seeds} seeds", _family(args, w, budgets), args.min_epochs, "Dice gap")
                  for w in args.crossing]
    for title, problems, min_budget, gap_name in tables:
        rows = measure(problems, args.etas, min_budget, args.workers)
        report["tables"].append({"title": title, "rows": rows})
        print_table(title, rows, gap_name)
    print(json.dumps(report))
    return 0


def _family(args: argparse.Namespace, crossing: float, budgets: np.ndarray):
    def problems():
        for seed in range(args.seeds):
            yield parametric_curves(args.configs, args.folds, args.max_epochs, np.random.default_rng(seed),
                                    crossing), budgets
    return problems


if __name__ == "__main__":
    run(main)
