"""Faults a sweep meets in its first week on a shared cluster (issue 29), injected into a running sweep of tiny
runs on the real single-node dev cluster: accounting (slurmdbd) down while runs finish and while a sweep is
launched, the controller and the monitor SIGKILLed, the node set DOWN (and the monitor SIGKILLed during it), one
array task cancelled from outside while running and one before it started, pending tasks held then released, a
job killed as for memory, and a sweep of 120 runs (one sbatch per resource set, one sacct per poll).

Every test also checks the same three things (:func:`_assert_sweep_sound`): no run submitted twice (the jobs
submitit's folder holds are exactly the recorded attempts, one job id each), no completed epoch trained again
(every start of a run's job resumes at or after the epochs its earlier starts finished, read from ``job.json``),
and nothing collected lost (every completed run's checkpoint verified in ``models/`` and its row in
``results.csv``).

The tests that stop a daemon do so only on ``slurm/dev-cluster/start.sh``'s cluster (``/etc/slurm/slurm.conf`` is
its symlink) and start it again with that script; they skip elsewhere.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from brats_ugrip.checkpoints import checkpoint_meta, load_checkpoint
from brats_ugrip.errors import CheckpointError
from brats_ugrip.sweeps import launch
from brats_ugrip.sweeps.jobs import read_job_info, read_job_result
from brats_ugrip.sweeps.layout import last_checkpoint, sweep_db_path
from brats_ugrip.sweeps.monitoring.collect import verify_collected
from brats_ugrip.sweeps.monitoring.engine import SweepMonitor, follow
from brats_ugrip.sweeps.monitoring.snapshot import AWAITING_ACCOUNTING
from brats_ugrip.sweeps.state import RunState, SweepState

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
WAIT_S = 300


# --- helpers ------------------------------------------------------------------------------------------------



def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _kill_daemon(cluster, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
    """Kill a daemon of start.sh's cluster by the pid in its pid file and wait until it is gone (or a zombie)."""
    pid = int((cluster.own_state_dir() / "run" / f"{name}.pid").read_text().strip())
    os.kill(pid, sig)
    deadline = time.monotonic() + 60
    while _alive(pid):
        assert time.monotonic() < deadline, f"{name} ({pid}) still runs 60 s after {sig.name}"
        time.sleep(0.2)


def _monitor_cli(sweep: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    answer = subprocess.run([sys.executable, str(REPO / "sweeps" / "monitor.py"), str(sweep), *args],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    return answer.stdout


def _epochs_in(checkpoint: Path) -> int:
    """Epochs held by a checkpoint (0 while there is none or it is being replaced)."""
    try:
        return int(checkpoint_meta(load_checkpoint(checkpoint, mmap=True), checkpoint)["epoch"])
    except (CheckpointError, OSError, KeyError):
        return 0


def _wait(condition, what: str, timeout_s: float = WAIT_S, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s:.0f} s"
        time.sleep(poll_s)
    return value


def _assert_sweep_sound(sweep: Path) -> None:
    """No run submitted twice, no completed epoch trained again, nothing collected lost (see the docstring)."""
    with SweepState(sweep_db_path(sweep)) as state:
        runs, attempts = state.runs(), state.attempts()
    submitted = {p.name.removesuffix("_submitted.pkl") for p in (sweep / "jobs").glob("*/*_submitted.pkl")}
    job_ids = [a.job_id for a in attempts]
    assert sorted(submitted) == sorted(job_ids) and len(set(job_ids)) == len(job_ids), (submitted, job_ids)
    for run in runs:
        assert [a.attempt for a in attempts if a.run_id == run.run_id] == list(range(1, run.attempts + 1))
        starts = (read_job_info(run.run_dir) or {}).get("starts", [])
        resumed_at = [start["start_epoch"] for start in starts]
        assert resumed_at == sorted(resumed_at), (run.run_id, starts)  # never back to an earlier epoch
    results = pd.read_csv(sweep / "results.csv").set_index("run_id")
    for run in runs:
        if run.state == RunState.COMPLETED:
            assert verify_collected(sweep, run.run_id), run.run_id
            assert results.loc[run.run_id, "state"] == "COMPLETED"
            assert pd.notna(results.loc[run.run_id, "dice_mean"]), run.run_id


def _job_succeeded(state: SweepState, run_id: str) -> bool:
    run, attempt = state.get_run(run_id), state.latest_attempt(run_id)
    outcome = read_job_result(run.run_dir, attempt.job_id, attempt.attempt)
    return outcome is not None and outcome.succeeded


# --- 1. accounting down ---------------------------------------------------------------------------------------


def test_accounting_down_shows_finished_runs_then_concludes(slurm_cluster, make_grid, slurm_job_dir, slurm_calls):
    """slurmdbd is killed before a 2-run sweep is launched and stays down while both runs finish. The monitor
    concludes nothing (both runs keep their submitted state, nothing is resubmitted), and ``--once``/``--json``
    show what the run files prove: both "finished, awaiting accounting", and "accounting unavailable since HH:MM"
    once, HH:MM being the first failed poll's minute, kept by later polls. Once slurmdbd is back the next polls
    conclude both COMPLETED in one attempt and collect them, and the outage line is gone."""
    slurm_cluster.own_state_dir()
    grid = make_grid("dbd_down", {"optim.lr": [0.001, 0.01]})
    sweep = slurm_job_dir / "sweep"
    _kill_daemon(slurm_cluster, "slurmdbd")
    try:
        assert subprocess.run(["sacct", "-n", "-X"], capture_output=True, timeout=60).returncode != 0  # no answer
        jobs = launch.submit_plan(launch.plan_launch(grid, sweep))  # a launch while accounting is down
        assert len(slurm_calls.submissions()) == 1 and len(jobs) == 2
        with SweepState(sweep_db_path(sweep)) as state:
            _wait(lambda: all(_job_succeeded(state, run_id) for run_id in jobs), "both jobs report success")
        first_poll = time.time()
        once = _monitor_cli(sweep, "--once")
        expected = {time.strftime("%H:%M", time.localtime(t)) for t in (first_poll, time.time())}
        time.sleep(1)
        later = json.loads(_monitor_cli(sweep, "--json"))
        with SweepState(sweep_db_path(sweep)) as state:
            held_states = {r.run_id: r.state for r in state.runs()}
            assert all(r.attempts == 1 for r in state.runs())
    finally:
        slurm_cluster.start()

    rows = [line for line in once.splitlines() if line.startswith(tuple(jobs))]
    assert len(rows) == 2 and all(AWAITING_ACCOUNTING in row for row in rows), once
    assert f"{AWAITING_ACCOUNTING} 2" in once, once  # the header's count
    lines = [line for line in once.splitlines() if "accounting unavailable since" in line]
    assert len(lines) == 1 and lines[0].split("since ")[1][:5] in expected, once
    assert "SUBMITTED 2" not in once and "sacct failed" in once
    assert all(not state.is_final for state in held_states.values()), held_states  # nothing concluded
    assert [r["label"] for r in later["runs"]] == [AWAITING_ACCOUNTING] * 2
    since = later["unavailable_since"]["slurm"]
    assert first_poll - 1 <= since <= first_poll + 60  # the first failure's time, kept by the later poll
    assert later["poll"]["resubmitted"] == {} and later["counts"] == {AWAITING_ACCOUNTING: 2}

    final = follow(sweep, poll_s=1.0, timeout_s=WAIT_S)
    assert final == {run_id: RunState.COMPLETED for run_id in jobs}
    with SweepState(sweep_db_path(sweep)) as state:
        assert all(r.attempts == 1 and r.metrics["epochs"] == 2 for r in state.runs())
    assert len(slurm_calls.submissions()) == 1
    after = json.loads(_monitor_cli(sweep, "--json"))
    assert after["unavailable_since"] == {} and after["counts"] == {"COMPLETED": 2}
    _assert_sweep_sound(sweep)


# --- 4. a task cancelled from outside ------------------------------------------------------------------------


def test_scancel_of_one_task_is_cancelled_then_retry_resumes(slurm_cluster, make_grid, slurm_job_dir, slurm_calls):
    """One task of a 2-run array is scancelled once its last.ckpt holds an epoch: the run is CANCELLED "by the
    user", never resubmitted on its own, while the other completes. ``monitor --retry`` submits it again and it
    resumes from its last.ckpt (its new start begins at the epochs it had finished) and completes."""
    max_epochs = 6
    grid = make_grid("scancel", {"optim.lr": [0.001, 0.01]}, trainer={"max_epochs": max_epochs}, max_retries=2)
    sweep = slurm_job_dir / "sweep"
    jobs = launch.submit_plan(launch.plan_launch(grid, sweep))
    victim, other = sorted(jobs)
    with SweepState(sweep_db_path(sweep)) as state:
        run_dir = Path(state.get_run(victim).run_dir)
    _wait(lambda: _epochs_in(last_checkpoint(run_dir)) >= 1, "the victim's first checkpoint", poll_s=0.2)
    subprocess.run(["scancel", jobs[victim].job_id], check=True)
    assert slurm_cluster.wait_for_state(jobs[victim].job_id, {"CANCELLED"}, timeout_s=120) == "CANCELLED"
    done_before = _epochs_in(last_checkpoint(run_dir))
    assert 1 <= done_before < max_epochs, done_before  # cancelled mid-training

    final = follow(sweep, poll_s=1.0, timeout_s=WAIT_S)  # both runs end: one completes, one stays cancelled
    assert final == {victim: RunState.CANCELLED, other: RunState.COMPLETED}, final
    with SweepState(sweep_db_path(sweep)) as state:
        cancelled = state.get_run(victim)
    assert cancelled.attempts == 1 and cancelled.reason.startswith("cancelled by the user (by uid "), cancelled.reason
    assert "--retry" in cancelled.reason
    assert len(slurm_calls.submissions()) == 1  # not retried on its own

    assert "resubmitted as job" in _monitor_cli(sweep, "--retry", victim)
    final = follow(sweep, poll_s=1.0, timeout_s=WAIT_S)
    assert final == {victim: RunState.COMPLETED, other: RunState.COMPLETED}, final
    with SweepState(sweep_db_path(sweep)) as state:
        run = state.get_run(victim)
    assert run.attempts == 2 and run.metrics["epochs"] == max_epochs
    starts = read_job_info(run_dir)["starts"]
    assert [s["start_epoch"] for s in starts] == [0, done_before], starts  # resumed, no finished epoch again
    assert len(slurm_calls.submissions()) == 2
    _assert_sweep_sound(sweep)


# --- 6. held pending tasks -------------------------------------------------------------------------------------


def test_held_pending_task_is_shown_held_and_never_resubmitted(slurm_cluster, make_grid, slurm_job_dir,
                                                              slurm_calls):
    """A 3-run array runs one task at a time. One pending task is held (``scontrol hold``), another is scancelled
    before it ever started. The monitor shows the held one held (the controller's Reason, through squeue: sacct
    keeps the reason it had) while the first run completes, and never resubmits it; the scancelled one is
    CANCELLED (accounting records that cancel, or goes on listing it pending, or drops it: SLURM 22.05 does each),
    and is not retried.
    Released, the held task runs and completes in its one attempt, and the hold note is gone."""
    grid = make_grid("hold", {"optim.lr": [0.001, 0.003, 0.01]}, executor={"array_parallelism": 1},
                     trainer={"max_epochs": 1})
    sweep = slurm_job_dir / "sweep"
    jobs = launch.submit_plan(launch.plan_launch(grid, sweep))
    first, second, third = sorted(jobs, key=lambda run_id: int(jobs[run_id].job_id.split("_")[1]))
    held_job = jobs[second].job_id
    # scancel first, right after submission: while the task is still part of the array's pending record, which is
    # when accounting keeps no end for it (the case the monitor has to see through)
    subprocess.run(["scancel", jobs[third].job_id], check=True)
    subprocess.run(["scontrol", "hold", held_job], check=True)
    try:  # a failure must not leave a held job behind: it would keep the queue from emptying for other tests
        monitor = SweepMonitor(sweep)
        try:
            def first_done() -> bool:
                monitor.poll()
                return monitor.state.get_run(first).state == RunState.COMPLETED

            _wait(first_done, f"{first} completes while {second} is held", poll_s=1.0)
            for _ in range(3):  # a few more polls: the held run is left to the scheduler
                monitor.poll()
            held, gone = monitor.state.get_run(second), monitor.state.get_run(third)
            view = next(r for r in monitor.snapshot().runs if r.run_id == second)
        finally:
            monitor.close()
        assert held.state == RunState.SUBMITTED and held.attempts == 1, held
        assert held.reason.startswith("held: held by ") and f"scontrol release {held_job}" in held.reason, held.reason
        assert view.label == "SUBMITTED (held)"
        assert "SUBMITTED (held)" in _monitor_cli(sweep, "--once")
        assert gone.state == RunState.CANCELLED and gone.attempts == 1, gone
        # Accounting records the cancel only when the controller had split the task off the array's pending record
        # before it; else it keeps listing the task pending, or drops it (tests/test_fault_rules.py has both answers).
        accounting = slurm_cluster.state(jobs[third].job_id)
        if accounting == "CANCELLED":
            assert gone.reason.startswith("cancelled by the user (by uid "), gone.reason
        else:
            assert accounting in (None, "PENDING"), accounting
            assert gone.reason.startswith("cancelled outside the monitor before it started"), gone.reason
        assert "--retry" in gone.reason
        assert len(slurm_calls.submissions()) == 1
    except BaseException:
        subprocess.run(["scancel", held_job], check=False)
        raise
    subprocess.run(["scontrol", "release", held_job], check=True)
    final = follow(sweep, poll_s=1.0, timeout_s=WAIT_S)
    assert final == {first: RunState.COMPLETED, second: RunState.COMPLETED, third: RunState.CANCELLED}, final
    with SweepState(sweep_db_path(sweep)) as state:
        released = state.get_run(second)
    assert released.attempts == 1 and released.reason is None
    assert len(slurm_calls.submissions()) == 1
    _assert_sweep_sound(sweep)


# --- 2 and 7. the controller SIGKILLed, and the monitor with it -----------------------------------------------


def _start_monitor(sweep: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "a") as handle:  # a file, not a pipe: nothing blocks on unread output
        return subprocess.Popen([sys.executable, str(REPO / "sweeps" / "monitor.py"), str(sweep), "--interval", "2"],
                                stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env)


CONTROLLER_DOWN_S = 30


def test_controller_and_monitor_killed_mid_sweep(slurm_cluster, make_grid, slurm_job_dir, slurm_calls):
    """While a 2-run sweep trains and its monitor (``monitor.py``) follows it, slurmctld and the monitor are both
    SIGKILLed. The jobs go on under their slurmstepd; the controller is restarted after CONTROLLER_DOWN_S with its
    saved state, then the monitor. Both runs complete in their one attempt: nothing failed, nothing resubmitted,
    no epoch trained twice."""
    run_dir_of_cluster = slurm_cluster.own_state_dir() / "run"
    grid = make_grid("ctld_kill", {"optim.lr": [0.001, 0.01]}, trainer={"max_epochs": 4})
    sweep = slurm_job_dir / "sweep"
    jobs = launch.submit_plan(launch.plan_launch(grid, sweep))
    log = slurm_job_dir / "monitor.log"
    monitor = _start_monitor(sweep, log)
    with SweepState(sweep_db_path(sweep)) as state:
        run_dirs = [Path(state.get_run(run_id).run_dir) for run_id in jobs]
        _wait(lambda: all(r.state == RunState.RUNNING for r in state.runs()), "both runs RUNNING")
    _wait(lambda: any(_epochs_in(last_checkpoint(d)) >= 1 for d in run_dirs), "a first checkpoint", poll_s=0.2)
    assert monitor.poll() is None, log.read_text()
    try:
        _kill_daemon(slurm_cluster, "slurmctld")
        monitor.send_signal(signal.SIGKILL)
        monitor.wait()
        time.sleep(CONTROLLER_DOWN_S)
        assert (run_dir_of_cluster / "slurmctld.pid").exists()  # killed, not stopped: its pid file stays
    finally:
        slurm_cluster.start()  # slurmctld again, from its saved state (StateSaveLocation)
    code = _start_monitor(sweep, log).wait(timeout=WAIT_S)
    assert code == 0, log.read_text()[-3000:]
    with SweepState(sweep_db_path(sweep)) as state:
        runs = state.runs()
    assert {r.run_id: (r.state, r.attempts) for r in runs} == {run_id: (RunState.COMPLETED, 1) for run_id in jobs}
    assert all(r.metrics["epochs"] == 4 and r.reason is None for r in runs), [(r.run_id, r.reason) for r in runs]
    for run_id, job in jobs.items():
        assert slurm_cluster.state(job.job_id) == "COMPLETED"
    assert len(slurm_calls.submissions()) == 1
    _assert_sweep_sound(sweep)


# --- 3. the node set DOWN --------------------------------------------------------------------------------------


NODE = "localhost"


def _node_state() -> str:
    return subprocess.run(["sinfo", "-h", "-n", NODE, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def test_node_down_requeues_and_runs_resume_from_last_ckpt(slurm_cluster, make_grid, slurm_job_dir, slurm_calls):
    """The node is set DOWN while both runs of a sweep train (each with an epoch in last.ckpt), then back in
    service. SLURM ends the jobs NODE_FAIL and requeues them. The monitor process (``monitor.py``) that sees this
    first is SIGKILLed as soon as it has recorded a requeue; its successor, started while the node is still DOWN,
    shows both runs REQUEUED with the node and the cause and submits nothing itself; both runs resume from their
    last.ckpt (the second start begins at the epochs the first one finished, or later) and complete within
    max_retries."""
    slurm_cluster.own_state_dir()
    max_epochs = 5
    grid = make_grid("node_down", {"optim.lr": [0.001, 0.01]}, trainer={"max_epochs": max_epochs}, max_retries=1)
    sweep = slurm_job_dir / "sweep"
    jobs = launch.submit_plan(launch.plan_launch(grid, sweep))
    log = slurm_job_dir / "monitor.log"
    first_monitor = _start_monitor(sweep, log)
    with SweepState(sweep_db_path(sweep)) as state:
        run_dirs = {run_id: Path(state.get_run(run_id).run_dir) for run_id in jobs}
    _wait(lambda: all(_epochs_in(last_checkpoint(d)) >= 1 for d in run_dirs.values()), "a checkpoint each",
          poll_s=0.2)
    done_before = {run_id: _epochs_in(last_checkpoint(d)) for run_id, d in run_dirs.items()}
    assert all(epochs < max_epochs for epochs in done_before.values()), done_before
    assert first_monitor.poll() is None, log.read_text()
    subprocess.run(["scontrol", "update", f"nodename={NODE}", "state=down", "reason=issue29 fault test"],
                   check=True)
    try:
        with SweepState(sweep_db_path(sweep)) as state:
            _wait(lambda: any(r.state == RunState.REQUEUED for r in state.runs()),
                  "the monitor process records a requeue", timeout_s=120, poll_s=0.2)
        first_monitor.send_signal(signal.SIGKILL)
        first_monitor.wait()
        views = _requeued_views(SweepMonitor(sweep), len(jobs))
    finally:
        if _node_state().startswith("down"):  # ReturnToService=2 may have put it back already
            subprocess.run(["scontrol", "update", f"nodename={NODE}", "state=resume"], check=False)
    for view in views:
        assert view.label == "REQUEUED", view.label
        assert view.reason == f"requeued by the scheduler after NODE_FAIL on {NODE}: resumes from last.ckpt"
    assert len(slurm_calls.submissions()) == 1  # SLURM requeued them: neither monitor submitted anything

    final = follow(sweep, poll_s=1.0, timeout_s=WAIT_S)
    assert final == {run_id: RunState.COMPLETED for run_id in jobs}, final
    with SweepState(sweep_db_path(sweep)) as state:
        runs = state.runs()
    for run in runs:
        assert 1 <= run.attempts <= run.max_retries + 1 and run.metrics["epochs"] == max_epochs
        starts = read_job_info(run.run_dir)["starts"]
        assert len(starts) >= 2 and starts[-1]["start_epoch"] >= done_before[run.run_id], starts
    assert len(slurm_calls.submissions()) == 1
    _assert_sweep_sound(sweep)


def _requeued_views(monitor: SweepMonitor, n_runs: int) -> list:
    """Poll until every run has been seen REQUEUED; each run's row when a poll first found it so (the runs need
    not be requeued together)."""
    seen = {}
    try:
        def requeued() -> bool:
            monitor.poll()
            seen.update({v.run_id: v for v in monitor.snapshot().runs
                         if v.state == RunState.REQUEUED.value and v.run_id not in seen})
            return len(seen) == n_runs

        _wait(requeued, "every run REQUEUED", timeout_s=120, poll_s=1.0)
    finally:
        monitor.close()
    return list(seen.values())


# --- 5. killed for memory ---------------------------------------------------------------------------------------


def test_cgroup_oom_is_retried_then_failed(slurm_cluster, make_grid, slurm_job_dir, slurm_calls):
    """A run whose job needs more memory than its ``executor.mem_gb`` (0.3 GB: less than importing torch takes):
    in each attempt the kernel's OOM killer ends the job inside its memory cgroup and SLURM records OUT_OF_MEMORY.
    The run is retried once (``max_retries: 1``), then FAILED with the cause on the dashboard; nothing is submitted
    beyond max_retries. Needs the dev cluster's task/cgroup (start.sh uses it where a cgroup-v1 memory controller is
    writable); skipped under task/none, where memory is not enforced."""
    task_plugin = slurm_cluster.config("TaskPlugin")
    if "task/cgroup" not in task_plugin:
        pytest.skip(f"the dev cluster does not enforce memory (TaskPlugin={task_plugin}: start.sh found no writable "
                    "cgroup-v1 memory controller); the SIGKILL test below stands in for the OOM killer")
    grid = make_grid("oom", {"optim.lr": [0.001]}, executor={"mem_gb": 0.3}, max_retries=1)
    sweep = slurm_job_dir / "sweep"
    (run_id, job), = launch.submit_plan(launch.plan_launch(grid, sweep)).items()
    final = follow(sweep, poll_s=1.0, timeout_s=WAIT_S)
    assert final == {run_id: RunState.FAILED}, final
    with SweepState(sweep_db_path(sweep)) as state:
        run, attempts = state.get_run(run_id), state.attempts(run_id)
    assert run.attempts == 2 and [a.state for a in attempts] == ["OUT_OF_MEMORY", "OUT_OF_MEMORY"], attempts
    for attempt in attempts:  # sacct's own words, every step: the srun step ran out of memory, the batch failed
        steps = subprocess.run(["sacct", "-n", "-P", "-o", "JobID,State", "-j", attempt.job_id], capture_output=True,
                               text=True, check=True).stdout.split()
        assert f"{attempt.job_id}.0|OUT_OF_MEMORY" in steps and f"{attempt.job_id}|FAILED" in steps, steps
    assert run.reason.startswith("OUT_OF_MEMORY (attempt 2): it ran out of memory"), run.reason
    assert run.reason.endswith("no retries left (1)"), run.reason
    once = _monitor_cli(sweep, "--json")
    assert json.loads(once)["runs"][0]["reason"] == run.reason  # the cause on the dashboard
    assert len(slurm_calls.submissions()) == 2
    _assert_sweep_sound(sweep)


# The kernel's OOM killer ends a job's process with SIGKILL; the test below does that directly, so that the retry
# path is proven also where the dev cluster does not enforce memory.


def test_killed_job_is_retried_then_failed(slurm_cluster, make_grid, slurm_job_dir, slurm_calls):
    """The job's Python process is SIGKILLed (what the kernel's OOM killer does) in each attempt of a run with
    ``max_retries: 1``: the first kill is retried (resuming from last.ckpt), the second leaves the run FAILED
    with the cause on the dashboard and no retries left; nothing is submitted beyond max_retries."""
    grid = make_grid("killed", {"optim.lr": [0.001]}, trainer={"max_epochs": 100}, max_retries=1)
    sweep = slurm_job_dir / "sweep"
    (run_id, job), = launch.submit_plan(launch.plan_launch(grid, sweep)).items()
    monitor = SweepMonitor(sweep)
    try:
        run_dir = Path(monitor.state.get_run(run_id).run_dir)
        for attempt in (1, 2):
            def started() -> dict | None:
                monitor.poll()
                latest = monitor.state.latest_attempt(run_id)
                info = read_job_info(run_dir) or {}
                fresh = latest.attempt == attempt and info.get("job_id") == latest.job_id
                return info if fresh and _epochs_in(last_checkpoint(run_dir)) >= attempt else None

            info = _wait(started, f"attempt {attempt} trains", poll_s=0.5)
            os.kill(int(info["pid"]), signal.SIGKILL)
        _wait(lambda: monitor.poll() and monitor.state.get_run(run_id).state.is_final, "the run ends",
              poll_s=1.0)
        run = monitor.state.get_run(run_id)
        attempts = monitor.state.attempts(run_id)
        once_row = next(v for v in monitor.snapshot().runs if v.run_id == run_id)
    finally:
        monitor.close()
    assert run.state == RunState.FAILED and run.attempts == 2, (run.state, run.reason)
    assert [a.state for a in attempts] == ["FAILED", "FAILED"], [a.state for a in attempts]
    assert run.reason.startswith("FAILED (attempt 2): ") and run.reason.endswith("no retries left (1)")
    assert "its process was killed by SIGKILL (out of memory" in run.reason, run.reason  # sacct's DerivedExitCode 0:9
    assert once_row.reason == run.reason and once_row.node is not None
    starts = read_job_info(run_dir)["starts"]
    assert [s["job_id"] for s in starts] == [a.job_id for a in attempts] and starts[1]["start_epoch"] >= 1
    assert len(slurm_calls.submissions()) == 2
    _assert_sweep_sound(sweep)


# --- 8. scale ---------------------------------------------------------------------------------------------------


SCALE_LRS = 60  # × 2 resource sets = 120 runs
SCALE_COMPLETED = 6
"""Runs left to train to the end before the rest are cancelled: 120 tiny trainings take ~6 CPU-s each (imports),
about 15 minutes on CI's 2 cores; ``bench/monitor_slurm.py`` runs a whole sweep to the end and measures it."""


def _sacct_states(array_ids: set[str]) -> dict[str, str]:
    """Every task's state as sacct itself prints it (``-X -P``), read here without the project's parser: a
    compressed record of several pending tasks, ``123_[4-6,9%2]``, is expanded; ``CANCELLED by 0`` → CANCELLED.
    Tasks accounting does not list are absent."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(sorted(array_ids)), "-o", "JobID,State"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    states = {}
    for line in out.splitlines():
        job_id, state = line.split("|")
        array, _, tasks = job_id.partition("_")
        for part in tasks.strip("[]").split("%")[0].split(","):  # "%2": the array's throttle
            first, _, last = part.partition("-")
            for task in range(int(first), int(last or first) + 1):
                states[f"{array}_{task}"] = state.split()[0]
    return states


def test_sweep_of_120_runs_one_sbatch_per_resource_set_one_sacct_per_poll(slurm_cluster, make_grid, slurm_job_dir,
                                                                          slurm_calls):
    """A grid of 120 runs in two resource sets (``executor.cpus_per_task`` 1 and 2) is launched with two sbatch
    calls, one array each. The monitor follows all 120 with one sacct call per poll and at most one squeue (why
    pending tasks wait), whatever their number, while runs go from pending to running to completed and are
    collected. Once SCALE_COMPLETED runs have completed, ``--cancel all`` ends the rest with one scancel. Every
    run has one attempt, the database agrees with sacct about every job, nothing is resubmitted."""
    grid = make_grid("scale", {"optim.lr": [round(0.0005 * (i + 1), 5) for i in range(SCALE_LRS)],
                               "executor.cpus_per_task": [1, 2]},
                     executor={"array_parallelism": 2}, trainer={"max_epochs": 1, "limit_train_batches": 1})
    sweep = slurm_job_dir / "sweep"
    jobs = launch.submit_plan(launch.plan_launch(grid, sweep))
    assert len(jobs) == 2 * SCALE_LRS
    assert len(slurm_calls.submissions()) == 2  # one sbatch per resource set
    arrays = {job.job_id.split("_")[0] for job in jobs.values()}
    assert len(arrays) == 2
    calls_per_poll: list[tuple[int, int]] = []
    monitor = SweepMonitor(sweep)
    try:
        def enough_completed() -> bool:
            before = len(slurm_calls.calls("sacct")), len(slurm_calls.calls("squeue"))
            monitor.poll()
            calls_per_poll.append((len(slurm_calls.calls("sacct")) - before[0],
                                   len(slurm_calls.calls("squeue")) - before[1]))
            return sum(r.state == RunState.COMPLETED for r in monitor.state.runs()) >= SCALE_COMPLETED

        _wait(enough_completed, f"{SCALE_COMPLETED} runs completed", poll_s=1.0)
        cancelled = monitor.cancel(["all"])
        runs = {r.run_id: r for r in monitor.state.runs()}
    finally:
        monitor.close()
    assert {sacct for sacct, _ in calls_per_poll} == {1}, calls_per_poll  # one sacct per poll, for all 120 runs
    assert max(squeue for _, squeue in calls_per_poll) <= 1, calls_per_poll
    assert any(squeue == 1 for _, squeue in calls_per_poll)  # pending tasks were there and were asked about once
    assert len(slurm_calls.calls("scancel")) == 1  # one scancel for the whole sweep
    completed = {run_id for run_id, run in runs.items() if run.state == RunState.COMPLETED}
    assert len(completed) >= SCALE_COMPLETED and set(cancelled) == set(jobs) - completed
    assert all(run.attempts == 1 for run in runs.values())
    assert {run_id for run_id, run in runs.items() if run.state == RunState.CANCELLED} == set(cancelled)

    def nothing_queued() -> bool:  # pending and running jobs (squeue's default states) of the sweep's arrays
        answer = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(sorted(arrays)), "-o", "%i"],
                                capture_output=True, text=True, check=True, timeout=60)
        return not answer.stdout.strip()

    _wait(nothing_queued, "the controller holds no job of the sweep after --cancel all", timeout_s=120, poll_s=2.0)
    sacct = _sacct_states(arrays)
    assert all(sacct[jobs[run_id].job_id] == "COMPLETED" for run_id in completed)
    # A cancelled run's job is CANCELLED, or absent or still "pending" in accounting when it never started (SLURM
    # 22.05 drops such tasks), or COMPLETED when it was running and ended between the last poll and scancel.
    words = {run_id: sacct.get(jobs[run_id].job_id) for run_id in cancelled}
    assert set(words.values()) <= {"CANCELLED", "PENDING", None, "COMPLETED"}, words
    assert sum(word == "COMPLETED" for word in words.values()) <= 4, words  # at most the 4 that were running
    assert len(slurm_calls.submissions()) == 2  # nothing resubmitted
    _assert_sweep_sound(sweep)
