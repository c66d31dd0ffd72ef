"""sweep.db: transactions, persistence across processes, no double insert, typed records."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from brats_ugrip.sweeps.layout import run_dir_path, sweep_db_path
from brats_ugrip.sweeps.state import AttemptRecord, RunRecord, RunState, SweepState, SweepStateError


def _record(run_id: str, lr: float = 1e-3, sweep_dir: str = "/sweep") -> RunRecord:
    config = {"optim": {"lr": lr}, "data": {"fold": 0}, "run_dir": str(run_dir_path(sweep_dir, run_id))}
    return RunRecord(run_id=run_id, config=config, params={"optim.lr": lr}, run_dir=config["run_dir"],
                     submit={"cluster": "local", "parameters": {}}, max_retries=2)


@pytest.fixture
def state(tmp_path):
    with SweepState(sweep_db_path(tmp_path)) as opened:
        yield opened


def test_runs_round_trip_with_types(state):
    added = state.add_runs([_record("lr=0.001"), _record("lr=0.01", 0.01)])
    assert added == ["lr=0.001", "lr=0.01"]
    run = state.get_run("lr=0.01")
    assert isinstance(run, RunRecord) and run.state is RunState.PENDING
    assert run.config["optim"]["lr"] == 0.01 and run.params == {"optim.lr": 0.01} and run.max_retries == 2
    assert run.created_at is not None and run.attempts == 0
    assert [r.run_id for r in state.runs([RunState.PENDING])] == ["lr=0.001", "lr=0.01"]
    assert state.counts() == {RunState.PENDING: 2}
    assert state._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_adding_again_inserts_nothing_and_keeps_state(state):
    state.add_runs([_record("a")])
    state.record_submission("a", "101_0")
    assert state.add_runs([_record("a"), _record("b", 0.5)]) == ["b"]
    assert state.get_run("a").state is RunState.SUBMITTED and state.get_run("a").attempts == 1
    assert len(state.runs()) == 2


def test_changed_config_is_refused_and_nothing_added(state):
    state.add_runs([_record("a", 0.1)])
    with pytest.raises(SweepStateError, match="run a already exists with a different config"):
        state.add_runs([_record("new"), _record("a", 0.2)])
    assert not state.has_run("new")
    assert state.get_run("a").config["optim"]["lr"] == 0.1


def test_run_dir_and_logging_do_not_change_the_hash(state):
    record = _record("a")
    moved = _record("a", sweep_dir="/elsewhere")
    moved.config["logging"] = {"run_name": "other"}
    assert RunRecord(**{**moved.__dict__, "config_hash": ""}).config_hash == record.config_hash


def test_attempts_count_and_latest(state):
    state.add_runs([_record("a"), _record("b")])
    first = state.record_submission("a", "200_0", log_path="/logs/200_0.err")
    assert isinstance(first, AttemptRecord) and first.attempt == 1 and first.array_job_id == "200"
    assert first.array_task_id == 0
    state.update_attempt("a", 1, state="FAILED", node="node7", ended_at=5.0, error_tail="CUDA out of memory")
    state.update_run("a", state=RunState.FAILED, reason="OOM")
    second = state.record_submission("a", "300", state=RunState.RETRYING)
    assert second.attempt == 2 and second.array_task_id is None
    run = state.get_run("a")
    assert run.attempts == 2 and run.state is RunState.RETRYING and run.reason is None
    assert [a.job_id for a in state.attempts("a")] == ["200_0", "300"]
    assert state.attempts("a")[0].error_tail == "CUDA out of memory" and state.attempts("a")[0].node == "node7"
    assert state.latest_attempt("a").job_id == "300" and state.latest_attempt("b") is None
    assert set(state.latest_attempts()) == {"a"}


def test_updates_are_checked(state):
    state.add_runs([_record("a")])
    with pytest.raises(TypeError, match="cannot set"):
        state.update_run("a", attempts=5)
    with pytest.raises(SweepStateError, match="no run 'zz'"):
        state.update_run("zz", state=RunState.RUNNING)
    with pytest.raises(SweepStateError, match="has no attempt 1"):
        state.update_attempt("a", 1, state="RUNNING")
    with pytest.raises(ValueError):
        state.update_run("a", state="NOT_A_STATE")


def test_metrics_and_checkpoints(state):
    state.add_runs([_record("a")])
    state.update_run("a", state=RunState.COMPLETED, metrics={"best_val_dice": 0.81, "per_region": {"ET": 0.7}},
                     best_checkpoint="/x/best.ckpt", last_checkpoint="/x/last.ckpt", ended_at=10.0)
    run = state.get_run("a")
    assert run.metrics["per_region"]["ET"] == 0.7 and run.best_checkpoint == "/x/best.ckpt"
    assert run.state.is_final and not run.state.is_active


def test_transaction_rolls_back_everything_on_error(state):
    state.add_runs([_record("a")])
    with pytest.raises(RuntimeError):
        with state.transaction():
            state.record_submission("a", "1")
            state.add_runs([_record("b")])
            raise RuntimeError("crash between writes")
    assert state.get_run("a").attempts == 0 and state.attempts("a") == [] and not state.has_run("b")


def test_persists_and_is_shared_across_processes(tmp_path):
    """Two processes add the same runs and record submissions at the same time: no duplicate, no lost update."""
    db = sweep_db_path(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        from brats_ugrip.sweeps.state import RunRecord, SweepState
        state = SweepState({str(db)!r})
        for i in range(40):
            record = RunRecord(run_id=f"r{{i}}", config={{"i": i}}, params={{"i": i}}, run_dir=f"/r{{i}}")
            with state.transaction():
                state.add_runs([record])
                state.record_submission(f"r{{i}}", f"{{sys.argv[1]}}_{{i}}")
    """)
    workers = [subprocess.Popen([sys.executable, "-c", script, tag]) for tag in ("100", "200")]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    with SweepState(db) as state:
        runs = state.runs()
        assert len(runs) == 40 and all(r.attempts == 2 for r in runs)
        jobs = [a.job_id.split("_")[0] for a in state.attempts()]
        assert sorted(jobs) == ["100"] * 40 + ["200"] * 40
        assert all(sorted(a.attempt for a in state.attempts(r.run_id)) == [1, 2] for r in runs)


def test_a_killed_writer_leaves_no_partial_transaction(tmp_path):
    db = sweep_db_path(tmp_path)
    with SweepState(db) as state:
        state.add_runs([_record("a")])
    script = textwrap.dedent(f"""
        import os, signal
        from brats_ugrip.sweeps.state import RunRecord, SweepState
        state = SweepState({str(db)!r})
        with state.transaction():
            state.record_submission("a", "7")
            state.add_runs([RunRecord(run_id="b", config={{}}, params={{}}, run_dir="/b")])
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    worker = subprocess.run([sys.executable, "-c", script], check=False)
    assert worker.returncode == -signal.SIGKILL
    with SweepState(db) as state:
        assert state.get_run("a").attempts == 0 and not state.has_run("b")
        state.record_submission("a", "8")  # the write lock was released with the dead process
        assert state.latest_attempt("a").job_id == "8"


def test_unopenable_database_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SweepStateError, match="cannot open the sweep database"):
        SweepState(blocker / "sweep.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(SweepStateError, match="cannot open"):
        SweepState(garbage)
    assert not isinstance(SweepStateError("x"), sqlite3.Error)


def test_schema_1_database_is_migrated(tmp_path):
    """A sweep.db written before attempts had their own array task id column opens, gains the column (filled from
    the job ids) and reports schema version 2."""
    import sqlite3

    path = tmp_path / "sweep.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, config_hash TEXT NOT NULL, config_json TEXT NOT NULL,
            params_json TEXT NOT NULL, submit_json TEXT NOT NULL, run_dir TEXT NOT NULL, state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, max_retries INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
            updated_at REAL NOT NULL, submitted_at REAL, started_at REAL, ended_at REAL,
            metrics_json TEXT NOT NULL DEFAULT '{}', best_checkpoint TEXT, last_checkpoint TEXT, reason TEXT);
        CREATE TABLE attempts (run_id TEXT NOT NULL, attempt INTEGER NOT NULL, job_id TEXT NOT NULL,
            state TEXT NOT NULL, node TEXT, submitted_at REAL, started_at REAL, ended_at REAL, error_tail TEXT,
            log_path TEXT, PRIMARY KEY (run_id, attempt));
        INSERT INTO runs VALUES ('a', 'h', '{}', '{}', '{}', '/r/a', 'SUBMITTED', 2, 1, 1, 1, 5, NULL, NULL, '{}',
            NULL, NULL, NULL);
        INSERT INTO attempts VALUES ('a', 1, '77_12', 'FAILED', NULL, 1, NULL, 3, NULL, NULL);
        INSERT INTO attempts VALUES ('a', 2, '80', 'PENDING', NULL, 5, NULL, NULL, NULL, NULL);
    """)
    db.commit()
    db.close()
    with SweepState(path) as state:
        assert state.get_meta("schema_version") == "2"
        first, second = state.attempts("a")
        assert (first.array_task_id, second.array_task_id) == (12, None)
        assert second.submitted_at == 5
        state.record_submission("a", "81_3")
        assert state.latest_attempt("a").array_task_id == 3
    raw = sqlite3.connect(path).execute("SELECT array_task_id FROM attempts ORDER BY attempt").fetchall()
    assert raw == [(12,), (None,), (3,)]


def test_sweep_owned_by_one_host_and_network_filesystems_detected(tmp_path, monkeypatch):
    from brats_ugrip.sweeps import state as state_module
    from brats_ugrip.sweeps.state import network_filesystem

    mounts = ("/dev/sda1 / ext4 rw 0 0\n"
              "server:/export /proj nfs4 rw,relatime 0 0\n"
              "/dev/sdb1 /proj/local xfs rw 0 0\n"
              "fs1@o2ib:/lustre /lustre lustre rw 0 0\n")
    assert network_filesystem("/proj/sweeps/a", mounts) == "nfs4"
    assert network_filesystem("/proj/local/a", mounts) is None  # the longest mount point wins
    assert network_filesystem("/lustre/x", mounts) == "lustre"
    assert network_filesystem("/projx", mounts) is None  # a name prefix is not a mount prefix
    with SweepState(tmp_path / "a" / "sweep.db") as state:
        assert state.claim_owner(host="login1") == "login1"
        assert state.claim_owner(host="login1") == "login1"
        with pytest.raises(SweepStateError, match="owned by host 'login1'.*--take-over"):
            state.claim_owner(host="login2")
        assert state.claim_owner(take_over=True, host="login2") == "login2"
        assert state.get_meta("owner_host") == "login2"
    # On a network file system the database runs in rollback-journal mode, not WAL.
    monkeypatch.setattr(state_module, "network_filesystem", lambda path: "nfs4")
    with SweepState(tmp_path / "b" / "sweep.db") as state:
        assert state._db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    monkeypatch.undo()
    with SweepState(tmp_path / "a" / "sweep.db") as state:  # a local one: WAL
        assert state._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
