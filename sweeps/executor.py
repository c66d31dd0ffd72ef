"""The ``executor`` section of a grid file → a :class:`~brats_ugrip.sweeps.jobs.SubmitSpec` (submitit parameters).

Example (every key optional except ``cluster``)::

    executor:
      cluster: slurm            # or local: processes on this machine, no scheduler needed
      partition: gpu
      account: brats
      qos: normal
      constraint: a100
      gpus_per_node: 1          # multi-GPU: one task per GPU (tasks_per_node = gpus_per_node), DDP
      tasks_per_node: 2         # SLURM only; without GPUs, DDP on CPU processes (default: gpus_per_node or 1)
      cpus_per_task: 8
      mem_gb: 64
      time: "24:00:00"          # minutes (an integer) or [D-]HH:MM[:SS]
      array_parallelism: 16     # at most this many runs of ONE job array at once (SLURM's %N); a grid whose
                                # executor.* values differ makes one array each, each with this cap. Local:
                                # runs training at the same time
      max_num_timeout: 5        # requeues after hitting the time limit (preemptions are always requeued)
      signal_delay_s: 120       # USR2 this long before the limit: time to checkpoint
      sbatch_args: {mail-type: END, exclude: "node[01-02]"}
      setup: ["module load cuda/12.1", "source .venv/bin/activate"]

Grid keys ``executor.<key>`` vary resources per run; runs with different resources go into separate arrays.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from brats_ugrip.errors import ConfigError
from brats_ugrip.sweeps.jobs import CLUSTERS, SubmitSpec

LOCAL_DEFAULT_TIME_MIN = 7 * 24 * 60  # local jobs have no scheduler limit; submitit's own default is 2 minutes
_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<hours>\d+):(?P<minutes>\d{1,2})(?::(?P<seconds>\d{1,2}))?$")


def parse_time_min(value: Any, key_path: str = "executor.time") -> int:
    """Minutes from an integer or ``[D-]HH:MM[:SS]`` (seconds round up)."""
    if isinstance(value, int) and not isinstance(value, bool):
        minutes = value
    elif isinstance(value, str) and (match := _TIME.match(value.strip())):
        parts = {k: int(v or 0) for k, v in match.groupdict().items()}
        minutes = parts["days"] * 1440 + parts["hours"] * 60 + parts["minutes"] + (parts["seconds"] > 0)
    else:
        raise ConfigError(key_path, f"expected minutes (an integer) or [D-]HH:MM[:SS], got {value!r}")
    if minutes < 1:
        raise ConfigError(key_path, f"must be at least 1 minute, got {value!r}")
    return minutes


@dataclass(frozen=True)
class ExecutorSection:
    """The validated ``executor`` section of a grid (see the module docstring for each key)."""

    cluster: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time: int | None = None
    nodes: int = 1
    tasks_per_node: int | None = None
    array_parallelism: int | None = None
    max_num_timeout: int = 3
    signal_delay_s: int = 120
    sbatch_args: dict[str, Any] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    job_name: str | None = None

    @classmethod
    def from_dict(cls, raw: Any, key_path: str = "executor") -> ExecutorSection:
        """Validate a raw ``executor`` mapping; every problem is a ConfigError naming its key path."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(key_path, f"expected a mapping (cluster: local|slurm, partition, …), got {raw!r}")
        known = {f.name for f in fields(cls)}
        for key in raw:
            if key not in known:
                raise ConfigError(f"{key_path}.{key}", f"unknown key; known keys: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        cluster = raw.get("cluster", "local")
        if cluster not in CLUSTERS:
            raise ConfigError(f"{key_path}.cluster", f"expected one of {list(CLUSTERS)}, got {cluster!r}")
        values["cluster"] = cluster
        for key in ("partition", "account", "qos", "constraint", "job_name"):
            if raw.get(key) is not None:
                if not isinstance(raw[key], str) or not raw[key].strip():
                    raise ConfigError(f"{key_path}.{key}", f"expected a non-empty string, got {raw[key]!r}")
                values[key] = raw[key].strip()
        for key, minimum in (("gpus_per_node", 0), ("cpus_per_task", 1), ("nodes", 1), ("tasks_per_node", 1),
                             ("array_parallelism", 1), ("max_num_timeout", 0), ("signal_delay_s", 0)):
            if raw.get(key) is not None:
                value = raw[key]
                if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                    raise ConfigError(f"{key_path}.{key}", f"expected an integer ≥ {minimum}, got {value!r}")
                values[key] = value
        tasks = values.get("tasks_per_node")
        if tasks is not None and cluster == "local" and tasks > 1:
            raise ConfigError(f"{key_path}.tasks_per_node", "several tasks per node need cluster: slurm; a local run "
                              "uses all its GPUs from one task (Lightning starts a process per GPU)")
        if tasks is not None and values.get("gpus_per_node", 0) not in (0, tasks):
            raise ConfigError(f"{key_path}.tasks_per_node", f"one task per GPU: expected {values['gpus_per_node']} "
                              f"(gpus_per_node), got {tasks}")
        if raw.get("mem_gb") is not None:
            mem = raw["mem_gb"]
            if not isinstance(mem, (int, float)) or isinstance(mem, bool) or mem <= 0:
                raise ConfigError(f"{key_path}.mem_gb", f"expected a positive number of GB, got {mem!r}")
            values["mem_gb"] = mem
        if raw.get("time") is not None:
            values["time"] = parse_time_min(raw["time"], f"{key_path}.time")
        sbatch_args = raw.get("sbatch_args") or {}
        if not isinstance(sbatch_args, dict) or not all(
                isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in sbatch_args.items()):
            raise ConfigError(f"{key_path}.sbatch_args",
                              "expected a mapping of sbatch option → value (e.g. {mail-type: END}), "
                              f"got {sbatch_args!r}")
        values["sbatch_args"] = dict(sbatch_args)
        setup = raw.get("setup") or []
        if isinstance(setup, str):
            setup = [setup]
        if not isinstance(setup, list) or not all(isinstance(line, str) for line in setup):
            raise ConfigError(f"{key_path}.setup", f"expected a list of shell lines, got {setup!r}")
        values["setup"] = tuple(setup)
        return cls(**values)

    def submit_spec(self, default_name: str) -> SubmitSpec:
        """The submitit parameters of this section (``default_name`` names SLURM jobs without ``job_name``)."""
        if self.cluster == "local":
            parameters: dict[str, Any] = {"timeout_min": self.time or LOCAL_DEFAULT_TIME_MIN,
                                          "gpus_per_node": self.gpus_per_node, "tasks_per_node": 1}
            if self.setup:
                parameters["setup"] = list(self.setup)
            return SubmitSpec("local", parameters, self.max_num_timeout, self.array_parallelism or 1)
        parameters = {
            "job_name": self.job_name or default_name,
            "time": self.time or 60,
            "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node or max(1, self.gpus_per_node),
            "signal_delay_s": self.signal_delay_s,
        }
        optional = {"partition": self.partition, "account": self.account, "qos": self.qos,
                    "constraint": self.constraint, "cpus_per_task": self.cpus_per_task,
                    "array_parallelism": self.array_parallelism,
                    "mem": _slurm_mem(self.mem_gb) if self.mem_gb is not None else None,
                    "gpus_per_node": self.gpus_per_node or None}
        parameters.update({k: v for k, v in optional.items() if v is not None})
        if self.sbatch_args:
            parameters["additional_parameters"] = dict(self.sbatch_args)
        if self.setup:
            parameters["setup"] = list(self.setup)
        return SubmitSpec("slurm", parameters, self.max_num_timeout)


def _slurm_mem(mem_gb: float) -> str:
    """sbatch's ``--mem`` for ``mem_gb`` (submitit's own conversion)."""
    from submitit.slurm.slurm import _convert_mem

    return _convert_mem(mem_gb)
