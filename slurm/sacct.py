"""One batched ``sacct`` call for every job of a sweep, and the parsing of its answer.

The monitor asks SLURM's accounting database about all its jobs at once, whatever their number: the array job ids
(``123`` for tasks ``123_0 … 123_999``) go into a single ``sacct -j``, with ``--duplicates`` so that a requeued job
shows one record per start (``REQUEUED`` then ``RUNNING``…, oldest first). sacct, not submitit's ``job.state``,
is the truth about a job: submitit's watcher polls rarely and lags.

Pending array tasks are reported in one compressed record, e.g. ``123_[4-9%2]``; :func:`parse_sacct` expands it
into one record per task.

Job ids are not unique over time: a controller that lost its state numbers jobs from 1 again while accounting
keeps the old jobs, and ids wrap around on busy clusters. ``sacct --duplicates -j 1`` then returns the old job's
records with the new one's. Every record carries its ``Submit`` time, and :func:`records_since` keeps only those
submitted since our own submission of that id.
"""
from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from brats_ugrip.errors import BratsUgripError

SACCT_FIELDS = ("JobID", "State", "NodeList", "ElapsedRaw", "ExitCode", "Start", "End", "Reason", "Submit",
                "DerivedExitCode")
_REQUIRED_FIELDS = 8
"""Lines without the trailing ``Submit`` and ``DerivedExitCode`` (an older recorded answer) still parse; their
records match any time."""
SUBMIT_CLOCK_SLACK_S = 5.0
"""How much earlier than our recorded submission sacct's ``Submit`` may be and still be ours: the launcher notes
the time just before ``sbatch``, but its clock and the controller's may differ by a little."""
_ARRAY_RANGE = re.compile(r"^(?P<array>\d+)_\[(?P<tasks>[^\]]+)\]$")


class SacctError(BratsUgripError):
    """``sacct`` could not be run or answered with an error (the monitor then keeps the states it knew)."""


@dataclass(frozen=True)
class SacctRecord:
    """One line of sacct: one start of a job (a requeued job has several).

    ``state`` is sacct's first word (``CANCELLED by 0`` → ``CANCELLED``), ``cancelled_by`` the uid after "by";
    times are Unix seconds (None when sacct says ``Unknown``); ``node`` is None before the job got one;
    ``submit`` is when the controller accepted this job (or its requeue).
    """

    job_id: str
    state: str
    node: str | None = None
    elapsed_s: int = 0
    exit_code: str | None = None
    start: float | None = None
    end: float | None = None
    reason: str | None = None
    submit: float | None = None
    cancelled_by: str | None = None
    derived_exit_code: str | None = None
    """``code:signal`` of the job's steps (``0:9``: a step was SIGKILLed), when sacct gives it."""


def _time(text: str) -> float | None:
    if text in ("", "Unknown", "None"):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()  # sacct prints the cluster's local time
    except ValueError:
        return None


def _cancelled_by(state: str) -> str | None:
    """The uid in ``CANCELLED by 1000`` (who ran scancel), else None."""
    words = state.split()
    return words[2] if len(words) == 3 and words[1] == "by" else None


def expand_task_ids(spec: str) -> list[int]:
    """Array task ids of a compressed sacct spec: ``"0-5%2"`` → 0…5, ``"1,3-4"`` → 1, 3, 4."""
    spec = spec.split("%", 1)[0]
    tasks: list[int] = []
    for part in filter(None, spec.split(",")):
        first, _, last = part.partition("-")
        tasks.extend(range(int(first), int(last or first) + 1))
    return tasks


def parse_sacct(text: str) -> dict[str, list[SacctRecord]]:
    """Records by job id (``123`` or ``123_4``), oldest first, from ``sacct -P -n -o <SACCT_FIELDS>`` output.

    A compressed record of pending array tasks gives a PENDING record to each of its tasks that has no record of
    its own (or only records submitted before it: a reused id).
    """
    records: dict[str, list[SacctRecord]] = {}
    compressed: list[SacctRecord] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < _REQUIRED_FIELDS:
            raise SacctError(f"unexpected sacct line (expected {len(SACCT_FIELDS)} fields "
                             f"{'|'.join(SACCT_FIELDS)}): {line!r}")
        job_id, state, node, elapsed, exit_code, start, end, reason = fields[:_REQUIRED_FIELDS]
        submit = fields[_REQUIRED_FIELDS] if len(fields) > _REQUIRED_FIELDS else ""
        derived = fields[_REQUIRED_FIELDS + 1] if len(fields) > _REQUIRED_FIELDS + 1 else ""
        record = SacctRecord(
            job_id=job_id, state=(state.split() or ["UNKNOWN"])[0],
            node=None if node in ("", "None assigned") else node,
            elapsed_s=int(elapsed) if elapsed.isdigit() else 0, exit_code=exit_code or None,
            start=_time(start), end=_time(end), reason=None if reason in ("", "None") else reason,
            submit=_time(submit), cancelled_by=_cancelled_by(state), derived_exit_code=derived or None,
        )
        (compressed if _ARRAY_RANGE.match(job_id) else records.setdefault(job_id, [])).append(record)
    for record in compressed:
        match = _ARRAY_RANGE.match(record.job_id)
        assert match is not None
        for task in expand_task_ids(match["tasks"]):
            task_id = f"{match['array']}_{task}"
            own = records.get(task_id, [])
            # A task's own records win, unless they are all older: an earlier job that had the same id.
            if not own or (record.submit is not None and all(r.submit is not None and r.submit < record.submit
                                                             for r in own)):
                records[task_id] = [*own, SacctRecord(task_id, record.state, None, 0, record.exit_code, None, None,
                                                      record.reason, record.submit)]
    return records


def records_since(history: list[SacctRecord], submitted_at: float | None,
                  slack_s: float = SUBMIT_CLOCK_SLACK_S) -> list[SacctRecord]:
    """The records of ``history`` that belong to a submission made at ``submitted_at``: those the controller
    accepted no earlier (less ``slack_s`` for clock differences). Records of an older job that had the same id are
    dropped; without ``submitted_at``, or for records without a Submit time, nothing is dropped."""
    if submitted_at is None:
        return list(history)
    return [r for r in history if r.submit is None or r.submit >= submitted_at - slack_s]


def array_ids(job_ids: Iterable[str]) -> list[str]:
    """The job arrays of ``job_ids`` ("12_3" → "12"), each once, in numeric order: one query covers every task."""
    return sorted({str(job_id).split("_", 1)[0] for job_id in job_ids}, key=lambda j: (len(j), j))


def run_query(command: list[str], timeout_s: float) -> str:
    """Run a SLURM query command (sacct, squeue) and return its output.

    Raises:
        SacctError: the command is missing, timed out or failed; its name and stderr's tail say which.
    """
    try:
        answer = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SacctError(f"{command[0]} could not be run ({error})") from error
    if answer.returncode != 0:
        raise SacctError(f"{command[0]} failed (exit {answer.returncode}): {answer.stderr.strip()[-500:]}")
    return answer.stdout


def sacct_command(job_ids: Iterable[str]) -> list[str]:
    """The sacct command line asking about ``job_ids`` (array tasks are asked through their array's id)."""
    arrays = array_ids(job_ids)
    return ["sacct", "-X", "-n", "-P", "--duplicates", "-j", ",".join(arrays), "-o", ",".join(SACCT_FIELDS)]


def query_sacct(job_ids: Iterable[str], timeout_s: float = 60) -> dict[str, list[SacctRecord]]:
    """Ask sacct once about every job in ``job_ids``; records by job id, oldest first.

    Jobs that slurmdbd has not heard of yet (just submitted) are absent from the answer.

    Raises:
        SacctError: sacct is missing, timed out, or failed (e.g. slurmdbd down).
    """
    job_ids = list(job_ids)
    if not job_ids:
        return {}
    output = run_query(sacct_command(job_ids), timeout_s)
    wanted = set(job_ids)
    return {job_id: history for job_id, history in parse_sacct(output).items() if job_id in wanted}
