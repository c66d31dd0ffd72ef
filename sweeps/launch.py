"""Launch a sweep: a grid file → validated runs → submitit job arrays (SLURM) or local processes.

    python sweeps/launch.py experiments/grid_demo_cpu.yaml                 # submit, then watch
    python sweeps/launch.py experiments/grid_ssa_lr_folds.yaml --dry-run   # table of runs and sbatch parameters
    python sweeps/launch.py GRID --sweep-dir outputs/ssa --no-watch

Every run's config is validated first: one bad value fails the launch (run id and key path named) and nothing is
submitted. Runs with the same resources go into one job array (one ``sbatch``). The sweep's state lives in
``SWEEP_DIR/sweep.db``; running the launcher again on the same grid adds only the new runs and never resubmits
runs that are queued, running or finished (retries are the monitor's: ``slurm/monitor.py SWEEP_DIR --retry``).
After submitting, the launcher starts the monitor (``slurm/monitor.py SWEEP_DIR``) when it is installed, or else
waits for the runs with a progress bar; ``--no-watch`` returns at once.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from rich.console import Console
from rich.table import Table

from brats_ugrip.atomic import atomic_write_text
from brats_ugrip.cli import console, progress_bar, run
from brats_ugrip.errors import BratsUgripError
from brats_ugrip.jobs import (SubmitSpec, error_tail, jobs_folder, read_job_info, sbatch_test_only,
                              scheduler_available, submit_runs)
from brats_ugrip.sweep_state import RunRecord, RunState, SweepState, run_dir_path, sweep_db_path

REPO_ROOT = Path(__file__).resolve().parents[1]
MONITOR = REPO_ROOT / "slurm" / "monitor.py"
DEFAULT_SWEEPS_ROOT = Path("outputs")
_UNFINISHED_SLURM = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED",
                     "PREEMPTED", "REQUEUE_HOLD", "REQUEUE_FED", "UNKNOWN", "READY", ""}


@dataclass
class SubmitGroup:
    """Runs with one resource request: one job array."""

    spec: SubmitSpec
    runs: list[RunRecord] = field(default_factory=list)


@dataclass
class LaunchPlan:
    """What a launch would do: every run of the grid, the state of those already in the sweep, the arrays."""

    name: str
    grid_path: Path
    sweep_dir: Path
    runs: list[RunRecord]
    varied_keys: list[str]
    existing: dict[str, RunState]
    warnings: list[str]

    @property
    def to_submit(self) -> list[RunRecord]:
        """New runs and runs recorded but never accepted by a scheduler (PENDING)."""
        return [r for r in self.runs if self.existing.get(r.run_id, RunState.PENDING) == RunState.PENDING]

    def groups(self) -> list[SubmitGroup]:
        """The runs to submit, grouped by resource request (in grid order)."""
        groups: dict[str, SubmitGroup] = {}
        for record in self.to_submit:
            spec = SubmitSpec.from_dict(record.submit)
            groups.setdefault(spec.key, SubmitGroup(spec)).runs.append(record)
        return list(groups.values())


def plan_launch(grid_path: str | os.PathLike[str], sweep_dir: str | os.PathLike[str] | None = None) -> LaunchPlan:
    """Expand and validate a grid and compare it with the sweep's database (read only: nothing is written)."""
    from sweeps.grid import ParameterManager  # imports the model registry (slow): only when a grid is read

    manager = ParameterManager.from_file(grid_path)
    runs = manager.runs()
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else DEFAULT_SWEEPS_ROOT / manager.name
    records = []
    for run_ in runs:
        run_dir = run_dir_path(sweep_dir, run_.run_id).resolve()
        config = run_.config_dict
        config["run_dir"] = str(run_dir)
        config["logging"]["run_name"] = config["logging"].get("run_name") or f"{manager.name}/{run_.run_id}"
        records.append(RunRecord(run_id=run_.run_id, config=config, params=run_.params, run_dir=str(run_dir),
                                 submit=run_.executor.submit_spec(manager.name).to_dict(),
                                 max_retries=manager.max_retries))
    existing: dict[str, RunState] = {}
    db_path = sweep_db_path(sweep_dir)
    if db_path.is_file():
        with SweepState(db_path) as state:
            existing = {r.run_id: r.state for r in state.runs()}
    return LaunchPlan(manager.name, Path(grid_path), sweep_dir, records, manager.varied_keys, existing,
                      list(manager.warnings))


def ensure_writable(sweep_dir: Path) -> None:
    """Create the sweep directory and check that files can be written in it."""
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=sweep_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        raise BratsUgripError(f"{sweep_dir}: cannot write the sweep directory ({error.strerror or error}); "
                              "choose a writable one with --sweep-dir") from error


def print_plan(plan: LaunchPlan, out: Console) -> None:
    """The table of runs and, per array, the sbatch parameters (or the local executor's)."""
    from brats_ugrip.run_ids import short_keys

    names = short_keys(plan.varied_keys)
    groups = plan.groups()
    group_of = {r.run_id: i + 1 for i, g in enumerate(groups) for r in g.runs}
    table = Table(title=f"sweep {plan.name}: {len(plan.runs)} runs → {plan.sweep_dir}")
    table.add_column("#", justify="right")
    table.add_column("run id")
    for key in plan.varied_keys:
        table.add_column(names[key])
    table.add_column("state")
    table.add_column("array", justify="right")
    for i, record in enumerate(plan.runs, 1):
        existing = plan.existing.get(record.run_id)
        state = "new" if existing is None else existing.value
        table.add_row(str(i), record.run_id, *(str(record.params[k]) for k in plan.varied_keys), state,
                      str(group_of.get(record.run_id, "–")))
    out.print(table)
    for message in plan.warnings:
        out.print(f"[yellow]warning:[/] {message}")
    if not groups:
        out.print("nothing to submit: every run is already in the sweep")
        return
    folder = jobs_folder(plan.sweep_dir)
    for i, group in enumerate(groups, 1):
        spec = group.spec
        out.print(f"\n[bold]array {i}[/]: {len(group.runs)} runs, {spec.cluster} executor, "
                  f"max_num_timeout={spec.max_num_timeout}")
        if spec.cluster == "slurm":
            script = spec.sbatch_script(folder, len(group.runs) if len(group.runs) > 1 else None)
            out.print("\n".join(line for line in script.splitlines() if line.startswith("#SBATCH")), highlight=False)
            setup = spec.parameters.get("setup")
            if setup:
                out.print("setup:\n  " + "\n  ".join(setup), highlight=False)
        else:
            out.print(f"local processes, {spec.local_slots} training at a time; "
                      + ", ".join(f"{k}={v}" for k, v in spec.parameters.items()), highlight=False)


def submit_plan(plan: LaunchPlan) -> dict[str, submitit.Job]:
    """Record the grid's runs in ``sweep.db`` and submit the new ones (one array per resource request)."""
    ensure_writable(plan.sweep_dir)
    if any(not scheduler_available(g.spec.cluster) for g in plan.groups()):
        raise BratsUgripError(f"{plan.grid_path}: executor.cluster is slurm but `sbatch` is not on the PATH; "
                              "run on the cluster's login node, or set executor.cluster: local")
    state = SweepState(sweep_db_path(plan.sweep_dir))
    try:
        with state.transaction():
            state.add_runs(plan.runs)
            for record in plan.runs:  # runs never accepted by a scheduler take the grid's current resources
                if state.get_run(record.run_id).state == RunState.PENDING:
                    state.update_run(record.run_id, submit=record.submit, max_retries=record.max_retries)
            state.set_meta("name", plan.name)
            state.set_meta("grid", str(plan.grid_path.resolve()))
        atomic_write_text(plan.sweep_dir / "grid.yaml", plan.grid_path.read_text())
        plan.existing = {r.run_id: r.state for r in state.runs()}
        groups = plan.groups()
        folder = jobs_folder(plan.sweep_dir)
        slurm_groups = [g for g in groups if g.spec.cluster == "slurm"]
        if len(slurm_groups) > 1:  # check every array first, so that a refused one leaves none half-submitted
            for group in slurm_groups:
                sbatch_test_only(group.spec, folder, len(group.runs))
        jobs: dict[str, submitit.Job] = {}
        for group in groups:
            jobs.update(submit_runs(state, group.runs, group.spec, folder))
        return jobs
    finally:
        state.close()


def _scheduler_state(job: submitit.Job) -> tuple[str, str | None, bool]:
    """(state, node, finished) of a job: sacct's word from submitit's batched cache for SLURM ("CANCELLED by 0"
    → "CANCELLED"), the controller process for a local job."""
    if isinstance(job, submitit.SlurmJob):
        info = job.watcher.get_info(job.job_id, mode="cache")
        state = (info.get("State") or "").split(" ")[0]
        node = info.get("NodeList")
        return state, (None if node in (None, "", "None assigned") else node), state not in _UNFINISHED_SLURM
    state = job.state  # RUNNING, FINISHED or INTERRUPTED (killed by a signal)
    return ("CANCELLED" if state == "INTERRUPTED" else state), None, state != "RUNNING"


class SweepWaiter:
    """Follows the jobs of one launch until they end, keeping ``sweep.db`` up to date (the monitor does this, and
    retries, when it is installed). One ``sacct`` call per poll for all SLURM jobs."""

    RESULT_GRACE_S = 60.0  # how long a result file and sacct may disagree (file system or accounting lag)

    def __init__(self, state: SweepState, jobs: dict[str, submitit.Job], poll_s: float = 2.0):
        self.state = state
        self.jobs = dict(jobs)
        self.poll_s = poll_s
        self._disagreeing_since: dict[str, float] = {}

    def poll(self) -> list[str]:
        """Refresh every unfinished run once; returns the ids of runs that ended in this poll."""
        slurm_jobs = [j for j in self.jobs.values() if isinstance(j, submitit.SlurmJob)]
        if slurm_jobs:
            slurm_jobs[0].watcher.update()  # one sacct for all registered jobs
        ended = []
        latest = self.state.latest_attempts()
        for run_id, job in list(self.jobs.items()):
            attempt = latest.get(run_id)
            if attempt is None or attempt.job_id != job.job_id:
                del self.jobs[run_id]  # resubmitted by someone else (the monitor): theirs to follow
                continue
            if self._observe(run_id, attempt.attempt, job):
                ended.append(run_id)
                del self.jobs[run_id]
        return ended

    def wait(self, show_progress: bool = True, timeout_s: float | None = None) -> dict[str, RunState]:
        """Poll until every job ended; returns the final state of each run.

        Raises:
            TimeoutError: ``timeout_s`` passed with runs unfinished (they keep running).
        """
        total = len(self.jobs)
        final: dict[str, RunState] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with progress_bar() if show_progress else _NoProgress() as bar:
            task = bar.add_task(f"{total} runs", total=total)
            while self.jobs:
                for run_id in self.poll():
                    final[run_id] = self.state.get_run(run_id).state
                    bar.advance(task)
                counts = self.state.counts()
                bar.update(task, description=" ".join(f"{s.value.lower()} {n}" for s, n in counts.items()))
                if self.jobs:
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"runs unfinished after {timeout_s:.0f} s: {sorted(self.jobs)}")
                    time.sleep(self.poll_s)
        return final

    def _observe(self, run_id: str, attempt: int, job: submitit.Job) -> bool:
        """Record what ``job`` is doing now; True once it has ended (and its end is recorded)."""
        scheduler_state, node, finished = _scheduler_state(job)
        result_path = job.paths.result_pickle
        if not finished and not result_path.exists():
            run = self.state.get_run(run_id)
            info = read_job_info(run.run_dir) or {}
            started = str(info.get("job_id")) == str(job.job_id)
            if scheduler_state == "REQUEUED" or (scheduler_state == "PENDING" and run.state == RunState.RUNNING):
                self._set(run_id, attempt, RunState.REQUEUED, "REQUEUED", node)
            elif scheduler_state == "RUNNING" or (started and run.state != RunState.REQUEUED):
                self._set(run_id, attempt, RunState.RUNNING, "RUNNING", node or info.get("node"),
                          started_at=info.get("started_at") if started else None)
            return False
        outcome = submitit.core.utils.pickle_load(result_path) if result_path.exists() else None
        if outcome is not None and outcome[0] == "success":
            self._finish(run_id, attempt, RunState.COMPLETED, "COMPLETED", job, node, result=outcome[1])
            return True
        lagging = not finished if outcome is not None else scheduler_state == "COMPLETED"
        if isinstance(job, submitit.SlurmJob) and lagging:
            # A result without sacct's final word, or a clean end without a result yet: give the slower a moment.
            since = self._disagreeing_since.setdefault(run_id, time.monotonic())
            if time.monotonic() - since < self.RESULT_GRACE_S:
                return False
        word = scheduler_state if finished else "FAILED"
        if word in ("COMPLETED", "FINISHED", ""):  # the job's process ended cleanly but its function raised
            word = "FAILED"
        run_state = {"CANCELLED": RunState.CANCELLED, "TIMEOUT": RunState.TIMEOUT}.get(word, RunState.FAILED)
        if outcome is not None:
            reason = _exception_text(str(outcome[1]))
        else:
            reason = f"{word}: the job ended without a result"
        self._finish(run_id, attempt, run_state, word, job, node, result=None, reason=reason[-1000:])
        return True

    def _set(self, run_id: str, attempt: int, run_state: RunState, job_state: str, node: str | None,
             started_at: float | None = None) -> None:
        record = self.state.get_run(run_id)
        if record.state == run_state:
            return
        fields: dict[str, Any] = {"state": job_state}
        if node:
            fields["node"] = node
        if run_state == RunState.RUNNING:
            fields["started_at"] = started_at or time.time()
        with self.state.transaction():
            self.state.update_attempt(run_id, attempt, **fields)
            run_fields: dict[str, Any] = {"state": run_state}
            if run_state == RunState.RUNNING and record.started_at is None:
                run_fields["started_at"] = fields["started_at"]
            self.state.update_run(run_id, **run_fields)

    def _finish(self, run_id: str, attempt: int, run_state: RunState, job_state: str, job: submitit.Job,
                node: str | None, result: dict[str, Any] | None, reason: str | None = None) -> None:
        record = self.state.get_run(run_id)
        now = time.time()
        checkpoints = Path(record.run_dir) / "checkpoints"
        best, last = checkpoints / "best.ckpt", checkpoints / "last.ckpt"
        tail = None if run_state == RunState.COMPLETED else error_tail(job.paths.stderr)
        with self.state.transaction():
            self.state.update_attempt(run_id, attempt, state=job_state, ended_at=now, error_tail=tail,
                                      **({"node": node} if node else {}))
            self.state.update_run(run_id, state=run_state, ended_at=now, reason=reason,
                                  metrics=_metrics(result) if result else record.metrics,
                                  best_checkpoint=str(best) if best.is_file() else record.best_checkpoint,
                                  last_checkpoint=str(last) if last.is_file() else record.last_checkpoint)


def _exception_text(traceback_text: str) -> str:
    """The exception at the end of a formatted traceback (what follows its last frame), on one line."""
    lines = traceback_text.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    start = frames[-1] + 1 if frames else 0
    while start < len(lines) and lines[start].startswith(" "):  # the frame's code line and its ^^^ markers
        start += 1
    return " ".join(line.strip() for line in lines[start:] if line.strip()) or (lines[-1] if lines else "")


def _metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of what ``train`` returned (numbers, strings, and nested dicts of them)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items() if plain(v) is not None}
        if isinstance(value, (bool, int, float, str)):
            return value
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            return value.item()
        return str(value) if isinstance(value, Path) else None

    return plain(result)


class _NoProgress:
    """A stand-in for the progress bar when output is not wanted."""

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def advance(self, *args: Any, **kwargs: Any) -> None:
        return None

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


def print_summary(state: SweepState, out: Console) -> None:
    """One row per run: state, attempts, latest job id and final metrics."""
    table = Table(title="runs")
    for column in ("run id", "state", "attempts", "job", "metrics"):
        table.add_column(column)
    latest = state.latest_attempts()
    for record in state.runs():
        attempt = latest.get(record.run_id)
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in record.metrics.items() if not isinstance(v, dict))
        table.add_row(record.run_id, record.state.value, str(record.attempts), attempt.job_id if attempt else "–",
                      metrics[:80])
    out.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="grid YAML (see sweeps/grid.py for its keys)")
    parser.add_argument("--sweep-dir", type=Path, help=f"sweep directory (default {DEFAULT_SWEEPS_ROOT}/<grid name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and sbatch parameters; submit nothing")
    parser.add_argument("--no-watch", action="store_true", help="return after submitting (no monitor, no waiting)")
    args = parser.parse_args(argv)
    out = Console()
    plan = plan_launch(args.grid, args.sweep_dir)
    if args.dry_run:
        print_plan(plan, out)
        return 0
    for message in plan.warnings:
        console.print(f"[yellow]warning:[/] {message}")
    jobs = submit_plan(plan)
    already = len(plan.runs) - len(jobs)
    job_ids = sorted({job.job_id.split("_")[0] for job in jobs.values()})
    out.print(f"sweep {plan.name}: {len(jobs)} runs submitted"
              + (f" (jobs {', '.join(job_ids)})" if job_ids else "")
              + (f", {already} already in the sweep" if already else "") + f" → {plan.sweep_dir}")
    if args.no_watch:
        return 0
    if MONITOR.is_file():
        return subprocess.call([sys.executable, str(MONITOR), str(plan.sweep_dir)])
    with SweepState(sweep_db_path(plan.sweep_dir)) as state:
        if jobs:
            SweepWaiter(state, jobs).wait()
        print_summary(state, out)
        failed = [r.run_id for r in state.runs() if r.state in (RunState.FAILED, RunState.CANCELLED, RunState.TIMEOUT)]
    return 1 if failed else 0


if __name__ == "__main__":
    run(main)
