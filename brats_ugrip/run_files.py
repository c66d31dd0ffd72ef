"""What one training run writes in its run directory: the one place that names those files.

A run directory is the unit of truth for one run (whoever made it: ``brats-ugrip train``, a sweep, a test)::

    RUN_DIR/config.yaml             the run's config, as trained
    RUN_DIR/progress.json           epoch, best validation Dice, host, GPU (atomic; read by the monitor)
    RUN_DIR/checkpoints/best.ckpt   the best validation Dice's weights
    RUN_DIR/checkpoints/last.ckpt   written at every epoch's end: a resumed run continues from it
    RUN_DIR/csv/metrics.csv         Lightning's CSV log (losses, validation metrics per epoch)
    RUN_DIR/cache/                  preprocessed cases, when no shared cache is given (brats_ugrip.preprocess)

The core knows only a run directory; what a sweep adds around run directories is ``sweeps/layout.py``'s.
"""
from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE = "config.yaml"
PROGRESS_FILE = "progress.json"
CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT = "best.ckpt"
LAST_CHECKPOINT = "last.ckpt"
CSV_LOG_DIR = "csv"
METRICS_CSV = "metrics.csv"
CACHE_DIR = "cache"

PathLike = str | os.PathLike[str]


def checkpoint_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def best_checkpoint(run_dir: PathLike) -> Path:
    return checkpoint_dir(run_dir) / BEST_CHECKPOINT


def last_checkpoint(run_dir: PathLike) -> Path:
    return checkpoint_dir(run_dir) / LAST_CHECKPOINT


def progress_path(run_dir: PathLike) -> Path:
    return Path(run_dir) / PROGRESS_FILE


def config_path(run_dir: PathLike) -> Path:
    return Path(run_dir) / CONFIG_FILE


def metrics_csv(run_dir: PathLike) -> Path:
    return Path(run_dir) / CSV_LOG_DIR / METRICS_CSV


def own_cache(run_dir: PathLike) -> Path:
    """The run's own case cache, used when neither the config, the environment nor the caller names a shared one."""
    return Path(run_dir) / CACHE_DIR
