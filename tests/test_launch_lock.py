"""One launcher per sweep: two launches of one grid into one sweep directory, started together many times, submit
every run exactly once (the launcher plans and submits under the monitor's lock)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from brats_ugrip.data import make_datalist, save_datalist
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.state import SweepState

REPO = Path(__file__).resolve().parents[1]
TRIES = 8

# Each process launches the grid into sweep0 … sweep{TRIES-1}; before each launch both processes meet at a barrier
# (a file per process), so the two launches of one directory start together. Submission is the real code path
# down to the executor: only submitit's ``executor.submit`` is replaced by a stub that appends a line to a log
# (a real local job would train), so each line is one submission that would have started a job.
LAUNCHER = r'''
import itertools, os, sys, time
from pathlib import Path
from types import SimpleNamespace
import submitit
from brats_ugrip.sweeps import launch

root, me, tries = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
counter = itertools.count()

def fake_submit(self, function, *args, **kwargs):
    job_id = f"{os.getpid()}{next(counter):04d}"
    with open(root / "submissions.log", "a") as log:
        log.write(f"{Path(function.run_dir).name} {job_id}\n")
    return SimpleNamespace(job_id=job_id, paths=SimpleNamespace(stderr=root / "none.err"))

submitit.AutoExecutor.submit = fake_submit
for i in range(tries):
    (root / f"ready{i}-{me}").touch()
    while len(list(root.glob(f"ready{i}-*"))) < 2:
        time.sleep(0.005)
    launch.main([str(root / "grid.yaml"), "--sweep-dir", str(root / f"sweep{i}"), "--no-watch"])
'''


def test_two_launchers_started_together_submit_each_run_once(tmp_path, phantom_dir):
    datalist = tmp_path / "datalist.json"
    save_datalist(make_datalist(phantom_dir, 3, 0), datalist)
    grid = {"name": "race", "base": {"data": {"datalist": str(datalist), "roi_size": [32, 32, 32]},
                                     "model": {"name": "segresnet", "init_filters": 8},
                                     "trainer": {"max_epochs": 1, "accelerator": "cpu"},
                                     "logging": {"mode": "disabled"}},
            "grid": {"optim.lr": [0.001, 0.01], "data.fold": [0, 1]}, "executor": {"cluster": "local"}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path), name, str(TRIES)], cwd=REPO,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for name in ("a", "b")]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    lines = (tmp_path / "submissions.log").read_text().splitlines()
    assert len(lines) == TRIES * 4, lines  # 4 runs per sweep directory, each submitted once
    for i in range(TRIES):
        with SweepState(sweep_db_path(tmp_path / f"sweep{i}")) as state:
            assert [r.attempts for r in state.runs()] == [1, 1, 1, 1]
    # One of each pair found everything submitted: it says so instead of submitting again.
    assert sum(out.count("4 runs submitted") for out in outputs) == TRIES
    assert sum(out.count("0 runs submitted, 4 already in the sweep") for out in outputs) == TRIES
