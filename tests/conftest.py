"""Shared test settings: offline W&B, few threads (CI has 2 cores), small phantoms."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolate_cwd_side_effects(monkeypatch, tmp_path_factory):
    """Keep W&B and Lightning from writing into the repository."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """Six 48³ BraTS-2023-named phantom cases (seed 0), written once per test session; returns their folder."""
    from brats_ugrip.synthetic.phantom import write_phantoms

    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, n_cases=6, size=48, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_run_base():
    """``base(datalist, max_epochs=1)``: the base run config of the sweep tests (a width-8 SegResNet on one 32³
    patch per epoch and one validation case, CPU, no W&B)."""

    def base(datalist, max_epochs: int = 1) -> dict:
        return {"data": {"datalist": str(datalist), "roi_size": [32, 32, 32], "batch_size": 1, "num_workers": 0},
                "model": {"name": "segresnet", "init_filters": 8}, "optim": {"name": "adamw_sf", "lr": 0.003},
                "trainer": {"max_epochs": max_epochs, "accelerator": "cpu", "limit_train_batches": 1,
                            "limit_val_batches": 1, "log_every_n_steps": 1, "cudnn_benchmark": False},
                "inference": {"sw_batch_size": 1, "overlap": 0.0}, "logging": {"mode": "disabled"}}

    return base


@pytest.fixture(scope="session")
def launch_sweep():
    """``launch(grid, directory, env)``: write ``grid`` to ``directory/grid.yaml``, submit it with
    ``sweeps/launch.py --no-watch`` (which must succeed) and return the sweep folder ``directory/sweep``."""
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[1]

    def launch(grid: dict, directory, env: dict):
        grid_path, sweep_dir, log_path = directory / "grid.yaml", directory / "sweep", directory / "launch.log"
        grid_path.write_text(yaml.safe_dump(grid))
        with open(log_path, "w") as log:  # not a pipe: local jobs inherit it and would hold it open until they end
            launched = subprocess.run([sys.executable, str(repo / "sweeps" / "launch.py"), str(grid_path),
                                       "--sweep-dir", str(sweep_dir), "--no-watch"],
                                      stdout=log, stderr=subprocess.STDOUT, cwd=repo, env=env)
        assert launched.returncode == 0, log_path.read_text()
        return sweep_dir

    return launch


@pytest.fixture(scope="session")
def retry_grid(phantom_dir, tiny_run_base):
    """``retry_grid(directory, executor) -> (grid, bad)``: the monitor tests' sweep of three one-epoch runs, two on
    a good datalist (two learning rates) and one on the datalist ``bad``, which the test deletes after launch so
    that run fails at every attempt; ``max_retries: 1``."""
    from brats_ugrip.data import make_datalist, save_datalist

    def grid(directory: Path, executor: dict) -> tuple[dict, Path]:
        good, bad = directory / "good.json", directory / "bad.json"
        save_datalist(make_datalist(phantom_dir, n_folds=2, seed=0), good)
        bad.write_text(good.read_text())
        return {"name": f"monitor_{executor['cluster']}", "base": tiny_run_base(good),
                "grid": {"data.datalist": [str(good), str(bad)], "optim.lr": [0.001, 0.01]},
                "exclude": [{"data.datalist": str(bad), "optim.lr": 0.01}],
                "max_retries": 1, "executor": executor}, bad

    return grid


@pytest.fixture
def fold_datalist(tmp_path):
    """A datalist path with six cases in folds 0–2 and no images (grids check folds; nothing reads images)."""
    import json

    entries = [{"case_id": f"c{i}", "fold": i % 3, "image": [f"c{i}/{m}.nii.gz" for m in "abcd"],
                "label": f"c{i}/seg.nii.gz"} for i in range(6)]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": entries}))
    return str(path)
