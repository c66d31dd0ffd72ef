"""Cost of the sweep monitor with many runs: poll time and render time, measured in one run.

    python bench/monitor.py [--runs 1000] [--repeat 5]

A simulated sweep of ``--runs`` SLURM runs in one job array (a real ``sweep.db`` and run directories with
progress files) and a recorded-style ``sacct`` answer for the whole array (running tasks, one of them requeued
before, and pending tasks in one compressed record), fed to the real parser: nothing is submitted. Measured:

- first poll: every run changes state (SUBMITTED → RUNNING/REQUEUED): parse, merge, database writes, results.csv;
- steady poll: nothing changed (the common case while a sweep trains for days);
- snapshot: ``sweep.db`` + every progress file → rows (progress files changed since the last read, and not);
- render: one live frame (50 lines), the full ``--once`` table, the compact table.

Prints a JSON line and a Markdown table; the goal is a render under 0.2 s.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from rich.console import Console

from brats_ugrip.atomic import atomic_write_json
from brats_ugrip.cli import run
from brats_ugrip.slurm.sacct import SacctRecord, parse_sacct
from brats_ugrip.slurm.squeue import ControllerJob
from brats_ugrip.sweeps import layout
from brats_ugrip.sweeps.job_states import LocalJobStates, SlurmJobStates
from brats_ugrip.sweeps.layout import run_dir_path, sweep_db_path
from brats_ugrip.sweeps.monitoring.dashboard import ViewOptions, render
from brats_ugrip.sweeps.monitoring.engine import SweepMonitor
from brats_ugrip.sweeps.state import RunRecord, SweepState

ARRAY_ID = 5000
GOAL_RENDER_S = 0.2


def make_sweep(sweep_dir: Path, n_runs: int, seed: int = 0) -> list[RunRecord]:
    """``n_runs`` runs (lr × fold × seed) recorded as submitted in array ``ARRAY_ID``, with progress files."""
    rng = random.Random(seed)
    lrs = [0.0003, 0.001, 0.0027, 0.005, 0.01]
    records = []
    for i in range(n_runs):
        params = {"optim.lr": lrs[i % len(lrs)], "data.fold": i // len(lrs) % 5, "trainer.seed": i // 25}
        run_id = f"fold={params['data.fold']}-lr={params['optim.lr']}-seed={params['trainer.seed']}"
        run_dir = run_dir_path(sweep_dir, run_id)
        config = {"data": {"fold": params["data.fold"], "datalist": "/data/datalist.json"},
                  "optim": {"name": "adamw_sf", "lr": params["optim.lr"]}, "trainer": {"max_epochs": 300,
                                                                                       "seed": params["trainer.seed"]},
                  "model": {"name": "mednext_b"}, "run_dir": str(run_dir)}
        records.append(RunRecord(run_id=run_id, config=config, params=params, run_dir=str(run_dir),
                                 submit={"cluster": "slurm", "parameters": {"gpus_per_node": 1, "time": 1440}},
                                 max_retries=2))
    with SweepState(sweep_db_path(sweep_dir)) as state:
        state.add_runs(records)
        state.set_meta("name", "bench_monitor")
        with state.transaction():
            for task, record in enumerate(records):
                state.record_submission(record.run_id, f"{ARRAY_ID}_{task}",
                                        log_path=str(layout.jobs_dir(sweep_dir) / f"{ARRAY_ID}_{task}" / "log.err"))
    for task, record in enumerate(records[:running_count(n_runs)]):
        write_progress(Path(record.run_dir), rng, epoch=rng.randrange(1, 300))
    return records


def running_count(n_runs: int) -> int:
    return n_runs * 3 // 4


def write_progress(run_dir: Path, rng: random.Random, epoch: int) -> None:
    best = rng.uniform(0.6, 0.9)
    atomic_write_json(layout.progress_path(run_dir), {
        "status": "running", "epoch": epoch, "max_epochs": 300, "step": epoch * 250, "best_val_dice": best,
        "best_epoch": max(1, epoch - rng.randrange(0, 10)), "val_metrics": {"mean": best}, "epoch_seconds": 95.0,
        "host": f"gpu{rng.randrange(40):03d}", "gpu": "NVIDIA A100-SXM4-80GB", "started_at": "2025-01-01T00:00:00+00:00",
        "updated_at": "2025-01-01T01:00:00+00:00"})


def sacct_text(n_runs: int) -> str:
    """What ``sacct -X -n -P --duplicates -j ARRAY -o <SACCT_FIELDS>`` prints for the simulated array: the first
    three quarters running (task 0 requeued once before), the rest pending in one compressed record."""
    lines = [f"{ARRAY_ID}_0|REQUEUED|gpu000|3600|0:0|2025-01-01T00:00:00|2025-01-01T01:00:00|None"]
    for task in range(running_count(n_runs)):
        lines.append(f"{ARRAY_ID}_{task}|RUNNING|gpu{task % 40:03d}|5400|0:0|2025-01-01T01:00:12|Unknown|None")
    if running_count(n_runs) < n_runs:
        lines.append(f"{ARRAY_ID}_[{running_count(n_runs)}-{n_runs - 1}%750]|PENDING|None assigned|0|0:0|Unknown|"
                     "Unknown|JobArrayTaskLimit")
    return "\n".join(lines) + "\n"


def timed(function: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Median seconds of ``repeat`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def render_seconds(renderable_of: Callable[[], object], width: int, height: int, repeat: int) -> float:
    def once() -> None:
        console = Console(file=io.StringIO(), width=width, height=height, force_terminal=True, color_system="truecolor")
        console.print(renderable_of())
    return timed(once, repeat)[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    text = sacct_text(args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        sweep_dir = Path(tmp)
        make_sweep(sweep_dir, args.runs)
        queries = []

        def recorded_sacct(job_ids: Iterable[str], timeout_s: float) -> dict[str, list[SacctRecord]]:
            queries.append(len(list(job_ids)))
            return parse_sacct(text)

        # The recorded answer's jobs are not the live controller's: no squeue (it would ask about others); the
        # controller is taken to hold every job asked about, as it would while the array waits.
        def recorded_controller(job_ids: Iterable[str], timeout_s: float) -> dict[str, ControllerJob]:
            return {job_id: ControllerJob("PENDING", "JobArrayTaskLimit") for job_id in job_ids}

        monitor = SweepMonitor(sweep_dir, sources=[SlurmJobStates(query=recorded_sacct,
                                                                  controller=recorded_controller),
                                                   LocalJobStates(layout.jobs_dir(sweep_dir) / "%j")])
        parse_s, _ = timed(lambda: parse_sacct(text), args.repeat)
        start = time.perf_counter()
        first = monitor.poll()
        first_poll_s = time.perf_counter() - start
        steady_poll_s, _ = timed(monitor.poll, args.repeat)
        snapshot_cached_s, snapshot = timed(monitor.snapshot, args.repeat)
        rng = random.Random(1)
        records = monitor.state.runs()

        def touched_snapshot() -> object:  # every running run wrote a new epoch since the last read
            for record in records[:running_count(args.runs)]:
                write_progress(Path(record.run_dir), rng, epoch=rng.randrange(1, 300))
            start = time.perf_counter()
            monitor.snapshot()
            return time.perf_counter() - start

        snapshot_fresh_s = statistics.median(touched_snapshot() for _ in range(args.repeat))
        frame_s = render_seconds(lambda: render(snapshot, ViewOptions(sort="state"), height=50, width=200), 200, 50,
                                 args.repeat)
        full_s = render_seconds(lambda: render(snapshot, ViewOptions()), 250, args.runs + 10, max(1, args.repeat // 2))
        compact_s = render_seconds(lambda: render(snapshot, ViewOptions(compact=True), width=200), 200, 50, args.repeat)
        monitor.close()
    result = {
        "bench": "monitor", "runs": args.runs, "sacct_calls_per_poll": len(queries) / (1 + args.repeat),
        "changed_first_poll": len(first.changed), "parse_sacct_s": round(parse_s, 4),
        "first_poll_s": round(first_poll_s, 4), "steady_poll_s": round(steady_poll_s, 4),
        "snapshot_cached_s": round(snapshot_cached_s, 4), "snapshot_fresh_progress_s": round(snapshot_fresh_s, 4),
        "render_frame_s": round(frame_s, 4), "render_full_table_s": round(full_s, 4),
        "render_compact_s": round(compact_s, 4), "goal_render_s": GOAL_RENDER_S,
        "render_goal_met": frame_s < GOAL_RENDER_S and compact_s < GOAL_RENDER_S,
    }
    print(json.dumps(result))
    print(f"\n| {args.runs} simulated runs | seconds |\n|---|---|")
    for label, key in (("parse one sacct answer", "parse_sacct_s"), ("first poll (every run changes)", "first_poll_s"),
                       ("steady poll (nothing changes)", "steady_poll_s"),
                       ("snapshot, progress files unchanged", "snapshot_cached_s"),
                       ("snapshot, every progress file rewritten", "snapshot_fresh_progress_s"),
                       ("render one live frame (50 lines)", "render_frame_s"),
                       (f"render the full --once table ({args.runs} rows)", "render_full_table_s"),
                       ("render the compact table", "render_compact_s")):
        print(f"| {label} | {result[key]:.4f} |")
    print(f"\nsacct calls per poll: **{result['sacct_calls_per_poll']:.0f}**; live frame render "
          f"**{frame_s * 1000:.0f} ms** (goal < {GOAL_RENDER_S * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    run(main)
