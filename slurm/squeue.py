"""Why pending jobs wait, from ``squeue``: one call per poll for the pending jobs of a sweep, and its parsing.

sacct's Reason of a pending job is what the controller last sent to accounting (e.g. ``JobArrayTaskLimit``); it
does not change when someone holds the job (``scontrol hold``). squeue asks the controller itself, so the monitor
asks it, once per poll and only when sacct reports pending jobs, why they wait (``JobHeldUser``, ``Resources``…).
It never decides a job's state: sacct does (``slurm/sacct.py``).
"""
from __future__ import annotations

from collections.abc import Iterable

from brats_ugrip.slurm.sacct import array_ids, run_query

SQUEUE_FORMAT = "%i|%r"  # job id (array tasks one per line with --array) | reason


def parse_squeue(text: str) -> dict[str, str]:
    """Reason by job id from ``squeue -h -r -o '%i|%r'`` output (lines without a ``|`` are skipped)."""
    reasons = {}
    for line in text.splitlines():
        job_id, sep, reason = line.strip().partition("|")
        if sep and job_id:
            reasons[job_id] = reason.strip()
    return reasons


def squeue_command(job_ids: Iterable[str]) -> list[str]:
    """The squeue command line listing the pending jobs among ``job_ids`` (asked through their array's id)."""
    arrays = array_ids(job_ids)
    return ["squeue", "-h", "-r", "-t", "PD", "-j", ",".join(arrays), "-o", SQUEUE_FORMAT]


def query_pending_reasons(job_ids: Iterable[str], timeout_s: float = 60) -> dict[str, str]:
    """Why each pending job among ``job_ids`` waits, from the controller; jobs not pending are absent.

    Raises:
        SacctError: squeue is missing, timed out or failed (slurmctld not answering).
    """
    job_ids = list(job_ids)
    if not job_ids:
        return {}
    output = run_query(squeue_command(job_ids), timeout_s)
    wanted = set(job_ids)
    return {job_id: reason for job_id, reason in parse_squeue(output).items() if job_id in wanted}
