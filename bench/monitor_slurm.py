"""The sweep monitor on the real SLURM dev cluster at a team's scale: poll time, peak memory and scheduler calls
while a sweep of many tiny runs goes from pending to completed, measured in one run.

    python bench/monitor_slurm.py [--runs 120] [--parallel 2] [--interval 2] [--dir DIR]

Needs ``slurm/dev-cluster/start.sh``'s cluster. ``--runs`` width-8 SegResNet runs (one epoch, one 32³ batch, one
validation case of the 48³ phantoms) in two resource sets (``executor.cpus_per_task`` 1 and 2), each an array of
``--parallel`` tasks at a time, are launched by ``sweeps/launch.py`` in a child process, so that this process holds
only the monitor and its peak resident memory is the monitor's. Then :class:`SweepMonitor` polls every
``--interval`` seconds until every run is final. Collecting a run loads its checkpoint (``torch.load``,
``weights_only``: metadata and the finite-weights check), so the monitor imports torch at its first collection;
the table says at which poll, and the resident memory before and after. ``sbatch``, ``sacct`` and
``squeue`` are counted through logging wrappers in front of the real commands (jobs inherit them too).

Prints a JSON line and a Markdown table: runs, arrays and sbatch calls, sacct and squeue calls per poll, poll
seconds (median, 95th percentile, max, and the poll that collected most), peak memory before the first poll and
at the end, and the wall time; every poll's row goes to ``DIR/polls.json``. On a 2-core machine the jobs' own
CPU (imports, ~6 s each) fills the cores while the monitor polls, so poll times here are upper bounds of an idle
login node's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from brats_ugrip.data import make_datalist, save_datalist
from brats_ugrip.slurm.call_log import CallLog, write_wrappers
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.monitoring.engine import PollReport, SweepMonitor
from brats_ugrip.sweeps.state import SweepState
from brats_ugrip.synthetic.phantom import write_phantoms

REPO = Path(__file__).resolve().parents[1]


def write_grid(root: Path, n_runs: int, parallel: int) -> Path:
    """A grid of ``n_runs`` tiny runs in two resource sets on six 48³ phantoms."""
    write_phantoms(root / "phantoms", n_cases=6, size=48, seed=0)
    save_datalist(make_datalist(root / "phantoms", 3, 0), root / "datalist.json")
    grid = {
        "name": "bench_monitor_slurm",
        "base": {"data": {"datalist": str(root / "datalist.json"), "roi_size": [32, 32, 32], "batch_size": 1,
                          "cache_dir": str(root / "cache")},
                 "model": {"name": "segresnet", "init_filters": 8},
                 "trainer": {"max_epochs": 1, "accelerator": "cpu", "limit_train_batches": 1, "limit_val_batches": 1,
                             "cudnn_benchmark": False},
                 "inference": {"sw_batch_size": 1, "overlap": 0.0}, "logging": {"mode": "disabled"}},
        "grid": {"optim.lr": [round(0.0005 * (i + 1), 5) for i in range(-(-n_runs // 2))],
                 "executor.cpus_per_task": [1, 2]},
        "executor": {"cluster": "slurm", "partition": "debug", "cpus_per_task": 1, "time": 20,
                     "array_parallelism": parallel},
    }
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def follow(sweep: Path, log: CallLog, interval_s: float) -> list[dict]:
    """Poll until every run is final; one row per poll: seconds, runs collected, sacct and squeue calls."""
    polls = []
    monitor = SweepMonitor(sweep)
    try:
        while True:
            before = log.count("sacct"), log.count("squeue")
            report: PollReport = monitor.poll()
            runs = monitor.state.runs()
            polls.append({"seconds": report.seconds, "collected": len(report.collected),
                          "sacct": log.count("sacct") - before[0], "squeue": log.count("squeue") - before[1],
                          "final": sum(r.state.is_final for r in runs), "runs": len(runs),
                          "rss_mb": rss_mb(), "torch": "torch" in sys.modules})
            if polls[-1]["final"] == len(runs):
                return polls
            time.sleep(interval_s)
    finally:
        monitor.close()


def measure(root: Path, n_runs: int, parallel: int, interval_s: float) -> dict:
    try:
        log = write_wrappers(root / "wrappers")
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    os.environ["PATH"] = f"{log.path.parent}:{os.environ['PATH']}"  # launch, monitor and jobs go through them
    grid = write_grid(root, n_runs, parallel)
    sweep = root / "sweep"
    started = time.monotonic()
    launched = subprocess.run([sys.executable, str(REPO / "sweeps" / "launch.py"), str(grid), "--sweep-dir",
                               str(sweep), "--no-watch"], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    if launched.returncode != 0:
        raise SystemExit(f"launch failed:\n{launched.stdout}{launched.stderr}")
    rss_before = peak_rss_mb()
    polls = follow(sweep, log, interval_s)
    wall = time.monotonic() - started
    (root / "polls.json").write_text(json.dumps(polls))
    torch_at = next((i for i, p in enumerate(polls) if p["torch"]), None)
    with SweepState(sweep_db_path(sweep)) as state:
        runs = state.runs()
    seconds = sorted(p["seconds"] for p in polls)
    busiest = max(polls, key=lambda p: (p["collected"], p["seconds"]))
    submissions = log.submissions()
    return {
        "runs": len(runs), "completed": sum(r.state.value == "COMPLETED" for r in runs),
        "attempts_max": max(r.attempts for r in runs), "sbatch_submissions": len(submissions),
        "arrays": len({r.submit["parameters"]["cpus_per_task"] for r in runs}),
        "polls": len(polls), "sacct_per_poll_max": max(p["sacct"] for p in polls),
        "sacct_per_poll_min": min(p["sacct"] for p in polls), "squeue_per_poll_max": max(p["squeue"] for p in polls),
        "poll_s_median": statistics.median(seconds), "poll_s_p95": seconds[int(0.95 * (len(seconds) - 1))],
        "poll_s_max": seconds[-1], "busiest_poll_collected": busiest["collected"],
        "busiest_poll_s": busiest["seconds"], "peak_rss_mb_before_polls": rss_before,
        "peak_rss_mb": peak_rss_mb(), "wall_s": wall, "parallel_per_array": parallel, "interval_s": interval_s,
        "torch_from_poll": torch_at,
        "rss_mb_before_torch": polls[torch_at - 1]["rss_mb"] if torch_at else polls[-1]["rss_mb"],
        "rss_mb_end": polls[-1]["rss_mb"],
    }


def markdown(r: dict) -> str:
    rows = [
        ("runs (completed, most attempts)", f"{r['runs']} ({r['completed']}, {r['attempts_max']})"),
        ("resource sets → sbatch calls", f"{r['arrays']} → {r['sbatch_submissions']}"),
        ("polls", r["polls"]),
        ("sacct calls per poll (min–max)", f"{r['sacct_per_poll_min']}–{r['sacct_per_poll_max']}"),
        ("squeue calls per poll (max)", r["squeue_per_poll_max"]),
        ("poll seconds: median / p95 / max", f"{r['poll_s_median']:.3f} / {r['poll_s_p95']:.3f} / "
                                             f"{r['poll_s_max']:.3f}"),
        ("busiest poll: runs collected, seconds", f"{r['busiest_poll_collected']}, {r['busiest_poll_s']:.3f}"),
        ("monitor peak memory: before polls / end (MiB)", f"{r['peak_rss_mb_before_polls']:.0f} / "
                                                          f"{r['peak_rss_mb']:.0f}"),
        ("resident memory: before torch / end (MiB)", f"{r['rss_mb_before_torch']:.0f} / {r['rss_mb_end']:.0f}"),
        ("torch imported from poll (first collection)", r["torch_from_poll"]),
        ("wall, launch to all final (s)", f"{r['wall_s']:.0f}"),
    ]
    return "\n".join(["| sweep on the dev cluster | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=120, help="runs in the grid (two resource sets)")
    parser.add_argument("--parallel", type=int, default=2, help="tasks at a time per array (array_parallelism)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    parser.add_argument("--dir", type=Path, help="working folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        result = measure(args.dir, args.runs, args.parallel, args.interval)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_monitor_slurm_") as folder:
            result = measure(Path(folder), args.runs, args.parallel, args.interval)
    print(json.dumps(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
