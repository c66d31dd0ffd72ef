"""The one mapping from scheduler states to what the monitor does (sweeps/job_states.py), checked state by state
against SLURM's meaning of each word (``man sacct``, JOB STATE CODES) and against the real ``sacct --helpstate``."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from brats_ugrip.sweeps.job_states import SCHEDULER_STATES, JobPhase, JobStatus, job_phase

# From `man sacct` (JOB STATE CODES): the job may still run, or it has ended, and how.
STILL_GOING = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED",
               "STOPPED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "PREEMPTED"}
ENDED_IN_ERROR = {"FAILED", "BOOT_FAIL", "NODE_FAIL", "OUT_OF_MEMORY", "REVOKED", "SPECIAL_EXIT"}


def test_every_state_has_one_meaning():
    assert {w for w, p in SCHEDULER_STATES.items() if p.is_active} == STILL_GOING
    assert {w for w, p in SCHEDULER_STATES.items() if p == JobPhase.FAILED} == ENDED_IN_ERROR
    assert job_phase("COMPLETED") == JobPhase.COMPLETED
    assert job_phase("CANCELLED by 1000") == JobPhase.CANCELLED  # sacct appends who cancelled
    assert job_phase("TIMEOUT") == job_phase("DEADLINE") == JobPhase.INTERRUPTED  # resumed, not failures
    assert job_phase("PREEMPTED") == JobPhase.REQUEUED  # SLURM requeues it; the monitor resumes it after a grace
    assert job_phase("NO_SUCH_STATE") == JobPhase.FAILED  # an unknown word never leaves a run watched forever
    assert JobStatus("1", "STOPPED").is_active and not JobStatus("1", "NODE_FAIL").is_active


def _sacct_states() -> set[str]:
    """The states SLURM's sacct lists: ``sacct --helpstate`` (SLURM 23.02+), else its manual's JOB STATE CODES
    (22.05, Debian 12's, has no --helpstate)."""
    listed = subprocess.run(["sacct", "--helpstate"], capture_output=True, text=True)
    if listed.returncode == 0:
        return {line.split()[0] for line in listed.stdout.splitlines() if line.strip() and line.split()[0].isupper()}
    manual = subprocess.run(["man", "-P", "cat", "sacct"], capture_output=True, text=True,
                            env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"}).stdout
    section = manual.split("\nJOB STATE CODES\n", 1)[-1].split("\nDEFAULT TIME WINDOW", 1)[0]
    return set(re.findall(r"^\s+[A-Z]{1,3}\s+([A-Z_]{4,})\s", section, flags=re.M))


@pytest.mark.skipif(shutil.which("sacct") is None, reason="needs SLURM's sacct (slurm/dev-cluster/start.sh)")
def test_every_state_sacct_lists_is_mapped():
    listed = _sacct_states()
    if not listed:
        pytest.skip("this sacct has no --helpstate and its manual page is not installed")
    assert len(listed) >= 15, listed  # 22.05's manual lists 16, 23.02+'s --helpstate 24
    assert listed <= set(SCHEDULER_STATES), sorted(listed - set(SCHEDULER_STATES))


def test_job_result_file_classifies_errors_and_guards_against_other_submissions(tmp_path):
    from brats_ugrip.errors import ConfigError, DataError
    from brats_ugrip.sweeps.jobs import job_result_path, read_job_result, write_job_result

    write_job_result(tmp_path, "12_3", 2, error=DataError("case 7: flair missing"))
    found = read_job_result(tmp_path, "12_3", 2)
    assert found.status == "error" and not found.retryable and found.summary == "DataError: case 7: flair missing"
    assert json.loads(job_result_path(tmp_path, "12_3").read_text())["attempt"] == 2  # plain JSON on disk
    assert read_job_result(tmp_path, "12_3", 3) is None  # another attempt reusing the id: not ours
    write_job_result(tmp_path, "13", 1, error=ConfigError("optim.lr", "must be > 0"))
    assert not read_job_result(tmp_path, "13").retryable
    write_job_result(tmp_path, "14", 1, error=RuntimeError("CUDA out of memory"))
    assert read_job_result(tmp_path, "14").retryable
    write_job_result(tmp_path, "15", 1, result={"best_val_dice": 0.5, "run_dir": tmp_path})
    assert read_job_result(tmp_path, "15").result == {"best_val_dice": 0.5, "run_dir": str(tmp_path)}
    job_result_path(tmp_path, "16").write_text("{not json")
    assert read_job_result(tmp_path, "16") is None
