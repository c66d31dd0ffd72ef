"""The monitor's dashboard in a real terminal: tmux runs ``sweeps/monitor.py`` while a small local sweep trains,
``tmux capture-pane`` reads the screen, and the test asserts on what a person would see: one row per run, states,
the epoch progress bar, the header's counts and best run, and the final table.

Needs ``tmux`` (``apt-get install -y tmux``); skipped without it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brats_ugrip.data import make_datalist, save_datalist
from brats_ugrip.sweeps.monitoring.collect import verify_collected

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 100, 40  # a laptop's split tmux pane: the narrow case (issue 18)

pytestmark = pytest.mark.slow


DONE = "monitor exited with"


class TmuxPane:
    """A detached tmux session on its own server socket, running one command; a shell line after it prints the
    command's exit code and keeps the pane open, so the last screen can still be read (tmux's remain-on-exit
    loses the top line of a dead pane)."""

    def __init__(self, name: str, command: str, env: dict[str, str]):
        self.base = ["tmux", "-L", name]
        subprocess.run([*self.base, "-f", "/dev/null", "new-session", "-d", "-s", name, "-x", str(WIDTH), "-y",
                        str(HEIGHT), f"{command}; echo {DONE} $?; sleep 600"], check=True, env=env)
        self.name = name
        self.socket = Path(subprocess.run([*self.base, "display-message", "-p", "#{socket_path}"], capture_output=True,
                                          text=True, check=True).stdout.strip())

    def screen(self) -> str:
        return subprocess.run([*self.base, "capture-pane", "-p", "-t", self.name], capture_output=True, text=True,
                              check=True).stdout

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)
        self.socket.unlink(missing_ok=True)


def _rows(screen: str, run_ids: list[str]) -> dict[str, str]:
    return {run_id: line for line in screen.splitlines() for run_id in run_ids if line.startswith(run_id + " ")}


def test_dashboard_in_tmux_while_a_local_sweep_trains(tmp_path, phantom_dir, tiny_run_base, launch_sweep):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    datalist = tmp_path / "datalist.json"
    save_datalist(make_datalist(phantom_dir, n_folds=2, seed=0), datalist)
    grid = {
        "name": "tmux_demo",
        "base": tiny_run_base(datalist, max_epochs=2),
        "grid": {"optim.lr": [0.001, 0.01]},
        "max_retries": 0,
        "executor": {"cluster": "local", "array_parallelism": 2},
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm-256color"}
    sweep_dir = launch_sweep(grid, tmp_path, env)
    run_ids = ["lr=0.001", "lr=0.01"]
    pane = TmuxPane(f"brats-monitor-{os.getpid()}",
                    f"cd {REPO} && {sys.executable} sweeps/monitor.py {sweep_dir} --interval 1", env)
    seen_states: dict[str, set[str]] = {run_id: set() for run_id in run_ids}
    seen_progress: set[str] = set()
    screens = []
    try:
        deadline = time.time() + 600
        while True:
            screen = pane.screen()
            screens.append(screen)
            for run_id, row in _rows(screen, run_ids).items():
                seen_states[run_id].update(word for word in ("SUBMITTED", "RUNNING", "COMPLETED") if word in row)
                seen_progress.update(p for p in ("0/2", "1/2", "2/2") if p in row)
            if DONE in screen:
                break
            assert time.time() < deadline, screen
            time.sleep(0.5)
        final = screen
    finally:
        pane.close()
    # While it trained, a person saw each run running, and the epoch bar moving.
    assert all("RUNNING" in states for states in seen_states.values()), seen_states
    assert {"1/2", "2/2"} <= seen_progress, seen_progress
    live = next(s for s in screens if "RUNNING" in s)
    assert all(len(line) <= WIDTH for screen in screens for line in screen.splitlines())
    assert "sweep tmux_demo" in live and "RUNNING" in live.splitlines()[1]
    assert all(column in live for column in ("run", "lr", "state", "epoch", "best Dice", "ETA"))
    # The last screen: every run completed, the bar full, the header's counts and the best run.
    lines = final.splitlines()
    assert f"{DONE} 0" in final  # every run completed: exit code 0
    assert lines[0].startswith("sweep tmux_demo") and "COMPLETED 2" in lines[1] and "GPU-hours" in lines[1]
    assert lines[2].startswith("best: lr=0.0")
    rows = _rows(final, run_ids)
    assert set(rows) == set(run_ids), final
    for row in rows.values():
        assert "COMPLETED" in row and "██████████ 2/2" in row and " 1/1 " in row  # attempt 1 of 1
    for run_id in run_ids:
        assert verify_collected(sweep_dir, run_id)
