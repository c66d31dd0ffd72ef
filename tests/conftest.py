"""Shared test settings: offline W&B, few threads (CI has 2 cores), small phantoms."""
from __future__ import annotations

import os

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
    from synthetic.phantom import write_phantoms

    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, n_cases=6, size=48, seed=0)
    return root
