"""The sweep folder: the one module that names what a sweep writes around its run directories.

    SWEEP_DIR/sweep.db                    the sweep's state (runs, attempts, schedule): ``sweeps/state.py``
    SWEEP_DIR/runs/<run id>/              one run directory each (its files: ``brats_ugrip.run_files``)
    SWEEP_DIR/runs/<run id>/job.json      the starts of the run's jobs (node, pid, start epoch)
    SWEEP_DIR/runs/<run id>/job_results/  each job's outcome as plain JSON (never a pickle)
    SWEEP_DIR/runs/<run id>/logs/         links to each job's stdout and stderr
    SWEEP_DIR/jobs/<job id>/              submitit's folders (logs; pickles that only submitit reads)
    SWEEP_DIR/models/<run id>.ckpt        collected best checkpoints (+ .json: the record of each); models/last/
    SWEEP_DIR/results.csv                 one row per collected run
    SWEEP_DIR/report/                     the sweep report (Markdown, HTML, figures)
    SWEEP_DIR/cache/                      the case cache every run of the sweep shares
    SWEEP_DIR/.monitor.lock               the lock of the launcher and the monitor (``sweeps/lock.py``)
    SWEEP_DIR/.monitor-submitting.json    a resubmission announced before ``sbatch`` (``monitoring/engine.py``)
    SWEEP_DIR/wandb-synced.json           what ``monitor --sync`` sent to W&B (``wandb_sync.py``, its own lock)

Every other module asks this one (or ``brats_ugrip.run_files`` for a run's own files); none spells a path.
"""
from __future__ import annotations

from pathlib import Path

from brats_ugrip.run_files import (  # noqa: F401  (a run directory's files: re-exported for the sweep's modules)
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    PROGRESS_FILE,
    PathLike,
    best_checkpoint,
    checkpoint_dir,
    config_path,
    last_checkpoint,
    metrics_csv,
    progress_path,
)

DB_NAME = "sweep.db"
RUNS_DIR = "runs"
MODELS_DIR = "models"
LAST_MODELS_DIR = "last"
RESULTS_CSV = "results.csv"
REPORT_DIR = "report"
JOBS_DIR = "jobs"
CACHE_DIR = "cache"
LOCK_FILE = ".monitor.lock"
WANDB_LOCK_FILE = ".wandb-sync.lock"
WANDB_SYNCED_FILE = "wandb-synced.json"
INTENT_FILE = ".monitor-submitting.json"
JOB_INFO_FILE = "job.json"
JOB_RESULTS_DIR = "job_results"
JOB_LOGS_DIR = "logs"



def sweep_db_path(sweep_dir: PathLike) -> Path:
    """``SWEEP_DIR/sweep.db``."""
    return Path(sweep_dir) / DB_NAME


def run_dir_path(sweep_dir: PathLike, run_id: str) -> Path:
    """``SWEEP_DIR/runs/<run_id>``: the run's config, progress file, logs and checkpoints."""
    return Path(sweep_dir) / RUNS_DIR / run_id


def sweep_of_run(run_dir: PathLike) -> Path | None:
    """The sweep a run directory belongs to (``SWEEP_DIR/runs/<id>`` with ``SWEEP_DIR/sweep.db``), else None."""
    run_dir = Path(run_dir)
    sweep = run_dir.parent.parent
    return sweep if run_dir.parent.name == RUNS_DIR and sweep_db_path(sweep).is_file() else None


def case_cache(sweep_dir: PathLike) -> Path:
    """``SWEEP_DIR/cache``: one case cache for every run of the sweep."""
    return Path(sweep_dir) / CACHE_DIR


def models_dir(sweep_dir: PathLike) -> Path:
    """``SWEEP_DIR/models``: collected best checkpoints, named ``<run id>.ckpt``."""
    return Path(sweep_dir) / MODELS_DIR


def collected_paths(sweep_dir: PathLike, run_id: str) -> tuple[Path, Path]:
    """(``models/<run_id>.ckpt``, ``models/<run_id>.json``): a collected checkpoint and its record."""
    folder = models_dir(sweep_dir)
    return folder / f"{run_id}.ckpt", folder / f"{run_id}.json"


def collected_last(sweep_dir: PathLike, run_id: str) -> Path:
    """``models/last/<run_id>.ckpt`` (``--collect-last``)."""
    return models_dir(sweep_dir) / LAST_MODELS_DIR / f"{run_id}.ckpt"


def results_csv(sweep_dir: PathLike) -> Path:
    return Path(sweep_dir) / RESULTS_CSV


def report_dir(sweep_dir: PathLike) -> Path:
    return Path(sweep_dir) / REPORT_DIR


def jobs_dir(sweep_dir: PathLike) -> Path:
    """``SWEEP_DIR/jobs``: submitit's job folders."""
    return Path(sweep_dir).resolve() / JOBS_DIR


def lock_path(sweep_dir: PathLike) -> Path:
    return Path(sweep_dir) / LOCK_FILE


def intent_path(sweep_dir: PathLike) -> Path:
    return Path(sweep_dir) / INTENT_FILE


def job_info_path(run_dir: PathLike) -> Path:
    return Path(run_dir) / JOB_INFO_FILE


def job_result_path(run_dir: PathLike, job_id: str) -> Path:
    return Path(run_dir) / JOB_RESULTS_DIR / f"{job_id}.json"


def job_logs_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / JOB_LOGS_DIR
