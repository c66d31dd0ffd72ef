"""The rules behind the SLURM fault handling of issue 29, on hand-worked inputs (no cluster): held reasons, a
signal in sacct's DerivedExitCode, who cancelled a job, squeue's answer, and the accounting-outage record."""
from __future__ import annotations

from brats_ugrip.slurm.sacct import parse_sacct
from brats_ugrip.slurm.squeue import parse_squeue, squeue_command
from brats_ugrip.sweeps.job_states import hold_reason, killed_by_signal, may_be_requeued
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.monitoring.snapshot import record_states_unavailable, states_unavailable_since
from brats_ugrip.sweeps.state import SweepState


def test_hold_reasons():
    assert hold_reason("JobHeldUser") == "held by its user (scontrol hold)"
    assert hold_reason("JobHeldAdmin") == "held by an administrator"
    assert hold_reason("JobArrayTaskLimit") is None and hold_reason(None) is None


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
    assert parse_squeue("12_1|JobHeldAdmin\n12_2|JobArrayTaskLimit\n\nnoise\n") == {
        "12_1": "JobHeldAdmin", "12_2": "JobArrayTaskLimit"}
    assert squeue_command(["12_1", "12_2", "9"]) == ["squeue", "-h", "-r", "-t", "PD", "-j", "9,12", "-o", "%i|%r"]


def test_accounting_outage_keeps_the_first_failure_until_an_answer(tmp_path):
    with SweepState(sweep_db_path(tmp_path)) as state:
        assert states_unavailable_since(state) == {}
        record_states_unavailable(state, "slurm", 100.0)
        record_states_unavailable(state, "slurm", 160.0)  # a later failure: the first time stays
        assert states_unavailable_since(state) == {"slurm": 100.0}
        record_states_unavailable(state, "slurm", None)
        assert states_unavailable_since(state) == {}
