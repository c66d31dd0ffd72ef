"""SLURM at a team's scale (issue 18), on the real single-node dev cluster: an array of runs filling one shared
data cache, a job that completes while its time-limit signal arrives, a relaunch whose base changed, and job ids
after the controller lost its state while accounting kept the old jobs.

Every run is a width-8 SegResNet on 32³ patches of the 48³ phantoms for one or two epochs on CPU. Runs are
followed with :func:`brats_ugrip.sweeps.monitoring.engine.follow`, the monitor's own code path.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from brats_ugrip.errors import BratsUgripError
from brats_ugrip.preprocess import CACHE_ENV
from brats_ugrip.sweeps import launch
from brats_ugrip.sweeps.jobs import job_result_path
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.monitoring.engine import follow
from brats_ugrip.sweeps.state import RunState, SweepState

pytestmark = pytest.mark.slow
WAIT_S = 600
CACHE_FILES_PER_CASE = 4  # <case>-<key>.image.npy, .regions.npy, .tumour.npy, .json (preprocess.CaseCache)



def _without_cache_dir(grid: Path) -> Path:
    """The grid with ``data.cache_dir`` removed, so that the runs use the default place: ``SWEEP_DIR/cache``."""
    content = yaml.safe_load(grid.read_text())
    del content["base"]["data"]["cache_dir"]
    grid.write_text(yaml.safe_dump(content, sort_keys=False))
    return grid


def _disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_array_fills_one_shared_cache(slurm_cluster, make_grid, slurm_job_dir, slurm_calls, monkeypatch,
                                      phantom_dir):
    """Three runs of one array (three learning rates, all at once) on one datalist read every case: the sweep's
    cache holds one entry per case (4 files each), as one run alone would, and no run has a cache of its own."""
    monkeypatch.delenv(CACHE_ENV, raising=False)  # the jobs inherit the environment: no shared root
    # limit batches off: every run reads all 6 cases (4 training, 2 validation), so every run needs all of them.
    grid = _without_cache_dir(make_grid("cache", {"optim.lr": [0.001, 0.003, 0.01]},
                                        executor={"array_parallelism": 3},
                                        trainer={"max_epochs": 1, "limit_train_batches": None,
                                                 "limit_val_batches": None}))
    sweep = slurm_job_dir / "sweep"
    plan = launch.plan_launch(grid, sweep)
    jobs = launch.submit_plan(plan)
    assert len(slurm_calls.submissions()) == 1 and len({j.job_id.split("_")[0] for j in jobs.values()}) == 1

    final = follow(sweep, poll_s=1.0, timeout_s=WAIT_S)
    assert set(final.values()) == {RunState.COMPLETED} and len(final) == 3, final
    with SweepState(sweep_db_path(sweep)) as state:
        assert all(r.attempts == 1 and r.metrics["epochs"] == 1 for r in state.runs())

    n_cases = len(json.loads((slurm_job_dir / "datalist.json").read_text())["training"])
    assert n_cases == 6
    shared = sweep / "cache"
    entries = sorted(p.name for p in shared.glob("*.json"))
    assert len(entries) == n_cases, entries  # one entry per case, not one per case and run
    assert len({name.rsplit("-", 1)[0] for name in entries}) == n_cases  # <case id>-<key>.json
    files = [p for p in shared.rglob("*") if p.is_file()]
    assert len(files) == n_cases * CACHE_FILES_PER_CASE, sorted(p.name for p in files)
    assert not [p for p in files if p.name.endswith(".tmp")]  # every write published whole
    assert not [run_dir for run_dir in (sweep / "runs").iterdir() if (run_dir / "cache").exists()]
    # what one run needs: the same cases cached by one process into a cache of its own
    from brats_ugrip.data import cases_from_dir
    from brats_ugrip.preprocess import CaseCache

    alone = CaseCache(slurm_job_dir / "one_run_cache")
    for case in cases_from_dir(phantom_dir):
        alone.get(case)
    assert _disk(shared) == _disk(slurm_job_dir / "one_run_cache")
    print(f"\nshared cache: {len(files)} files, {_disk(shared) / 1e6:.2f} MB for 3 runs")


def _wait_for_success_file(path: Path, job_id: str, slurm_cluster, timeout_s: float = WAIT_S) -> float:
    """Poll (every 10 ms) until the job wrote its success result to ``path``; return when that was seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if json.loads(path.read_text())["status"] == "success":
                return time.time()
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        assert time.monotonic() < deadline, f"no success result from job {job_id}: {slurm_cluster.history(job_id)}"
        time.sleep(0.01)


SIGNAL_TRIES = 3


def test_completion_inside_the_signal_window_is_completed_not_retried(slurm_cluster, make_grid, slurm_job_dir,
                                                                      slurm_calls):
    """The job writes its success, then the time limit's USR2 lands while it shuts down (sent with scancel as soon
    as the result file appears, then every 50 ms for a second). The run is COMPLETED in one attempt, never
    resubmitted, whatever sacct recorded (``FAILED 12:0`` when the signal killed the exiting interpreter), and
    the job's log holds no traceback.

    The job lives ~0.1–0.3 s after writing its result: a run whose first signal came too late (the job had
    ended) is checked all the same and the scenario is tried again, up to SIGNAL_TRIES runs.
    """
    delivered = 0
    for attempt in range(1, SIGNAL_TRIES + 1):
        delivered, outcome = _finish_under_usr2(slurm_cluster, make_grid, slurm_job_dir / f"try{attempt}")
        assert len(slurm_calls.submissions()) == attempt  # one sbatch per try: never resubmitted
        print(f"\ntry {attempt}: USR2 delivered {delivered}x; {outcome}")
        if delivered:
            break
    assert delivered >= 1, f"the job had always ended before the first USR2 ({SIGNAL_TRIES} tries)"


def _finish_under_usr2(slurm_cluster, make_grid, sweep: Path) -> tuple[int, str]:
    """One 1-run sweep signalled with USR2 from the moment its job wrote success; checks the run's outcome and
    returns (how many signals scancel delivered, a line on what sacct and the monitor said)."""
    grid = make_grid(f"limit_{sweep.name}", {"optim.lr": [0.003]}, trainer={"max_epochs": 1}, max_retries=2)
    jobs = launch.submit_plan(launch.plan_launch(grid, sweep))
    ((run_id, job),) = jobs.items()
    run_dir = Path(launch.plan_launch(grid, sweep).runs[0].run_dir)

    _wait_for_success_file(job_result_path(run_dir, job.job_id), job.job_id, slurm_cluster)
    delivered = 0
    for _ in range(20):  # ~1 s: the interpreter's exit, submitit's result pickle, the step's end
        answer = subprocess.run(["scancel", "--signal=USR2", job.job_id], capture_output=True, text=True)
        delivered += answer.returncode == 0
        time.sleep(0.05)

    final = follow(sweep, poll_s=1.0, timeout_s=WAIT_S)
    assert final == {run_id: RunState.COMPLETED}
    scheduler_state = slurm_cluster.wait_until_final(job.job_id)
    with SweepState(sweep_db_path(sweep)) as state:
        run = state.get_run(run_id)
        attempts = state.attempts()
    assert run.attempts == 1 and len(attempts) == 1 and attempts[0].job_id == job.job_id
    assert run.metrics["epochs"] == 1 and Path(run.last_checkpoint).is_file()
    if scheduler_state == "COMPLETED":
        assert run.reason is None and attempts[0].state == "COMPLETED"
    else:  # the signal turned the finished job into a failure in sacct: the job's own result wins
        assert run.reason.startswith("completed: the job reported success") and scheduler_state in run.reason
    log = (run_dir / "logs" / f"{job.job_id}.err").read_text()
    assert "Traceback" not in log, log[-3000:]
    return delivered, f"sacct {scheduler_state}; reason: {run.reason}"


def _with_base_file(grid: Path) -> Path:
    """Move the grid's inline base to ``<grid>.base.yaml`` and point the grid at it (``base: <file>``), as a
    user's grid does; returns the base file."""
    content = yaml.safe_load(grid.read_text())
    base = grid.with_suffix(".base.yaml")
    base.write_text(yaml.safe_dump(content["base"], sort_keys=False))
    content["base"] = str(base)
    grid.write_text(yaml.safe_dump(content, sort_keys=False))
    return base


def test_relaunch_with_a_changed_base_refuses_then_new_runs(slurm_cluster, make_grid, slurm_job_dir, slurm_calls):
    """A 2-run grid completes; its base file then changes ``trainer.max_epochs`` (1 → 2). Relaunching refuses,
    naming the key, and submits nothing; with ``--new-runs`` the two changed runs are submitted under new ids
    and complete with the new config, while the old runs stay as they were."""
    grid = make_grid("relaunch", {"optim.lr": [0.001, 0.01]}, trainer={"max_epochs": 1})
    base = _with_base_file(grid)
    sweep = slurm_job_dir / "sweep"
    assert launch.main([str(grid), "--sweep-dir", str(sweep), "--no-watch"]) == 0
    first = follow(sweep, poll_s=1.0, timeout_s=WAIT_S)
    assert first == {"lr=0.001": RunState.COMPLETED, "lr=0.01": RunState.COMPLETED}
    assert len(slurm_calls.submissions()) == 1

    changed = yaml.safe_load(base.read_text())
    changed["trainer"]["max_epochs"] = 2
    base.write_text(yaml.safe_dump(changed, sort_keys=False))  # the grid file itself is unchanged
    with pytest.raises(BratsUgripError, match=r"changes the config of 2 runs") as refused:
        launch.main([str(grid), "--sweep-dir", str(sweep), "--no-watch"])
    assert str(refused.value).count("trainer.max_epochs") == 2, str(refused.value)  # one line per run
    assert len(slurm_calls.submissions()) == 1  # nothing submitted
    with SweepState(sweep_db_path(sweep)) as state:
        assert len(state.runs()) == 2 and len(state.attempts()) == 2

    assert launch.main([str(grid), "--sweep-dir", str(sweep), "--no-watch", "--new-runs"]) == 0
    assert len(slurm_calls.submissions()) == 2  # one array for the two new runs
    final = follow(sweep, poll_s=1.0, timeout_s=WAIT_S)
    assert len(final) == 4 and set(final.values()) == {RunState.COMPLETED}, final
    with SweepState(sweep_db_path(sweep)) as state:
        runs = {r.run_id: r for r in state.runs()}
        new = {run_id: r for run_id, r in runs.items() if run_id not in first}
        assert sorted(run_id.split("-c")[0] for run_id in new) == ["lr=0.001", "lr=0.01"], list(new)
        for run in new.values():
            assert run.config["trainer"]["max_epochs"] == 2 and run.metrics["epochs"] == 2 and run.attempts == 1
            assert Path(run.run_dir).name == run.run_id
        for run_id in first:  # the old runs are untouched: their config, their one attempt, their result
            old = runs[run_id]
            assert old.config["trainer"]["max_epochs"] == 1 and old.metrics["epochs"] == 1 and old.attempts == 1
        assert len({a.job_id.split("_")[0] for a in state.attempts()}) == 2  # two arrays: one per launch



def _queue_empty_for(timeout_s: float) -> bool:
    """Wait until ``squeue`` shows no job at all (anyone's) twice in a row, 2 s apart; False after ``timeout_s``."""
    deadline, empty_before = time.monotonic() + timeout_s, False
    while time.monotonic() < deadline:
        answer = subprocess.run(["squeue", "-h"], capture_output=True, text=True, timeout=30)
        empty = answer.returncode == 0 and not answer.stdout.strip()
        if empty and empty_before:
            return True
        empty_before = empty
        time.sleep(2)
    return False


def _accounting_ids() -> list[int]:
    """Every job id (array tasks: their own raw ids) that accounting holds."""
    out = subprocess.run(["sacct", "-a", "-X", "-n", "-o", "JobIDRaw", "--starttime", "2020-01-01"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [int(word) for word in out.split() if word.isdigit()]


def _stop_controller(pid_file: Path) -> None:
    """SIGTERM the controller named by its pid file, and wait until it has exited (it saves its state then)."""
    pid = int(pid_file.read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return  # a zombie (its parent never reaps): exited
        except FileNotFoundError:
            return
        time.sleep(0.2)
    raise TimeoutError(f"slurmctld ({pid}) still runs 60 s after SIGTERM")


IDLE_WAIT_S = 240


def test_controller_state_reset_gives_ids_past_accounting(slurm_cluster, make_grid, slurm_job_dir):
    """The controller loses its state while accounting keeps the old jobs (issue 18's reused ids): restarted
    through start.sh, it numbers new jobs past accounting's highest id, and the monitor tracks each run of a
    new sweep on its own (its own job, its own result, no old record).

    Stops and restarts the shared dev cluster's slurmctld, so only while ``squeue`` shows no job of anyone;
    skipped when the queue does not empty within a few minutes, or when the cluster is not start.sh's.
    """
    slurm_cluster.own_state_dir()  # skips unless the cluster is start.sh's: never restart someone else's
    state_dir = Path(slurm_cluster.config("StateSaveLocation"))
    pid_file = Path(slurm_cluster.config("SlurmctldPidFile"))
    if not _queue_empty_for(IDLE_WAIT_S):
        pytest.skip(f"the queue never emptied within {IDLE_WAIT_S} s (other jobs use the cluster): the controller "
                    "is restarted only while no job is queued or running")
    highest = max(_accounting_ids(), default=0)
    assert highest > 0, "accounting holds no job yet: no id could be reused"
    if subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
        pytest.skip("a job was submitted just now: the controller is not restarted under it")
    _stop_controller(pid_file)
    for entry in state_dir.iterdir():  # the controller's state only; accounting (slurmdbd, MariaDB) is kept
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    started = slurm_cluster.start()
    assert f"job ids start at {highest + 1}" in started, started

    grid = make_grid("reset", {"optim.lr": [0.001, 0.01]}, trainer={"max_epochs": 1})
    sweep = slurm_job_dir / "sweep"
    jobs = launch.submit_plan(launch.plan_launch(grid, sweep))
    array_id = int(next(iter(jobs.values())).job_id.split("_")[0])
    assert array_id > highest, (array_id, highest)
    final = follow(sweep, poll_s=1.0, timeout_s=WAIT_S)
    assert final == {"lr=0.001": RunState.COMPLETED, "lr=0.01": RunState.COMPLETED}
    with SweepState(sweep_db_path(sweep)) as state:
        attempts = {a.run_id: a for a in state.attempts()}
        assert len(attempts) == 2 and len({a.job_id for a in attempts.values()}) == 2
        for run in state.runs():
            attempt = attempts[run.run_id]
            assert run.attempts == 1 and run.reason is None and run.metrics["epochs"] == 1
            assert attempt.job_id == jobs[run.run_id].job_id and attempt.state == "COMPLETED"
            assert attempt.ended_at >= attempt.started_at >= int(attempt.submitted_at)
            # accounting holds this job id once: no record of an older job with the same id
            assert slurm_cluster.history(attempt.job_id, since=0) == ["COMPLETED"]
    new_ids = sorted(set(_accounting_ids()) - set(range(highest + 1)))
    assert new_ids and min(new_ids) > highest
    print(f"\naccounting's highest id before: {highest}; the new array: {array_id}; new raw ids: {new_ids}")


def test_records_of_an_older_job_under_the_same_id_are_not_ours(slurm_cluster, slurm_job_dir):
    """The monitor's job-state source against live sacct: a job id that accounting holds from a job submitted
    before ours (a reused id) reads as unknown (not yet heard of), never as that old job's final state; asked for
    a submission made before it, the same record is read."""
    from brats_ugrip.sweeps.job_states import SlurmJobStates

    before = time.time()
    old = subprocess.run(["sbatch", "--parsable", "--time=1", f"--output={slurm_job_dir / 'old.out'}", "--wrap",
                          "true"], capture_output=True, text=True, check=True).stdout.strip()
    assert slurm_cluster.wait_until_final(old, timeout_s=120) == "COMPLETED"
    source = SlurmJobStates()
    # a new job given the same id a minute later (well beyond sacct.SUBMIT_CLOCK_SLACK_S, 5 s)
    reused = source.statuses({old: slurm_job_dir}, submitted={old: time.time() + 60})
    assert reused == {}, reused
    ours = source.statuses({old: slurm_job_dir}, submitted={old: before})
    assert ours[old].state == "COMPLETED"
