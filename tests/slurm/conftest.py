"""Fixtures for tests that run jobs on the single-node SLURM dev cluster (``slurm/dev-cluster/start.sh``): the
cluster (``slurm_cluster``), a job directory, a grid of tiny CPU runs (``make_grid``), a log of the SLURM commands
the test runs (``slurm_calls``).

A test that takes ``slurm_cluster`` is marked ``slurm`` automatically. The cluster is used when it answers
``sinfo`` and ``sacct``; when it does not, it is started if ``BRATS_UGRIP_START_SLURM=1`` (a start that fails
then fails the tests, since someone asked for the cluster), and the tests are skipped otherwise.
"""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

START_SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "dev-cluster" / "start.sh"
START_ENV = "BRATS_UGRIP_START_SLURM"

# Job states after which sacct's record of a job never changes again (REQUEUED and PREEMPTED may be followed
# by another attempt, so they are not final).
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
)


def _run(command: list[str], timeout_s: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)


def cluster_problem() -> str | None:
    """Why the dev cluster cannot take jobs right now, or None when ``sinfo`` and ``sacct`` both answer."""
    for command in (["sinfo", "-h", "-o", "%P"], ["sacct", "-n", "-X", "-S", "now-1minutes"]):
        try:
            answer = _run(command)
        except (FileNotFoundError, subprocess.TimeoutExpired) as error:
            return f"`{command[0]}`: {error}"
        output = (answer.stdout + answer.stderr).strip()
        if answer.returncode != 0 or "disabled" in output:  # "accounting storage is disabled": no slurmdbd
            return f"`{' '.join(command)}` answered {output[-300:]!r}"
    return None


@dataclass(frozen=True)
class SlurmDevCluster:
    """The running dev cluster, with the ``sacct`` queries tests assert on.

    sacct is the truth about a job: submitit's ``job.state`` may lag behind it by up to a minute. Only records
    submitted after ``session_start`` (when the fixture was made, before any job of the session) are read: a job
    id that accounting also holds from an earlier life of the cluster (controller state reset) is not confused
    with the test's job.
    """

    poll_s: float = 1.0
    session_start: float = field(default_factory=time.time)

    def history(self, job_id: str, since: float | None = None) -> list[str]:
        """States of every attempt of ``job_id`` (``123`` or an array task ``123_4``), oldest first.

        A requeued job has one record per attempt: e.g. ``["REQUEUED", "COMPLETED"]``. ``CANCELLED by 0`` is
        reported as ``CANCELLED``. Empty until slurmdbd has heard of the job. ``since`` (Unix seconds, noted
        before submitting): records of an older job that had the same id (a reused id) are left out.
        """
        from brats_ugrip.slurm.sacct import parse_sacct, records_since, sacct_command

        answer = _run(sacct_command([job_id]))
        if answer.returncode != 0:
            raise RuntimeError(f"sacct -j {job_id} failed: {answer.stderr.strip()}")
        history = parse_sacct(answer.stdout).get(job_id, [])
        return [r.state for r in records_since(history, self.session_start if since is None else since)]

    def state(self, job_id: str, since: float | None = None) -> str | None:
        """State of the latest attempt of ``job_id`` submitted after ``since``, or None before slurmdbd has heard
        of it."""
        states = self.history(job_id, since)
        return states[-1] if states else None

    def wait_for_state(self, job_id: str, states: set[str] | frozenset[str], timeout_s: float,
                       since: float | None = None) -> str:
        """Poll sacct until the latest attempt of ``job_id`` is in one of ``states``; return that state."""
        deadline = time.monotonic() + timeout_s
        while (state := self.state(job_id, since)) not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {state} after {timeout_s:.0f} s, not one of {sorted(states)}")
            time.sleep(self.poll_s)
        return state

    def wait_until_final(self, job_id: str, timeout_s: float = 120, since: float | None = None) -> str:
        """Poll sacct until ``job_id`` reached a final state (see FINAL_STATES); return it."""
        return self.wait_for_state(job_id, FINAL_STATES, timeout_s, since)

    @staticmethod
    def config(key: str) -> str:
        """One value of ``scontrol show config`` (``Key = value`` lines)."""
        out = _run(["scontrol", "show", "config"]).stdout
        for line in out.splitlines():
            name, _, value = line.partition("=")
            if name.strip() == key:
                return value.strip()
        raise KeyError(key)

    def own_state_dir(self) -> Path:
        """The state folder of start.sh's cluster (``etc/``, ``run/`` with the pid files, the controller's state);
        skips the test when the cluster is someone else's, whose daemons are never ours to stop."""
        state_dir = Path(self.config("StateSaveLocation")).parent
        conf = Path("/etc/slurm/slurm.conf")
        if not (conf.is_symlink() and conf.resolve() == (state_dir / "etc" / "slurm.conf").resolve()):
            pytest.skip(f"not the dev cluster of {START_SCRIPT} ({conf} is not its symlink): its daemons are not "
                        "ours to stop")
        return state_dir

    @staticmethod
    def start() -> str:
        """Run start.sh (again): starts whichever daemon is not running, keeping saved state; returns its output."""
        started = _run([str(START_SCRIPT)], timeout_s=600)
        assert started.returncode == 0, started.stdout + started.stderr
        return started.stdout


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmDevCluster:
    """The dev cluster, checked to answer; started first when ``BRATS_UGRIP_START_SLURM=1``, else skipped."""
    problem = cluster_problem()
    if problem and os.environ.get(START_ENV) == "1":
        started = _run([str(START_SCRIPT)], timeout_s=600)
        if started.returncode != 0:
            pytest.fail(f"{START_SCRIPT} failed (exit {started.returncode}):\n{started.stdout}{started.stderr}")
        problem = cluster_problem()
        if problem:
            pytest.fail(f"{START_SCRIPT} finished but the cluster does not answer: {problem}")
    if problem:
        pytest.skip(
            f"no SLURM dev cluster ({problem}): run slurm/dev-cluster/start.sh, or set {START_ENV}=1 to start it"
        )
    return SlurmDevCluster()


@pytest.fixture
def slurm_job_dir(tmp_path: Path) -> Path:
    """A directory that jobs can read and write: the dev cluster is one node, so any local path is shared."""
    return tmp_path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the dev cluster ``slurm``, so ``-m "not slurm"`` leaves them out."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)


@pytest.fixture
def slurm_calls(tmp_path, monkeypatch):
    """Logging wrappers of sbatch, sacct, squeue and scancel first on PATH (jobs inherit it too): the
    ``slurm/call_log.py`` CallLog of every call the test and the processes it starts make."""
    from brats_ugrip.slurm.call_log import write_wrappers

    log = write_wrappers(tmp_path / "shim")
    monkeypatch.setenv("PATH", f"{log.path.parent}:{os.environ['PATH']}")
    return log


@pytest.fixture
def make_grid(slurm_job_dir, phantom_dir):
    """Write a grid of tiny CPU runs on the phantoms; keyword arguments override its sections."""
    from brats_ugrip.data import make_datalist, save_datalist

    datalist = slurm_job_dir / "datalist.json"
    save_datalist(make_datalist(phantom_dir, 3, 0), datalist)

    def write(name: str, grid: dict, executor: dict | None = None, trainer: dict | None = None, **extra) -> Path:
        content = {
            "name": name,
            "base": {
                "data": {"datalist": str(datalist), "roi_size": [32, 32, 32], "batch_size": 1,
                         "cache_dir": str(slurm_job_dir / "cache")},
                "model": {"name": "segresnet", "init_filters": 8},
                "trainer": {"max_epochs": 2, "accelerator": "cpu", "limit_train_batches": 2, "limit_val_batches": 1,
                            "cudnn_benchmark": False, **(trainer or {})},
                "inference": {"sw_batch_size": 1, "overlap": 0.0},
                "logging": {"mode": "disabled"},
            },
            "grid": grid,
            "executor": {"cluster": "slurm", "partition": "debug", "cpus_per_task": 1, "time": 10,
                         **(executor or {})},
            **extra,
        }
        path = slurm_job_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(content, sort_keys=False))
        return path

    return write
