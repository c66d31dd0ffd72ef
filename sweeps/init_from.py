"""Two-stage sweeps: a fine-tuning grid's ``finetune.init_from`` naming a run of another sweep, resolved before
anything is submitted.

``finetune.init_from`` (in a grid's ``base``, ``set`` or varied values) may be

* ``{sweep: SWEEP_DIR, run: RUN_ID}``: that sweep's run, which must be COMPLETED in its ``sweep.db`` and collected
  by the monitor; it resolves to ``SWEEP_DIR/models/<RUN_ID>.ckpt``, whose SHA-256 must match the collection
  record (``models/<RUN_ID>.json``);
* a path: a checkpoint file, which must exist; when it is a collected one (``SWEEP_DIR/models/<run>.ckpt`` next to
  its ``.json`` record) its SHA-256 is checked the same way.

Every fine-tuned run then starts from those weights and records the base's ``init_id`` (``brats_ugrip.training``),
so its checkpoints share one initialisation and can be souped. Paths are relative to the working directory.
Nothing is unpickled here: the checks read ``sweep.db``, the JSON record and the file's bytes.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from brats_ugrip.errors import ConfigError
from brats_ugrip.files import sha256_file
from brats_ugrip.sweeps import layout
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.state import RunState, SweepState

KEY = "finetune.init_from"


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file, once per (path, size, mtime): every run of a grid names the same base."""
    return sha256_file(path)


def _collected(checkpoint: Path, where: str, source: str | None) -> None:
    """A collected checkpoint must match its collection record's SHA-256 (a half-copied or replaced file fails)."""
    record = checkpoint.with_suffix(".json")
    if checkpoint.parent.name != layout.MODELS_DIR or not record.is_file():
        return
    try:
        expected = json.loads(record.read_text()).get("sha256")
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(KEY, f"{where}: collection record {record} unreadable ({error})", source) from None
    stat = checkpoint.stat()
    if expected and _sha256(str(checkpoint.resolve()), stat.st_size, stat.st_mtime_ns) != expected:
        raise ConfigError(KEY, f"{where}: {checkpoint} does not match the SHA-256 its sweep recorded when collecting "
                          "it (changed or truncated since); collect the run again", source)


def _from_sweep(reference: dict[str, Any], source: str | None) -> str:
    unknown = sorted(set(reference) - {"sweep", "run"})
    if unknown or not isinstance(reference.get("sweep"), str) or not isinstance(reference.get("run"), str):
        raise ConfigError(KEY, f"expected a checkpoint path or {{sweep: SWEEP_DIR, run: RUN_ID}}, got {reference!r}",
                          source)
    sweep, run_id = Path(reference["sweep"]), reference["run"]
    where = f"run {run_id!r} of sweep {sweep}"
    if not sweep_db_path(sweep).is_file():
        raise ConfigError(KEY, f"{sweep}: not a sweep directory (no {sweep_db_path(sweep).name}); launch the base "
                          "sweep first", source)
    with SweepState(sweep_db_path(sweep)) as state:
        if not state.has_run(run_id):
            known = ", ".join(r.run_id for r in state.runs()[:5])
            raise ConfigError(KEY, f"{sweep} has no run {run_id!r} (runs: {known})", source)
        run_state = state.get_run(run_id).state
    if run_state != RunState.COMPLETED:
        raise ConfigError(KEY, f"{where} is {run_state.value}, not COMPLETED; fine-tune from a finished base", source)
    checkpoint = layout.collected_paths(sweep, run_id)[0]
    if not checkpoint.is_file():
        raise ConfigError(KEY, f"{where} is not collected yet ({checkpoint} missing); run "
                          f"`python sweeps/monitor.py {sweep} --once` to collect it", source)
    _collected(checkpoint, where, source)
    return str(checkpoint.resolve())


def resolve_init_from(value: Any, source: str | None = None) -> str | None:
    """The checkpoint path ``finetune.init_from`` names (see the module docstring), checked; None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        return _from_sweep(value, source)
    if not isinstance(value, str):
        raise ConfigError(KEY, f"expected a checkpoint path or {{sweep: SWEEP_DIR, run: RUN_ID}}, got {value!r}",
                          source)
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(KEY, f"checkpoint {value} not found", source)
    _collected(path, value, source)
    return str(path.resolve())


def resolve_in_config(values: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """A config dict (as a grid builds it) with ``finetune.init_from`` resolved to a checked checkpoint path."""
    finetune = values.get("finetune")
    if not isinstance(finetune, dict) or "init_from" not in finetune:
        return values
    return {**values, "finetune": {**finetune, "init_from": resolve_init_from(finetune["init_from"], source)}}
