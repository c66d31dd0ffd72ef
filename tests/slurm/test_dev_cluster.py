"""submitit on the real single-node SLURM dev cluster: job arrays, timeout → checkpoint → requeue → resume,
failures and cancellation, each checked against sacct."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Jobs cannot import this test module (it is not on their sys.path): ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _executor(folder: Path, timeout_min: int = 5, signal_delay_s: int = 30) -> submitit.AutoExecutor:
    # slurm_max_num_timeout is a constructor argument: update_parameters would not pass it on.
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=3)
    executor.update_parameters(
        timeout_min=timeout_min, cpus_per_task=1, slurm_partition="debug", slurm_signal_delay_s=signal_delay_s
    )
    return executor


def _square(x: int) -> int:
    return x * x


def _fail() -> None:
    raise RuntimeError("this job fails on purpose")


class CountWithProgress(submitit.helpers.Checkpointable):
    """Counts to ``total`` in steps of ``step_s`` seconds, saving the count after every step.

    Each attempt appends the count it started from to ``starts_file``, so a test can see where every attempt
    resumed. The default ``checkpoint()`` requeues this same callable; the state lives in ``progress_file``,
    as a training run's lives in its last checkpoint.
    """

    def __init__(self, progress_file: Path, starts_file: Path, total: int, step_s: float) -> None:
        self.progress_file = progress_file
        self.starts_file = starts_file
        self.total = total
        self.step_s = step_s

    def __call__(self) -> int:
        count = int(self.progress_file.read_text()) if self.progress_file.exists() else 0
        with self.starts_file.open("a") as starts:
            starts.write(f"{count}\n")
        while count < self.total:
            time.sleep(self.step_s)
            count += 1
            partial = self.progress_file.with_suffix(".tmp")
            partial.write_text(str(count))
            partial.replace(self.progress_file)  # a kill mid-write never leaves a torn count
        return count


def test_batch_is_one_array_and_completes(slurm_cluster, slurm_job_dir):
    executor = _executor(slurm_job_dir / "submitit")
    with executor.batch():
        jobs = [executor.submit(_square, x) for x in range(3)]

    # One sbatch call gives one array job id; each separate call would have given a new id.
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1, f"expected one job array, got job ids {[job.job_id for job in jobs]}"
    assert sorted(job.job_id.split("_")[1] for job in jobs) == ["0", "1", "2"]

    assert [slurm_cluster.wait_until_final(job.job_id) for job in jobs] == ["COMPLETED"] * 3
    assert [job.result() for job in jobs] == [0, 1, 4]


def test_timeout_checkpoints_requeues_and_resumes(slurm_cluster, slurm_job_dir):
    # SLURM checks time limits every 30 s and sends USR2 once `now >= end - signal_delay_s - 30`: with a 60 s
    # limit and a 5 s delay that is 25–55 s into each attempt, after submitit installed its handler and
    # before the limit. 60 s of counting cannot finish in one attempt, so at least one requeue must happen.
    progress_file = slurm_job_dir / "progress.txt"
    starts_file = slurm_job_dir / "starts.txt"
    total = 120
    executor = _executor(slurm_job_dir / "submitit", timeout_min=1, signal_delay_s=5)
    job = executor.submit(CountWithProgress(progress_file, starts_file, total=total, step_s=0.5))

    assert slurm_cluster.wait_until_final(job.job_id, timeout_s=300) == "COMPLETED"
    assert job.result() == total

    history = slurm_cluster.history(job.job_id)
    assert "REQUEUED" in history[:-1], f"sacct shows no requeue: {history}"
    starts = [int(line) for line in starts_file.read_text().split()]
    assert len(starts) == len(history) >= 2, f"attempt starts {starts} vs sacct history {history}"
    # Every requeued attempt resumed from the count the one before it saved, never from 0.
    assert starts[0] == 0 and all(earlier < later for earlier, later in zip(starts, starts[1:])), starts
    assert int(progress_file.read_text()) == total


def test_failing_job_is_failed(slurm_cluster, slurm_job_dir):
    job = _executor(slurm_job_dir / "submitit").submit(_fail)

    assert slurm_cluster.wait_until_final(job.job_id) == "FAILED"
    with pytest.raises(submitit.core.utils.FailedJobError, match="this job fails on purpose"):
        job.result()


def test_scancel_cancels_a_running_job(slurm_cluster, slurm_job_dir):
    job = _executor(slurm_job_dir / "submitit").submit(time.sleep, 300)
    slurm_cluster.wait_for_state(job.job_id, {"RUNNING"}, timeout_s=60)

    subprocess.run(["scancel", job.job_id], check=True, timeout=30)

    assert slurm_cluster.wait_until_final(job.job_id) == "CANCELLED"
