"""What the controller holds now, from ``squeue``: one call per poll at most, and its parsing.

sacct's record is what the controller last sent to accounting. Two things show only in the controller:

- why a pending job waits now: sacct keeps the Reason it had (e.g. ``JobArrayTaskLimit``) when someone holds the
  job (``scontrol hold``); squeue says ``JobHeldUser``;
- that a pending array task is gone: ``scancel`` of a task that never started removes it from the controller,
  while accounting goes on listing it pending in the array's record, or drops it without an end (SLURM 22.05).

So the monitor asks squeue, once per poll, about the jobs sacct reports pending or does not report at all. It is
asked for every state (``-t all``: pending, running, and ended within the controller's MinJobAge), so a job that
started between the sacct and the squeue call is still found. squeue never decides a job's state on its own:
sacct does (``slurm/sacct.py``); ``sweeps/job_states.py`` combines the two.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from brats_ugrip.slurm.sacct import SacctError, array_ids, run_query

SQUEUE_FORMAT = "%i|%T|%r"  # job id (array tasks one per line with -r) | state | reason
INVALID_JOB_ID = "Invalid job id specified"  # squeue's error for a single job id the controller does not hold


@dataclass(frozen=True)
class ControllerJob:
    """One job as the controller holds it: its state (squeue's word, e.g. PENDING) and why it is in it."""

    state: str
    reason: str


def parse_squeue(text: str) -> dict[str, ControllerJob]:
    """Jobs by id from ``squeue -h -r -o '%i|%T|%r'`` output (lines without two ``|`` are skipped)."""
    jobs = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3 and fields[0]:
            jobs[fields[0]] = ControllerJob(state=fields[1].strip(), reason=fields[2].strip())
    return jobs


def squeue_command(job_ids: Iterable[str]) -> list[str]:
    """The squeue command line listing every job the controller holds among ``job_ids`` (asked through their
    array's id)."""
    arrays = array_ids(job_ids)
    return ["squeue", "-h", "-r", "-t", "all", "-j", ",".join(arrays), "-o", SQUEUE_FORMAT]


def query_controller(job_ids: Iterable[str], timeout_s: float = 60) -> dict[str, ControllerJob]:
    """The jobs among ``job_ids`` that the controller holds, by id; jobs it no longer holds are absent.

    Raises:
        SacctError: squeue is missing, timed out or failed (slurmctld not answering).
    """
    job_ids = list(job_ids)
    if not job_ids:
        return {}
    try:
        output = run_query(squeue_command(job_ids), timeout_s)
    except SacctError as error:
        # Asked about one job (array) only, squeue fails when the controller no longer holds it; asked about
        # several, it lists those it holds. Both mean the same: that one is not held.
        if INVALID_JOB_ID not in str(error) or len(array_ids(job_ids)) != 1:
            raise
        return {}
    wanted = set(job_ids)
    return {job_id: job for job_id, job in parse_squeue(output).items() if job_id in wanted}
