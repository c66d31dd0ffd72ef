"""The dashboard on a narrow terminal (100 columns, as a laptop's split tmux pane): the varied parameters, the
state and the reason of a failure stay; less needed columns go first. Piped, the monitor prints a plain table."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from test_monitor import ScriptedScheduler

from brats_ugrip.sweeps.layout import run_dir_path, sweep_db_path
from brats_ugrip.sweeps.monitoring.dashboard import ViewOptions, render
from brats_ugrip.sweeps.monitoring.engine import SweepMonitor
from brats_ugrip.sweeps.state import RunRecord, RunState, SweepState

REPO = Path(__file__).resolve().parents[1]
REASON = "FAILED (attempt 3): DataError: BraTS-SSA-00012-000 t2f: file missing; no retries left (2)"
CAUSE = REASON.split(": ", 1)[1][:40]  # the note drops the state and attempt, which have columns of their own


def _text(renderable, width: int) -> str:
    console = Console(width=width, record=True, file=open(os.devnull, "w"))
    console.print(renderable)
    return console.export_text()


def _long_sweep(sweep_dir: Path) -> None:
    """Runs with long ids (three varied keys) and one failure with a long reason."""
    records = []
    for fold in (0, 1):
        for lr in (0.001, 0.0027):
            for kernel in (3, 5):
                params = {"data.fold": fold, "optim.lr": lr, "model.kernel_size": kernel}
                run_id = f"fold={fold}-kernel_size={kernel}-lr={lr}"
                run_dir = run_dir_path(sweep_dir, run_id)
                records.append(RunRecord(run_id=run_id, config={"trainer": {"max_epochs": 4}}, params=params,
                                         run_dir=str(run_dir), submit={"cluster": "local", "parameters": {}}))
    with SweepState(sweep_db_path(sweep_dir)) as state:
        state.add_runs(records)
        state.set_meta("name", "ssa_kernels")
        state.update_run(records[1].run_id, state=RunState.FAILED, reason=REASON, ended_at=time.time())


def test_a_100_column_frame_keeps_parameters_state_and_reason(tmp_path):
    _long_sweep(tmp_path)
    scheduler = ScriptedScheduler()
    monitor = SweepMonitor(tmp_path, sources=[scheduler], submit=scheduler.submit)
    try:
        frame = _text(render(monitor.snapshot(), ViewOptions(), height=40, width=100), 100).splitlines()
    finally:
        monitor.close()
    assert max(len(line) for line in frame) <= 100
    heading = next(line for line in frame if "state" in line.split())
    assert all(column in heading.split() for column in ("fold", "kernel_size", "lr", "state", "note"))
    failed = next(line for line in frame if line.split()[3:4] == ["FAILED"])
    assert failed.split()[:3] == ["0", "5", "0.001"]  # the run's parameters, each in its own column
    assert "DataError: BraTS-SSA-00012" in failed  # why it failed is on screen, not cut away
    rows = [line for line in frame if line.split()[:1] in (["0"], ["1"])]
    assert len(rows) == 8 and len({tuple(r.split()[:3]) for r in rows}) == 8  # every run told apart
    wide = _text(render(SweepMonitor(tmp_path, sources=[scheduler]).snapshot(), ViewOptions(), width=250), 250)
    assert "fold=0-kernel_size=5-lr=0.001" in wide and "job" in wide.split()  # with room, every column is there


def test_piped_monitor_prints_a_plain_table(tmp_path):
    _long_sweep(tmp_path)
    with SweepState(sweep_db_path(tmp_path)) as state:  # nothing left to watch: one table, then exit
        for run in state.runs():
            if run.state != RunState.FAILED:
                state.update_run(run.run_id, state=RunState.CANCELLED, ended_at=time.time())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    piped = subprocess.run([sys.executable, str(REPO / "sweeps" / "monitor.py"), str(tmp_path), "--interval", "1"],
                           capture_output=True, text=True, env=env, timeout=120)
    lines = piped.stdout.splitlines()
    assert piped.returncode == 1, piped.stderr  # not every run completed
    assert any("CANCELLED" in line.split() for line in lines) and any(CAUSE in line for line in lines)
    compact = subprocess.run([sys.executable, str(REPO / "sweeps" / "monitor.py"), str(tmp_path), "--interval", "1",
                              "--compact"], capture_output=True, text=True, env=env, timeout=120)
    assert compact.stdout.splitlines()[0].split()[1] == "ssa_kernels:"  # the one-line status
    assert not any(CAUSE in line for line in compact.stdout.splitlines())  # no run rows
