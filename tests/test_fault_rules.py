"""The rules behind the SLURM fault handling of issue 29, on hand-worked inputs (no cluster): held reasons, a
signal in sacct's DerivedExitCode, who cancelled a job, squeue's answer, a pending task gone from the
controller and accounting, and the accounting-outage record."""
from __future__ import annotations

import json

import pytest

from brats_ugrip.slurm.sacct import SacctError, parse_sacct
from brats_ugrip.slurm.squeue import ControllerJob, parse_squeue, squeue_command
from brats_ugrip.sweeps.job_states import (
    GONE_WHILE_PENDING,
    SlurmJobStates,
    hold_reason,
    job_state_word,
    killed_by_signal,
    may_be_requeued,
)
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.monitoring.snapshot import record_states_unavailable, states_unavailable_since
from brats_ugrip.sweeps.state import SweepState


def test_hold_reasons():
    assert hold_reason("JobHeldUser") == "held by its user (scontrol hold)"
    assert hold_reason("JobHeldAdmin") == "held by an administrator"
    assert hold_reason("JobArrayTaskLimit") is None and hold_reason(None) is None


def test_cgroup_oom_reads_as_out_of_memory():
    # a submitit job whose srun step the cgroup OOM killer ended, as sacct -X -P recorded it on the dev cluster:
    # the allocation FAILED 1:0, DerivedExitCode 0:125 (SLURM's SIG_OOM 253 less the signal flag 128)
    line = "372|FAILED|localhost|4|1:0|2026-12-06T22:08:04|2026-12-06T22:08:08|None|2026-12-06T22:08:03|0:125\n"
    (record,) = parse_sacct(line)["372"]
    assert job_state_word(record.state, record.derived_exit_code) == "OUT_OF_MEMORY"
    assert killed_by_signal(record.derived_exit_code).startswith("it ran out of memory")
    assert job_state_word("FAILED", "0:9") == "FAILED" and job_state_word("COMPLETED", "0:125") == "COMPLETED"
    assert job_state_word("FAILED", "1:0") == "FAILED" and job_state_word("FAILED", None) == "FAILED"


def test_signal_from_derived_exit_code():
    assert killed_by_signal("0:9").startswith("its process was killed by SIGKILL (out of memory")
    assert killed_by_signal("0:15") == "its process was killed by SIGTERM"
    assert killed_by_signal("0:0") is None and killed_by_signal("1:0") is None and killed_by_signal(None) is None


def test_node_fail_may_be_requeued_other_failures_not():
    assert may_be_requeued("NODE_FAIL") and not may_be_requeued("FAILED") and not may_be_requeued("OUT_OF_MEMORY")


def test_sacct_line_with_cancelling_uid_and_derived_exit_code():
    line = "7_1|CANCELLED by 1000|localhost|3|0:15|2026-12-06T19:00:00|2026-12-06T19:00:03|None|" \
           "2026-12-06T18:59:59|0:15\n"
    (record,) = parse_sacct(line)["7_1"]
    assert (record.state, record.cancelled_by, record.derived_exit_code) == ("CANCELLED", "1000", "0:15")
    (old,) = parse_sacct(line.rsplit("|", 1)[0] + "\n")["7_1"]  # a 9-field answer recorded before the field
    assert old.derived_exit_code is None and old.cancelled_by == "1000"


def test_squeue_answer_and_command():
    assert parse_squeue("12_1|PENDING|JobHeldAdmin\n12_2|RUNNING|None\n\nnoise\n12_3|PENDING\n") == {
        "12_1": ControllerJob("PENDING", "JobHeldAdmin"), "12_2": ControllerJob("RUNNING", "None")}
    assert squeue_command(["12_1", "12_2", "9"]) == ["squeue", "-h", "-r", "-t", "all", "-j", "9,12", "-o",
                                                     "%i|%T|%r"]


# sacct -X -n -P answers (fields of slurm/sacct.SACCT_FIELDS) recorded on the dev cluster's SLURM 22.05: task 3 of
# array 263 was scancelled while pending; accounting first kept it in the array's pending record, then dropped it.
PENDING_RECORD = "263_[1-9%1]|PENDING|None|0|0:0|2026-12-06T21:41:00|Unknown|JobArrayTaskLimit|" \
                 "2026-12-06T21:41:00|0:0\n"
DROPPED_RECORD = "263_[2,4-6,9%1]|PENDING|None|0|0:0|2026-12-06T21:41:00|Unknown|JobArrayTaskLimit|" \
                 "2026-12-06T21:41:00|0:0\n"


def _statuses(tmp_path, sacct_text: str, controller: dict, started: bool = False) -> dict:
    calls = []

    def ask_controller(job_ids, timeout_s):
        calls.append(sorted(job_ids))
        return controller

    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    if started:
        (run_dir / "job.json").write_text(json.dumps({"starts": [{"job_id": "263_3", "start_epoch": 0}]}))
    source = SlurmJobStates(query=lambda ids, timeout_s: parse_sacct(sacct_text), controller=ask_controller)
    return source.statuses({"263_3": run_dir, "263_4": run_dir}), calls


def test_a_task_gone_while_pending_is_cancelled(tmp_path):
    held = {"263_4": ControllerJob("PENDING", "JobArrayTaskLimit")}
    for text in (PENDING_RECORD, DROPPED_RECORD):  # still listed pending by accounting, or dropped by it
        statuses, calls = _statuses(tmp_path, text, held)
        assert calls == [["263_3", "263_4"]]  # one controller query, for both
        assert statuses["263_3"].state == "CANCELLED" and statuses["263_3"].reason == GONE_WHILE_PENDING
        assert statuses["263_4"].state == "PENDING" and statuses["263_4"].reason == "JobArrayTaskLimit"


def test_a_missing_answer_concludes_nothing(tmp_path):
    # the job started once (job.json): gone from both is not "never started"; it stays as sacct has it
    statuses, _ = _statuses(tmp_path, PENDING_RECORD, {}, started=True)
    assert statuses["263_3"].state == "PENDING"
    statuses, _ = _statuses(tmp_path, DROPPED_RECORD, {}, started=True)
    assert "263_3" not in statuses
    # the controller holds it (e.g. not yet sent to accounting): nothing concluded either
    statuses, _ = _statuses(tmp_path, DROPPED_RECORD, {"263_3": ControllerJob("PENDING", "Priority")})
    assert "263_3" not in statuses

    def down(job_ids, timeout_s):
        raise SacctError("slurm_load_jobs error: Unable to contact slurm controller")

    source = SlurmJobStates(query=lambda ids, timeout_s: parse_sacct(DROPPED_RECORD), controller=down)
    assert "263_3" not in source.statuses({"263_3": tmp_path, "263_4": tmp_path})


def test_accounting_outage_keeps_the_first_failure_until_an_answer(tmp_path):
    with SweepState(sweep_db_path(tmp_path)) as state:
        assert states_unavailable_since(state) == {}
        record_states_unavailable(state, "slurm", 100.0)
        record_states_unavailable(state, "slurm", 160.0)  # a later failure: the first time stays
        assert states_unavailable_since(state) == {"slurm": 100.0}
        record_states_unavailable(state, "slurm", None)
        assert states_unavailable_since(state) == {}


def test_squeue_on_one_job_it_no_longer_holds(monkeypatch):
    # squeue's answers on the dev cluster: asked about one array it no longer holds, it fails (exit 1, "Invalid job
    # id specified"); asked about two, it lists none. Both read as "holds none of them"; other failures stand.
    from brats_ugrip.slurm import squeue

    def invalid(command, timeout_s):
        raise SacctError("squeue failed (exit 1): slurm_load_jobs error: Invalid job id specified")

    monkeypatch.setattr(squeue, "run_query", invalid)
    assert squeue.query_controller(["99999_1", "99999_2"]) == {}
    with pytest.raises(SacctError):  # several arrays: squeue would have answered, so this is a real failure
        squeue.query_controller(["99999_1", "99998"])

    def down(command, timeout_s):
        raise SacctError("squeue failed (exit 1): slurm_load_jobs error: Unable to contact slurm controller")

    monkeypatch.setattr(squeue, "run_query", down)
    with pytest.raises(SacctError):
        squeue.query_controller(["99999_1"])
