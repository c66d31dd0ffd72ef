"""Launch a sweep: a grid file → validated runs → submitit job arrays (SLURM) or local processes.

    python sweeps/launch.py experiments/grid_demo_cpu.yaml                 # submit, then watch
    python sweeps/launch.py experiments/grid_ssa_lr_folds.yaml --dry-run   # table of runs and sbatch parameters
    python sweeps/launch.py GRID --sweep-dir outputs/ssa --no-watch

Every run's config is validated first: one bad value fails the launch (run id and key path named) and nothing is
submitted. Runs with the same resources go into one job array (one ``sbatch``). One launcher at a time: planning
and submitting happen under the sweep's lock (the monitor's, ``SWEEP_DIR/.monitor.lock``), so a second launch of
the same grid waits, then finds the runs already submitted and submits nothing. The sweep's state lives in
``SWEEP_DIR/sweep.db``; running the launcher again on the same grid adds only the new runs and never resubmits
runs that are queued, running or finished (retries are the monitor's: ``sweeps/monitor.py SWEEP_DIR --retry``).
After submitting, the launcher becomes the monitor (``sweeps/monitor.py SWEEP_DIR``: the same code, in this
process), which follows, retries and collects the runs; ``--no-watch`` returns at once.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit
from rich.console import Console
from rich.table import Table

from brats_ugrip.atomic import atomic_write_text
from brats_ugrip.cli import console, run
from brats_ugrip.errors import BratsUgripError
from brats_ugrip.sweeps import layout
from brats_ugrip.sweeps.halving import HalvingSchedule
from brats_ugrip.sweeps.jobs import SubmitSpec, jobs_folder, sbatch_test_only, scheduler_available, submit_runs
from brats_ugrip.sweeps.layout import run_dir_path, sweep_db_path
from brats_ugrip.sweeps.monitoring.promotion import set_schedule
from brats_ugrip.sweeps.run_ids import param_tags
from brats_ugrip.sweeps.state import RunRecord, RunState, SweepState
from brats_ugrip.sweeps.throttle import free_slots, set_cap

if TYPE_CHECKING:
    from brats_ugrip.sweeps.grid import Run

DEFAULT_SWEEPS_ROOT = Path("outputs")


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
    changed: dict[str, list[str]] = field(default_factory=dict)
    """Runs already in the sweep whose resolved config the grid now changes: run id → changed key paths."""
    schedule: HalvingSchedule | None = None
    max_running: int | None = None
    """The sweep-wide cap on runs in flight (sweeps/throttle.py); None: no cap."""

    @property
    def to_submit(self) -> list[RunRecord]:
        """New runs and runs recorded but never accepted by a scheduler (PENDING)."""
        return [r for r in self.runs if self.existing.get(r.run_id, RunState.PENDING) == RunState.PENDING]

    def groups(self, limit: int | None = None) -> list[SubmitGroup]:
        """The runs to submit (the first ``limit`` of them), grouped by resource request (in grid order)."""
        groups: dict[str, SubmitGroup] = {}
        for record in self.to_submit[:limit]:
            spec = SubmitSpec.from_dict(record.submit)
            groups.setdefault(spec.key, SubmitGroup(spec)).runs.append(record)
        return list(groups.values())


def plan_launch(grid_path: str | os.PathLike[str], sweep_dir: str | os.PathLike[str] | None = None) -> LaunchPlan:
    """Expand and validate a grid and compare it with the sweep's database (read only: nothing is written)."""
    from brats_ugrip.sweeps.grid import ParameterManager  # imports the model registry (slow): only when a grid is read

    manager = ParameterManager.from_file(grid_path)
    runs = manager.runs()
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else DEFAULT_SWEEPS_ROOT / manager.name
    records = []
    first_stop = {"stop_at_epoch": manager.schedule.rungs[0]} if manager.schedule else {}  # sweeps/monitoring/promotion.py
    for run_ in runs:
        run_dir = run_dir_path(sweep_dir, run_.run_id).resolve()
        config = run_.config_dict
        config["run_dir"] = str(run_dir)
        _tracking(config["logging"], manager.name, run_)
        records.append(RunRecord(run_id=run_.run_id, config=config, params=run_.params, run_dir=str(run_dir),
                                 submit={**run_.executor.submit_spec(manager.name).to_dict(), **first_stop},
                                 max_retries=manager.max_retries))
    existing: dict[str, RunState] = {}
    changed: dict[str, list[str]] = {}
    db_path = sweep_db_path(sweep_dir)
    if db_path.is_file():
        with SweepState(db_path) as state:
            stored = {r.run_id: r for r in state.runs()}
        existing = {run_id: r.state for run_id, r in stored.items()}
        for record in records:
            old = stored.get(record.run_id)
            if old is not None and old.config_hash != record.config_hash:
                changed[record.run_id] = changed_keys(old.config, record.config)
    warnings = list(manager.warnings)
    arrays = {SubmitSpec.from_dict(r.submit).key for r in records}
    if len(arrays) > 1 and any(r.submit.get("parameters", {}).get("array_parallelism") for r in records):
        warnings.append(f"executor.array_parallelism caps each job array; this grid makes {len(arrays)} arrays "
                        "(its executor.* values differ), so up to that many times the cap run at once")
    return LaunchPlan(manager.name, Path(grid_path), sweep_dir, records, manager.varied_keys, existing,
                      warnings, changed, manager.schedule,
                      manager.max_running)


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted key paths whose values differ between two resolved configs (``run_dir`` and ``logging`` aside, as
    in the config hash)."""
    from brats_ugrip.config import HASH_EXCLUDED, _flatten

    flat_old, flat_new = (_flatten({k: v for k, v in c.items() if k not in HASH_EXCLUDED}) for c in (old, new))
    return sorted(k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k))


def resolve_changes(plan: LaunchPlan, *, force: bool = False, new_runs: bool = False) -> None:
    """A relaunch that changes existing runs' configs: refuse (listing the changed keys), or with ``new_runs`` add
    the changed runs under new ids (``<id>-c<config hash>``), or with ``force`` replace their configs (runs still
    queued or running are refused: cancel them first).

    Raises:
        BratsUgripError: runs changed and neither option was given, or ``force`` on an active run.
    """
    if not plan.changed:
        return
    lines = [f"  {run_id}: {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}"
             for run_id, keys in plan.changed.items()]
    if new_runs:
        for record in plan.runs:
            if record.run_id in plan.changed:
                record.run_id = f"{record.run_id}-c{record.config_hash[:6]}"
                record.run_dir = str(run_dir_path(plan.sweep_dir, record.run_id).resolve())
                record.config["run_dir"] = record.run_dir
        plan.changed = {}
        return
    if not force:
        raise BratsUgripError(f"{plan.grid_path}: the grid changes the config of {len(plan.changed)} runs already in "
                              f"{plan.sweep_dir}:\n" + "\n".join(lines) + "\nlaunch with --new-runs to add them "
                              "as new runs (new ids), --force to replace their configs, or use a new --sweep-dir")
    active = [run_id for run_id in plan.changed if plan.existing.get(run_id, RunState.PENDING).is_active]
    if active:
        raise BratsUgripError(f"--force: runs {', '.join(active)} are queued or running; cancel them first "
                              f"(monitor.py {plan.sweep_dir} --cancel RUN_ID)")


def _tracking(logging: dict[str, Any], sweep_name: str, run_: Run) -> None:
    """What W&B groups and filters a sweep's runs by (``logging`` is excluded from the config hash, so these never
    change a run's identity): name = the run id, group = the sweep, tags = the varied ``key=value``, varied = the
    varied keys. Values the grid sets itself are kept."""
    logging["run_name"] = logging.get("run_name") or run_.run_id
    logging["group"] = logging.get("group") or sweep_name
    logging["tags"] = [*logging.get("tags", []), *param_tags(run_.params)]
    logging["varied"] = list(run_.params)


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
    from brats_ugrip.sweeps.run_ids import short_keys

    names = short_keys(plan.varied_keys)
    groups = plan.groups()
    group_of = {r.run_id: i + 1 for i, g in enumerate(groups) for r in g.runs}
    table = Table(title=f"sweep {plan.name}: {len(plan.runs)} runs → {plan.sweep_dir}")
    table.add_column("#", justify="right")
    table.add_column("run id", overflow="fold")  # a narrow terminal folds an id onto two lines, never cuts it
    for key in plan.varied_keys:
        table.add_column(names[key], no_wrap=True)
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
    if plan.max_running is not None:
        active = sum(state.is_active for state in plan.existing.values())
        now = min(len(plan.to_submit), max(0, plan.max_running - active))
        out.print(f"max_running {plan.max_running}: {now} runs submitted now, {len(plan.to_submit) - now} released by "
                  "the monitor as runs end")
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


def submit_plan(plan: LaunchPlan, on_wait: Callable[[str], None] | None = None,
                take_over: bool = False) -> dict[str, submitit.Job]:
    """Record the grid's runs in ``sweep.db`` and submit the new ones (one array per resource request), holding
    the sweep's lock: what is submitted is decided from ``sweep.db`` as it is once the lock is held."""
    from brats_ugrip.sweeps.lock import SweepLock  # the monitor's lock: one actor per sweep

    ensure_writable(plan.sweep_dir)
    if any(not scheduler_available(g.spec.cluster) for g in plan.groups()):
        raise BratsUgripError(f"{plan.grid_path}: executor.cluster is slurm but `sbatch` is not on the PATH; "
                              "run on the cluster's login node, or set executor.cluster: local")
    with SweepLock(layout.lock_path(plan.sweep_dir), on_wait=on_wait).hold():
        return _submit_locked(plan, take_over)


def _submit_locked(plan: LaunchPlan, take_over: bool) -> dict[str, submitit.Job]:
    state = SweepState(sweep_db_path(plan.sweep_dir))
    try:
        state.claim_owner(take_over)
        with state.transaction():
            for record in plan.runs:  # --force: changed runs start again, in a fresh run directory
                if record.run_id in plan.changed and state.has_run(record.run_id):
                    _set_aside(Path(record.run_dir))
                    state.replace_config(record)
            state.add_runs(plan.runs)
            for record in plan.runs:  # runs never accepted by a scheduler take the grid's current resources
                if state.get_run(record.run_id).state == RunState.PENDING:
                    state.update_run(record.run_id, submit=record.submit, max_retries=record.max_retries)
            state.set_meta("name", plan.name)
            state.set_meta("grid", str(plan.grid_path.resolve()))
            set_schedule(state, plan.schedule)
            set_cap(state, plan.max_running)
        atomic_write_text(plan.sweep_dir / "grid.yaml", plan.grid_path.read_text())
        plan.existing = {r.run_id: r.state for r in state.runs()}
        groups = plan.groups(limit=free_slots(state, plan.max_running))  # the rest wait for the monitor
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


def _set_aside(run_dir: Path) -> None:
    """Move a replaced run's directory to ``<run_dir>.replaced-<time>`` (its checkpoints belong to the old config)."""
    if run_dir.exists():
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="grid YAML (see sweeps/grid.py for its keys)")
    parser.add_argument("--sweep-dir", type=Path, help=f"sweep directory (default {DEFAULT_SWEEPS_ROOT}/<grid name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and sbatch parameters; submit nothing")
    parser.add_argument("--no-watch", action="store_true", help="return after submitting (no monitor, no waiting)")
    changes = parser.add_mutually_exclusive_group()
    changes.add_argument("--new-runs", action="store_true",
                         help="runs whose config the grid changed are added as new runs (new ids); the old ones stay")
    changes.add_argument("--force", action="store_true",
                         help="runs whose config the grid changed get the new config and start again (their old "
                              "run directories are moved aside)")
    parser.add_argument("--take-over", action="store_true",
                        help="launch into a sweep owned by another host (stop that host's monitor first)")
    args = parser.parse_args(argv)
    out = Console()
    plan = plan_launch(args.grid, args.sweep_dir)
    resolve_changes(plan, force=args.force, new_runs=args.new_runs)
    if args.dry_run:
        print_plan(plan, out)
        return 0
    for message in plan.warnings:
        console.print(f"[yellow]warning:[/] {message}")
    jobs = submit_plan(plan, on_wait=lambda message: console.print(f"[yellow]{message}[/]"), take_over=args.take_over)
    already = len(plan.runs) - len(jobs)
    job_ids = sorted({job.job_id.split("_")[0] for job in jobs.values()})
    out.print(f"sweep {plan.name}: {len(jobs)} runs submitted"
              + (f" (jobs {', '.join(job_ids)})" if job_ids else "")
              + (f", {already} already in the sweep" if already else "") + f" → {plan.sweep_dir}")
    if args.no_watch:
        return 0
    # Watching is the monitor's job (what `python sweeps/monitor.py SWEEP_DIR` runs): it follows the jobs, retries
    # and resumes them, and collects the results.
    from brats_ugrip.sweeps.monitor import PLAIN_WIDTH, watch
    from brats_ugrip.sweeps.monitoring.dashboard import ViewOptions
    from brats_ugrip.sweeps.monitoring.engine import SweepMonitor

    monitor = SweepMonitor(plan.sweep_dir, take_over=args.take_over)
    try:
        return watch(monitor, ViewOptions(), 15.0, Console(width=None if out.is_terminal else PLAIN_WIDTH))
    finally:
        monitor.close()


if __name__ == "__main__":
    run(main)
