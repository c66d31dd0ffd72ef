"""Persistent state of a sweep: ``SWEEP_DIR/sweep.db`` (SQLite, WAL mode, every write in one transaction).

Two tables:

- ``runs``: one row per run of the grid: its id, the hash and JSON of its resolved training config, the varied
  parameters, the submission spec (executor kind and submitit parameters, so a run can be resubmitted without
  the grid file), its :class:`RunState`, the number of attempts, ``max_retries``, timestamps, final metrics and
  checkpoint paths.
- ``attempts``: one row per submission of a run (``attempt`` counts from 1): its job id (``1234_7`` for array
  task 7 of array 1234, the controller pid for a local job), its array task id, the scheduler's state, node,
  submitted/started/ended times and the tail of the job's error log. ``submitted_at`` is taken just before the
  submission, so that scheduler records of an older job under the same id (reused ids) can be told apart.

Cluster file systems: SQLite's WAL mode needs every writer on one host and is unsafe over NFS, Lustre and GPFS.
On such a file system (:func:`network_filesystem`, from ``/proc/mounts``) the database uses the rollback journal
(``journal_mode=DELETE``) instead, and the sweep records the host that owns it (:meth:`SweepState.claim_owner`):
a launcher or monitor on another host refuses, naming the owner, unless told to take over.

Schema versions: 1 (first), 2 (``attempts.array_task_id``). An older ``sweep.db`` is migrated when opened.

Only processes on the machine that launches the sweep (``sweeps/launch.py``, ``sweeps/monitor.py``) write here;
jobs on compute nodes write only their run directory, because SQLite's WAL mode needs every writer on one host
(it is unsafe over NFS). A sweep survives any of those processes being killed: each change is a transaction,
and re-opening the database rebuilds everything.

Example::

    state = SweepState(sweep_db_path(sweep_dir))
    for run in state.runs(RunState.active()):
        print(run.run_id, run.state, state.latest_attempt(run.run_id))
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from brats_ugrip.config import config_hash
from brats_ugrip.errors import BratsUgripError

SCHEMA_VERSION = 2


NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph",
                                 "fuse.ceph", "glusterfs", "fuse.glusterfs", "panfs", "fuse.sshfs", "9p", "wekafs"})
OWNER_KEY = "owner_host"


def network_filesystem(path: str | os.PathLike[str], mounts: str | None = None) -> str | None:
    """The type of the network file system ``path`` lies on (``nfs4``, ``lustre``, ``gpfs``…), or None for a local
    one (or where ``/proc/mounts`` cannot be read). ``mounts``: that file's text (for tests)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = str(Path(path).resolve())
    best, best_type = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type if best_type in NETWORK_FILESYSTEMS else None


class RunState(str, Enum):
    """Where a run stands. A run moves PENDING → SUBMITTED → RUNNING → COMPLETED, possibly through REQUEUED
    (timed out or preempted, its job requeued itself), TIMEOUT (timed out and not requeued), RETRYING
    (resubmitted by the monitor after a failure), FAILED (no retries left) or CANCELLED. Under a successive-halving
    schedule a run stops at a rung as PAUSED, with its checkpoints, until the monitor promotes it (RETRYING) or
    someone resumes it (``monitor.py --resume-paused``)."""

    PENDING = "PENDING"  # recorded, never submitted (new, or its submission failed)
    SUBMITTED = "SUBMITTED"  # accepted by the scheduler, waiting to start
    RUNNING = "RUNNING"
    REQUEUED = "REQUEUED"  # checkpointed and requeued by its job (timeout or preemption); resumes from last.ckpt
    TIMEOUT = "TIMEOUT"  # hit its time limit and was not requeued (e.g. too many timeouts); may be resubmitted
    RETRYING = "RETRYING"  # resubmitted after a failure, waiting to start again
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    PAUSED = "PAUSED"  # stopped cleanly at a successive-halving rung (sweeps/monitoring/promotion.py); may be continued

    @classmethod
    def active(cls) -> tuple[RunState, ...]:
        """States of runs that a scheduler holds (queued or running): never submit these again."""
        return (cls.SUBMITTED, cls.RUNNING, cls.REQUEUED, cls.RETRYING)

    @classmethod
    def final(cls) -> tuple[RunState, ...]:
        """States after which nothing happens unless someone retries the run."""
        return (cls.COMPLETED, cls.FAILED, cls.CANCELLED, cls.PAUSED)

    @property
    def is_active(self) -> bool:
        return self in RunState.active()

    @property
    def is_final(self) -> bool:
        return self in RunState.final()


@dataclass
class RunRecord:
    """One run of a sweep (a row of ``runs``).

    ``config`` is the resolved training config (a plain dict), ``config_hash`` its
    :func:`brats_ugrip.config.config_hash` (``run_dir`` and ``logging`` left out), ``params`` the varied values keyed
    by dotted key path, ``submit`` the submission spec (``brats_ugrip.sweeps.jobs.SubmitSpec.to_dict()``), times are Unix
    seconds.
    """

    run_id: str
    config: dict[str, Any]
    params: dict[str, Any]
    run_dir: str
    submit: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    state: RunState = RunState.PENDING
    attempts: int = 0
    max_retries: int = 0
    created_at: float | None = None
    updated_at: float | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        self.state = RunState(self.state)
        if not self.config_hash:
            self.config_hash = config_hash(self.config)


@dataclass
class AttemptRecord:
    """One submission of a run (a row of ``attempts``); ``state`` is the scheduler's word (sacct's state for
    SLURM, e.g. PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, CANCELLED, OUT_OF_MEMORY, NODE_FAIL, REQUEUED)."""

    run_id: str
    attempt: int
    job_id: str
    state: str = "PENDING"
    node: str | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    error_tail: str | None = None
    log_path: str | None = None
    array_task_id: int | None = None

    def __post_init__(self) -> None:
        if self.array_task_id is None:
            self.array_task_id = _task_of(self.job_id)

    @property
    def array_job_id(self) -> str:
        """The job id before ``_`` (the whole id for a job outside an array)."""
        return self.job_id.split("_", 1)[0]


def _task_of(job_id: str) -> int | None:
    """The array task id of ``1234_7`` (7); None for a job outside an array."""
    _, _, task = str(job_id).partition("_")
    return int(task) if task.isdigit() else None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config_hash TEXT NOT NULL,
    config_json TEXT NOT NULL,
    params_json TEXT NOT NULL,
    submit_json TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_retries INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    submitted_at REAL,
    started_at REAL,
    ended_at REAL,
    metrics_json TEXT NOT NULL DEFAULT '{}',
    best_checkpoint TEXT,
    last_checkpoint TEXT,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS attempts (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    attempt INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    state TEXT NOT NULL,
    node TEXT,
    submitted_at REAL,
    started_at REAL,
    ended_at REAL,
    error_tail TEXT,
    log_path TEXT,
    array_task_id INTEGER,
    PRIMARY KEY (run_id, attempt)
);
CREATE INDEX IF NOT EXISTS attempts_job ON attempts(job_id);
CREATE INDEX IF NOT EXISTS runs_state ON runs(state);
"""

_RUN_COLUMNS = ("run_id", "config_hash", "config_json", "params_json", "submit_json", "run_dir", "state", "attempts",
                "max_retries", "created_at", "updated_at", "submitted_at", "started_at", "ended_at", "metrics_json",
                "best_checkpoint", "last_checkpoint", "reason")
_RUN_UPDATABLE = {"state", "max_retries", "submitted_at", "started_at", "ended_at", "metrics", "best_checkpoint",
                  "last_checkpoint", "reason", "submit"}
_ATTEMPT_UPDATABLE = {"state", "node", "started_at", "ended_at", "error_tail", "log_path"}


class SweepStateError(BratsUgripError):
    """The sweep database cannot be opened, or a change would contradict what it holds."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


class SweepState:
    """Typed access to ``sweep.db``.

    Each method is one transaction; group several changes with ``with state.transaction():``. One instance per
    thread (SQLite connections are not shared across threads); any number of processes may open the same file.

    Args:
        path: the database file (see :func:`sweep_db_path`); created with its folder if missing.
        timeout_s: how long a writer waits for another process's transaction before failing.
    """

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = 30.0):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; ours are explicit BEGIN IMMEDIATE ... COMMIT.
            self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self.filesystem = network_filesystem(self.path.parent)
            if self.filesystem is None:
                self._enable_wal(timeout_s)
            else:  # WAL's shared memory does not work across hosts: the rollback journal does
                self._db.execute("PRAGMA journal_mode=DELETE")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._depth = 0
            with self.transaction():
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(statement)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                self._migrate()
        except (sqlite3.Error, OSError) as error:
            raise SweepStateError(f"{self.path}: cannot open the sweep database ({error}); "
                                  "check that the sweep directory exists and is writable") from error
        version = int(self.get_meta("schema_version") or SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise SweepStateError(f"{self.path}: schema version {version}, this code reads version {SCHEMA_VERSION}")

    def _migrate(self) -> None:
        """Bring an older ``sweep.db`` to :data:`SCHEMA_VERSION` (inside the opening transaction)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row["value"])
        if version == 1:  # 2: each attempt's array task id, a column of its own
            columns = {r["name"] for r in self._db.execute("PRAGMA table_info(attempts)")}
            if "array_task_id" not in columns:
                self._db.execute("ALTER TABLE attempts ADD COLUMN array_task_id INTEGER")
            self._db.execute("UPDATE attempts SET array_task_id = CAST(substr(job_id, instr(job_id, '_') + 1) "
                             "AS INTEGER) WHERE instr(job_id, '_') > 0")
            self._db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")

    def _enable_wal(self, timeout_s: float) -> None:
        # Switching to WAL (or opening a WAL file while another process commits) can report "database is locked"
        # at once, without SQLite's busy handler: retry it ourselves up to the same timeout.
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def close(self) -> None:
        self._db.close()

    def claim_owner(self, take_over: bool = False, host: str | None = None) -> str:
        """Record this host as the sweep's owner (the first to ask owns it); returns the owner.

        Raises:
            SweepStateError: another host owns the sweep and ``take_over`` is False.
        """
        host = host or socket.gethostname()
        with self.transaction():
            owner = self.get_meta(OWNER_KEY)
            if owner is not None and owner != host and not take_over:
                raise SweepStateError(
                    f"{self.path.parent}: this sweep is owned by host {owner!r} (this is {host!r}); sweep.db must be "
                    f"written from one host. Run the launcher/monitor on {owner}, or pass --take-over once that "
                    "host's monitor is stopped")
            if owner != host:
                self.set_meta(OWNER_KEY, host)
        return host

    def __enter__(self) -> SweepState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: takes the write lock at once); nested uses join the outer
        one. Commits on normal exit, rolls back on an exception."""
        if self._depth:
            self._depth += 1
            try:
                yield self._db
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")
        finally:
            self._depth = 0

    # --- meta ---------------------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                       (key, value))

    # --- runs ---------------------------------------------------------------------------------------------

    def add_runs(self, runs: Iterable[RunRecord]) -> list[str]:
        """Insert the runs that are not in the sweep yet; returns the ids added.

        A run already present with the same config is left as it is (whatever its state); one present with a
        different config is an error, and then nothing is added.
        """
        runs = list(runs)
        now = time.time()
        added = []
        with self.transaction() as db:
            for run in runs:
                row = db.execute("SELECT config_hash FROM runs WHERE run_id = ?", (run.run_id,)).fetchone()
                if row is not None:
                    if row["config_hash"] != run.config_hash:
                        raise SweepStateError(
                            f"{self.path}: run {run.run_id} already exists with a different config "
                            f"(hash {row['config_hash']}, now {run.config_hash}); launch the changed grid into a "
                            "new sweep directory, or give it a new name"
                        )
                    continue
                db.execute(
                    f"INSERT INTO runs ({', '.join(_RUN_COLUMNS)}) VALUES ({', '.join('?' * len(_RUN_COLUMNS))})",
                    (run.run_id, run.config_hash, _dumps(run.config), _dumps(run.params), _dumps(run.submit),
                     run.run_dir, RunState(run.state).value, run.attempts, run.max_retries, run.created_at or now, now,
                     run.submitted_at, run.started_at, run.ended_at, _dumps(run.metrics), run.best_checkpoint,
                     run.last_checkpoint, run.reason),
                )
                added.append(run.run_id)
        return added

    def replace_config(self, run: RunRecord) -> None:
        """Give an existing run a new resolved config (``launch --force``): it becomes PENDING with no metrics or
        checkpoints; its attempts stay (their numbers go on)."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE runs SET config_hash = ?, config_json = ?, params_json = ?, submit_json = ?, max_retries = ?, "
                "state = 'PENDING', started_at = NULL, ended_at = NULL, metrics_json = '{}', best_checkpoint = NULL, "
                "last_checkpoint = NULL, reason = 'config replaced by launch --force', updated_at = ? WHERE run_id = ?",
                (run.config_hash, _dumps(run.config), _dumps(run.params), _dumps(run.submit), run.max_retries,
                 time.time(), run.run_id))
            if cursor.rowcount == 0:
                raise SweepStateError(f"{self.path}: no run {run.run_id!r} in this sweep")

    def get_run(self, run_id: str) -> RunRecord:
        row = self._db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise SweepStateError(f"{self.path}: no run {run_id!r} in this sweep")
        return _run_from_row(row)

    def has_run(self, run_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is not None

    def runs(self, states: Iterable[RunState | str] | None = None) -> list[RunRecord]:
        """All runs (in insertion order), or those in ``states``."""
        if states is None:
            rows = self._db.execute("SELECT * FROM runs ORDER BY rowid").fetchall()
        else:
            wanted = [RunState(s).value for s in states]
            marks = ", ".join("?" * len(wanted))
            rows = self._db.execute(f"SELECT * FROM runs WHERE state IN ({marks}) ORDER BY rowid", wanted).fetchall()
        return [_run_from_row(r) for r in rows]

    def counts(self) -> dict[RunState, int]:
        """Number of runs per state (states without runs are absent)."""
        rows = self._db.execute("SELECT state, COUNT(*) AS n FROM runs GROUP BY state").fetchall()
        return {RunState(r["state"]): r["n"] for r in rows}

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Set some of: state, max_retries, submitted_at, started_at, ended_at, metrics (dict), best_checkpoint,
        last_checkpoint, reason, submit (dict)."""
        unknown = set(fields) - _RUN_UPDATABLE
        if unknown:
            raise TypeError(f"update_run: cannot set {sorted(unknown)}; settable: {sorted(_RUN_UPDATABLE)}")
        columns, values = [], []
        for key, value in fields.items():
            if key in ("metrics", "submit"):
                key, value = f"{key}_json", _dumps(value)
            elif key == "state":
                value = RunState(value).value
            columns.append(f"{key} = ?")
            values.append(value)
        columns.append("updated_at = ?")
        values.append(time.time())
        with self.transaction() as db:
            cursor = db.execute(f"UPDATE runs SET {', '.join(columns)} WHERE run_id = ?", (*values, run_id))
            if cursor.rowcount == 0:
                raise SweepStateError(f"{self.path}: no run {run_id!r} in this sweep")

    # --- attempts -----------------------------------------------------------------------------------------

    def record_submission(self, run_id: str, job_id: str, *, state: RunState = RunState.SUBMITTED,
                          submitted_at: float | None = None, log_path: str | None = None) -> AttemptRecord:
        """A new attempt of ``run_id`` was accepted by the scheduler as ``job_id``: add the attempt, count it,
        and set the run's state (SUBMITTED, or RETRYING for a resubmission)."""
        now = submitted_at or time.time()
        with self.transaction() as db:
            row = db.execute("SELECT attempts FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise SweepStateError(f"{self.path}: no run {run_id!r} in this sweep")
            attempt = row["attempts"] + 1
            db.execute("INSERT INTO attempts (run_id, attempt, job_id, state, submitted_at, log_path, array_task_id) "
                       "VALUES (?, ?, ?, 'PENDING', ?, ?, ?)", (run_id, attempt, job_id, now, log_path,
                                                                _task_of(job_id)))
            db.execute("UPDATE runs SET attempts = ?, state = ?, submitted_at = ?, started_at = NULL, ended_at = NULL, "
                       "reason = NULL, updated_at = ? WHERE run_id = ?",
                       (attempt, RunState(state).value, now, now, run_id))
        return self.attempt(run_id, attempt)

    def attempt(self, run_id: str, attempt: int) -> AttemptRecord:
        row = self._db.execute("SELECT * FROM attempts WHERE run_id = ? AND attempt = ?", (run_id, attempt)).fetchone()
        if row is None:
            raise SweepStateError(f"{self.path}: run {run_id!r} has no attempt {attempt}")
        return AttemptRecord(**dict(row))

    def attempts(self, run_id: str | None = None) -> list[AttemptRecord]:
        """Attempts of one run (oldest first), or of every run."""
        if run_id is None:
            rows = self._db.execute("SELECT * FROM attempts ORDER BY run_id, attempt").fetchall()
        else:
            rows = self._db.execute("SELECT * FROM attempts WHERE run_id = ? ORDER BY attempt", (run_id,)).fetchall()
        return [AttemptRecord(**dict(r)) for r in rows]

    def latest_attempts(self) -> dict[str, AttemptRecord]:
        """The latest attempt of every run that has one, by run id (one query, for pollers)."""
        rows = self._db.execute(
            "SELECT a.* FROM attempts a JOIN runs r ON a.run_id = r.run_id AND a.attempt = r.attempts").fetchall()
        return {r["run_id"]: AttemptRecord(**dict(r)) for r in rows}

    def latest_attempt(self, run_id: str) -> AttemptRecord | None:
        row = self._db.execute("SELECT a.* FROM attempts a JOIN runs r ON a.run_id = r.run_id AND "
                               "a.attempt = r.attempts WHERE r.run_id = ?", (run_id,)).fetchone()
        return AttemptRecord(**dict(row)) if row else None

    def update_attempt(self, run_id: str, attempt: int, **fields: Any) -> None:
        """Set some of: state, node, started_at, ended_at, error_tail, log_path."""
        unknown = set(fields) - _ATTEMPT_UPDATABLE
        if unknown:
            raise TypeError(f"update_attempt: cannot set {sorted(unknown)}; settable: {sorted(_ATTEMPT_UPDATABLE)}")
        if not fields:
            return
        columns = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as db:
            cursor = db.execute(f"UPDATE attempts SET {columns} WHERE run_id = ? AND attempt = ?",
                                (*fields.values(), run_id, attempt))
            if cursor.rowcount == 0:
                raise SweepStateError(f"{self.path}: run {run_id!r} has no attempt {attempt}")


def _run_from_row(row: sqlite3.Row) -> RunRecord:
    data = dict(row)
    return RunRecord(
        run_id=data["run_id"], config=json.loads(data["config_json"]), params=json.loads(data["params_json"]),
        submit=json.loads(data["submit_json"]), run_dir=data["run_dir"], config_hash=data["config_hash"],
        state=RunState(data["state"]), attempts=data["attempts"], max_retries=data["max_retries"],
        created_at=data["created_at"], updated_at=data["updated_at"], submitted_at=data["submitted_at"],
        started_at=data["started_at"], ended_at=data["ended_at"], metrics=json.loads(data["metrics_json"]),
        best_checkpoint=data["best_checkpoint"], last_checkpoint=data["last_checkpoint"], reason=data["reason"],
    )
