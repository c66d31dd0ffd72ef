"""Grid files → runs: the :class:`ParameterManager`.

A grid YAML::

    name: ssa_lr_folds                 # names the sweep (default: the file's stem)
    base: experiments/mednext_b.yaml   # a training config file, or the config itself as a mapping
    set: {trainer.max_epochs: 300}     # fixed overrides of the base, for every run
    grid:                              # dotted keys → lists: every combination
      optim.lr: [0.001, 0.0027]
      data.fold: [0, 1, 2, 3, 4]
    zip:                               # keys varied together (equal lengths), one axis per group
      - {model.name: [segresnet, mednext_s], data.batch_size: [4, 2]}
    exclude:                           # combinations to skip (keys must be varied ones)
      - {optim.lr: 0.0027, data.fold: 4}
    seeds: [0, 1]                      # or `repeat: 3` (seeds 0, 1, 2): varies trainer.seed
    max_retries: 2                     # failed attempts the monitor resubmits
    max_running: 8                     # at most 8 runs of the sweep queued or running at once (sweeps/throttle.py)
    executor: {cluster: slurm, ...}    # see sweeps/executor.py; `executor.<key>` grid keys vary resources
    schedule: {kind: asha, metric: val/dice_mean, min_epochs: 5, eta: 3, max_epochs: 135, promote: score}
                                       # successive halving (sweeps/halving.py; README "Successive halving"); sets max_epochs

Each run gets a stable, readable id from its varied values, sorted by key: ``fold=2-lr=0.0027-name=mednext_b``
(the last part of each key path, the whole path where two varied keys end alike). Every run's full config is
built and validated (including the datalist and the fold) before anything is submitted.
"""
from __future__ import annotations

import itertools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brats_ugrip.config import RunConfig, apply_overrides, config_from_dict
from brats_ugrip.data import Datalist
from brats_ugrip.errors import BratsUgripError, ConfigError
from brats_ugrip.files import read_yaml
from brats_ugrip.sweeps.executor import ExecutorSection
from brats_ugrip.sweeps.halving import HalvingSchedule
from brats_ugrip.sweeps.init_from import resolve_in_config
from brats_ugrip.sweeps.run_ids import UNSAFE_CHARACTERS, run_ids
from brats_ugrip.sweeps.throttle import check_cap

SEED_KEY = "trainer.seed"
EXECUTOR_PREFIX = "executor."
_TOP_LEVEL = {"name", "description", "base", "set", "grid", "zip", "exclude", "seeds", "repeat", "max_retries",
              "max_running",
              "executor", "schedule"}


class ExcludeWarning(UserWarning):
    """An exclude rule of a grid matches no combination (probably a typo in a value)."""


@dataclass(frozen=True)
class Run:
    """One expanded run: its id, the varied values (dotted key → value), its validated config and resources."""

    run_id: str
    params: dict[str, Any]
    config: RunConfig
    executor: ExecutorSection

    @property
    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()


@dataclass
class _Axis:
    keys: tuple[str, ...]
    values: list[tuple[Any, ...]]


@dataclass
class ParameterManager:
    """Expands a grid (a parsed grid YAML) into validated :class:`Run` s.

    Args:
        grid: the grid file's content.
        source: where it came from (named in error messages).
        default_name: the sweep name when the grid has none.
    """

    grid: dict[str, Any]
    source: str | None = None
    default_name: str = "sweep"
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_file(cls, path: str | Path) -> ParameterManager:
        path = Path(path)
        return cls(read_yaml(path, what="grid file"), str(path), path.stem)

    def __post_init__(self) -> None:
        if not isinstance(self.grid, dict):
            raise self._error("<root>", "a grid file is a mapping with base, grid, executor, …")
        unknown = sorted(set(self.grid) - _TOP_LEVEL)
        if unknown:
            raise self._error(unknown[0], f"unknown key; a grid file has {', '.join(sorted(_TOP_LEVEL))}")
        self.name = self._name()
        self.max_retries = self._max_retries()
        try:
            self.max_running = check_cap(self.grid.get("max_running"))
        except ConfigError as error:
            raise self._error("max_running", str(error).split(": ", 1)[1]) from None
        self.schedule = self._schedule()  # before the base: it sets trainer.max_epochs
        self.base = self._base()
        self.executor_raw = self.grid.get("executor") or {}
        ExecutorSection.from_dict(self.executor_raw)  # fail early on the fixed part
        self.axes = self._axes()
        if self.schedule is not None and "trainer.max_epochs" in self.varied_keys:
            raise self._error("schedule.max_epochs", "a schedule sets every run's trainer.max_epochs; do not vary it")
        self.excludes = self._excludes()

    # --- parsing ------------------------------------------------------------------------------------------

    def _error(self, key_path: str, message: str) -> ConfigError:
        return ConfigError(key_path, message, self.source)

    def _name(self) -> str:
        name = self.grid.get("name", self.default_name)
        if not isinstance(name, str) or not name or UNSAFE_CHARACTERS.sub("", name) != name:
            raise self._error("name", f"expected a name of letters, digits, '.', '_' or '+', got {name!r}")
        return name

    def _max_retries(self) -> int:
        value = self.grid.get("max_retries", 2)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self._error("max_retries", f"expected an integer ≥ 0, got {value!r}")
        return value

    def _base(self) -> dict[str, Any]:
        base = self.grid.get("base", {})
        if isinstance(base, str):
            path = Path(base)
            if not path.is_file():
                raise self._error("base", f"config file {base} not found (paths are relative to the working directory)")
            try:
                base = read_yaml(path, what="base config file")
            except ConfigError as error:  # named as the grid's `base` key, and the base file in the message
                raise self._error("base", str(error)) from None
            if not isinstance(base, dict):
                raise self._error("base", f"{path} is not a mapping of config sections")
        elif not isinstance(base, dict):
            raise self._error("base", f"expected a config file path or a mapping of config sections, got {base!r}")
        fixed = self.grid.get("set") or {}
        if not isinstance(fixed, dict):
            raise self._error("set", f"expected a mapping of key.path: value, got {fixed!r}")
        if self.schedule is not None:  # every run is sized for the last rung; the monitor stops it at each rung
            fixed = {**fixed, "trainer.max_epochs": self.schedule.max_epochs}
        return apply_overrides(base, fixed)

    def _schedule(self) -> HalvingSchedule | None:
        """``schedule: {kind: asha, ...}`` (see ``sweeps/halving.py``); rungs are checked against each run's
        ``trainer.val_every`` in :meth:`runs`."""
        if "schedule" not in self.grid:
            return None
        try:
            return HalvingSchedule.from_dict(self.grid["schedule"])
        except ConfigError as error:
            raise self._error(error.key_path, str(error)[len(error.key_path) + 2:]) from None

    def _axes(self) -> list[_Axis]:
        axes: list[_Axis] = []
        seen: set[str] = set()

        def check_key(key: Any, where: str) -> str:
            if not isinstance(key, str) or not key:
                raise self._error(where, f"a varied key must be a dotted key path like optim.lr, got {key!r}")
            if key in seen:
                raise self._error(where, f"{key} is varied twice (in grid, zip or seeds); vary each key once")
            seen.add(key)
            return key

        def check_values(values: Any, where: str) -> list[Any]:
            if not isinstance(values, list):
                raise self._error(where, f"expected a list of values, got {values!r}; a fixed value belongs in "
                                         "`base` or `set`")
            if not values:
                raise self._error(where, "empty list: the grid would have no runs; give at least one value")
            return values

        grid = self.grid.get("grid") or {}
        if not isinstance(grid, dict):
            raise self._error("grid", f"expected a mapping of key.path: [values], got {grid!r}")
        for key, values in grid.items():
            check_key(key, f"grid.{key}")
            axes.append(_Axis((key,), [(v,) for v in check_values(values, f"grid.{key}")]))
        groups = self.grid.get("zip") or []
        if isinstance(groups, dict):
            groups = [groups]
        if not isinstance(groups, list):
            raise self._error("zip", "expected a list of groups, each a mapping of key.path: [values]")
        for i, group in enumerate(groups):
            if not isinstance(group, dict) or not group:
                raise self._error(f"zip[{i}]", f"expected a mapping of key.path: [values], got {group!r}")
            lists = {check_key(k, f"zip[{i}].{k}"): check_values(v, f"zip[{i}].{k}") for k, v in group.items()}
            lengths = {k: len(v) for k, v in lists.items()}
            if len(set(lengths.values())) > 1:
                raise self._error(f"zip[{i}]", "keys varied together need lists of equal length, got "
                                  + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
            axes.append(_Axis(tuple(lists), list(zip(*lists.values()))))
        seeds = self._seeds()
        if seeds is not None:
            check_key(SEED_KEY, "seeds")
            axes.append(_Axis((SEED_KEY,), [(s,) for s in seeds]))
        return axes

    def _seeds(self) -> list[int] | None:
        if "seeds" in self.grid and "repeat" in self.grid:
            raise self._error("repeat", "give either `seeds: [...]` or `repeat: N`, not both")
        if "repeat" in self.grid:
            repeat = self.grid["repeat"]
            if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
                raise self._error("repeat", f"expected an integer ≥ 1, got {repeat!r}")
            return list(range(repeat)) if repeat > 1 else None
        if "seeds" in self.grid:
            seeds = self.grid["seeds"]
            if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                  for s in seeds):
                raise self._error("seeds", f"expected a non-empty list of integers, got {seeds!r}")
            return seeds
        return None

    def _excludes(self) -> list[dict[str, Any]]:
        rules = self.grid.get("exclude") or []
        if not isinstance(rules, list):
            raise self._error("exclude", "expected a list of rules, each a mapping of varied key: value")
        varied = {k for axis in self.axes for k in axis.keys}
        for i, rule in enumerate(rules):
            if not isinstance(rule, dict) or not rule:
                raise self._error(f"exclude[{i}]", f"expected a mapping of varied key: value, got {rule!r}")
            for key in rule:
                if key not in varied:
                    raise self._error(f"exclude[{i}].{key}", f"not a varied key; exclude rules match the varied keys "
                                                             f"({', '.join(sorted(varied)) or 'none'})")
        return rules

    # --- expansion ----------------------------------------------------------------------------------------

    @property
    def varied_keys(self) -> list[str]:
        return [k for axis in self.axes for k in axis.keys]

    def combinations(self) -> list[dict[str, Any]]:
        """Every combination of varied values (exclude rules applied), in grid order; warns about rules that
        match nothing."""
        combos = []
        for choice in itertools.product(*(axis.values for axis in self.axes)):
            combos.append({k: v for axis, values in zip(self.axes, choice) for k, v in zip(axis.keys, values)})
        kept = []
        matched = [False] * len(self.excludes)
        for combo in combos:
            hits = [all(_same(combo[k], v) for k, v in rule.items()) for rule in self.excludes]
            matched = [m or h for m, h in zip(matched, hits)]
            if not any(hits):
                kept.append(combo)
        self.warnings = [f"{self.source or 'grid'}: exclude[{i}] {rule} matches no combination of the grid"
                         for i, (rule, hit) in enumerate(zip(self.excludes, matched)) if not hit]
        for message in self.warnings:
            warnings.warn(message, ExcludeWarning, stacklevel=2)
        if not kept:
            raise self._error("exclude", "the exclude rules remove every combination: nothing to run")
        return kept

    def runs(self) -> list[Run]:
        """All runs, each config built and validated; raises on the first bad one (naming run and key path)."""
        combos = self.combinations()
        ids = run_ids(combos)
        duplicates: dict[str, list[dict[str, Any]]] = {}
        for run_id, combo in zip(ids, combos):
            duplicates.setdefault(run_id, []).append(combo)
        for run_id, same in duplicates.items():
            if len(same) > 1:
                raise self._error("grid", f"{len(same)} combinations get the same run id {run_id!r} "
                                          f"({' and '.join(map(str, same[:2]))}): remove duplicate values")
        datalists: dict[str, Datalist] = {}
        checked: set[str] = set()
        executors: dict[str, ExecutorSection] = {}
        runs = []
        for run_id, combo in zip(ids, combos):
            config_values = {k: v for k, v in combo.items() if not k.startswith(EXECUTOR_PREFIX)}
            executor_values = {k[len(EXECUTOR_PREFIX):]: v for k, v in combo.items() if k.startswith(EXECUTOR_PREFIX)}
            try:
                values = resolve_in_config(apply_overrides(self.base, config_values), self.source)
                config = config_from_dict(values)
                if self.schedule is not None:
                    HalvingSchedule.from_dict(self.grid["schedule"], config.trainer.val_every)
                _check_data(config, datalists, checked)
                key = json.dumps(executor_values, sort_keys=True, default=str)
                if key not in executors:
                    executors[key] = ExecutorSection.from_dict({**self.executor_raw, **executor_values})
            except ConfigError as error:
                prefix = (f"{error.source}: " if error.source else "") + f"{error.key_path}: "
                message = f"{str(error)[len(prefix):]} (in run {run_id})"
                raise ConfigError(error.key_path, message, self.source) from None
            runs.append(Run(run_id, combo, config, executors[key]))
        return runs


def _same(a: Any, b: Any) -> bool:
    """Equality for exclude rules: YAML ints match floats (``1`` matches ``1.0``), lists match tuples."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _check_data(config: RunConfig, datalists: dict[str, Datalist], checked: set[str]) -> None:
    """The fine-tuning checkpoint exists, and training's own data checks (the fold exists, there are training
    cases, the patch fits the volumes), made once per distinct setting; each datalist is loaded once."""
    from brats_ugrip.training_cases import check_run_data

    data = config.data
    key = json.dumps([data.datalist, data.data_root, data.fold, data.roi_size, data.train_sources, data.extra_ratio,
                      config.trainer.seed if data.extra_ratio is not None else None, config.finetune.init_from],
                     default=str)
    if key in checked:
        return
    if config.finetune.init_from and not Path(config.finetune.init_from).is_file():
        raise ConfigError("finetune.init_from", f"checkpoint {config.finetune.init_from} not found")
    if data.datalist not in datalists:
        try:
            datalists[data.datalist] = Datalist.load(data.datalist, data.data_root)
        except BratsUgripError as error:
            raise ConfigError("data.datalist", str(error)) from None
    try:
        check_run_data(config, datalists[data.datalist])
    except ConfigError:
        raise
    except BratsUgripError as error:
        raise ConfigError("data", str(error)) from None
    checked.add(key)


