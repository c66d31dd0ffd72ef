"""Benchmark: submitting a 120-run grid with one resource request to a real SLURM cluster.

    python bench/sweep_submit.py [--runs 120] [--partition debug] [--no-individual]

Builds a grid of ``--runs`` runs (learning rates × 5 folds) on small phantoms, launches it into a fresh sweep
directory with ``sbatch`` wrapped to count its invocations, and measures expansion + validation and submission.
For comparison it also submits the same runs one job each (what a launcher without job arrays does). Every job is
submitted held (``--hold``) and cancelled right after, so nothing trains. Prints one JSON line and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from brats_ugrip.cli import run
from brats_ugrip.errors import BratsUgripError
from brats_ugrip.sweeps.jobs import SubmitSpec, jobs_folder, submit_runs
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.state import SweepState


def _sbatch_counter(folder: Path) -> Path:
    """An ``sbatch`` placed first on the PATH that logs each call and runs the real one; returns the log."""
    real = shutil.which("sbatch")
    if real is None:
        raise BratsUgripError("sbatch not found: run on a SLURM login node (or start slurm/dev-cluster/start.sh)")
    log = folder / "sbatch_calls.log"
    log.touch()
    shim = folder / "bin" / "sbatch"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/bash\necho "$*" >> {log}\nexec {real} "$@"\n')
    shim.chmod(0o755)
    os.environ["PATH"] = f"{shim.parent}:{os.environ['PATH']}"
    return log


def _calls(log: Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if "--test-only" not in line)


def _cancel(job_ids: set[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *sorted(job_ids)], check=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=120, help="grid size, a multiple of 5 (default 120)")
    parser.add_argument("--partition", default="debug", help="SLURM partition (default debug)")
    parser.add_argument("--no-individual", action="store_true", help="skip the one-job-per-run comparison")
    args = parser.parse_args(argv)
    if args.runs % 5:
        raise BratsUgripError(f"--runs must be a multiple of 5 (5 folds), got {args.runs}")
    from brats_ugrip.data import make_datalist, save_datalist
    from brats_ugrip.sweeps import launch
    from brats_ugrip.synthetic.phantom import write_phantoms

    with tempfile.TemporaryDirectory(prefix="bench-sweep-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        write_phantoms(work / "data", n_cases=10, size=48, seed=0)
        save_datalist(make_datalist(work / "data", 5, 0), work / "datalist.json")
        lrs = [round(1e-4 * (i + 1), 6) for i in range(args.runs // 5)]
        grid = {
            "name": "bench_submit",
            "base": {"data": {"datalist": str(work / "datalist.json"), "roi_size": [32, 32, 32]},
                     "model": {"name": "mednext_b"}, "trainer": {"max_epochs": 1}},
            "grid": {"optim.lr": lrs, "data.fold": [0, 1, 2, 3, 4]},
            "executor": {"cluster": "slurm", "partition": args.partition, "time": 60, "cpus_per_task": 1,
                         "sbatch_args": {"hold": True}},  # held: submitted, never started
        }
        grid_path = work / "grid.yaml"
        grid_path.write_text(yaml.safe_dump(grid))
        log = _sbatch_counter(work)

        started = time.perf_counter()
        plan = launch.plan_launch(grid_path, work / "sweep")
        planned = time.perf_counter()
        arrays = len(plan.groups())
        jobs = launch.submit_plan(plan)
        submitted = time.perf_counter()
        array_calls = _calls(log)
        _cancel({job.job_id.split("_")[0] for job in jobs.values()})
        result = {"runs": len(plan.runs), "arrays": arrays, "sbatch_calls": array_calls,
                  "expand_validate_s": round(planned - started, 3), "submit_s": round(submitted - planned, 3),
                  "launch_s": round(submitted - started, 3)}

        if not args.no_individual:
            spec = SubmitSpec.from_dict(plan.runs[0].submit)
            with SweepState(sweep_db_path(work / "single")) as state:
                state.add_runs(plan.runs)
                before = _calls(log)
                single_started = time.perf_counter()
                single_jobs: set[str] = set()
                try:
                    for record in plan.runs:
                        single_jobs.update(j.job_id for j in submit_runs(state, [record], spec,
                                                                         jobs_folder(work / "single")).values())
                finally:
                    _cancel(single_jobs)
                result.update(individual_sbatch_calls=_calls(log) - before,
                              individual_submit_s=round(time.perf_counter() - single_started, 3))
                result["submit_speedup"] = round(result["individual_submit_s"] / max(result["submit_s"], 1e-9), 1)

    print(json.dumps(result))
    rows = [("runs", result["runs"]), ("job arrays", result["arrays"]), ("sbatch calls (array launch)", array_calls),
            ("expand + validate (s)", result["expand_validate_s"]), ("submit (s)", result["submit_s"]),
            ("launch total (s)", result["launch_s"])]
    if "individual_submit_s" in result:
        rows += [("sbatch calls (one job per run)", result["individual_sbatch_calls"]),
                 ("submit, one job per run (s)", result["individual_submit_s"]),
                 ("submit speed-up of the array", f"{result['submit_speedup']}×")]
    print("\n| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0 if array_calls == 1 else 1


if __name__ == "__main__":
    run(main)
