"""Run configuration: a typed tree of dataclasses loaded from YAML, with ``--set key.path=value`` overrides.

Everything a training run needs is in one :class:`RunConfig`::

    data:      datalist, data_root, fold, scheme, roi_size, cache_dir, num_workers, batch_size, samples_per_case,
               train_sources (e.g. [original, synthetic]), extra_ratio (extra : original, see brats_ugrip.training_cases)
    model:     name (see ``brats_ugrip.model_specs.list_models()``), kernel_size, deep_supervision, init_filters
    optim:     name adamw | sgd | adamw_sf, lr, weight_decay, momentum, warmup_steps, scheduler none | poly | cosine
    loss:      name dice_bce | dice | dice_focal, smooth
    trainer:   max_epochs, precision 32 | bf16-mixed | 16-mixed, compile, val_every, seed, limit batches, ...
    inference: roi_size, overlap, sw_batch_size, mode gaussian | constant, tta, precision, compile
    logging:   W&B project, run_name, mode offline | online | disabled, group (the sweep), job_type (default
               fold<data.fold>), tags (the varied key=value), varied (the varied key paths); see the README's
               "Experiment tracking"
    finetune:  init_from, upkern, freeze.all_but_last, reset_last
    run_dir

Validation happens when loading, before anything heavy: an unknown key, a wrong type or an impossible value
raises :class:`~brats_ugrip.errors.ConfigError` whose message starts with the key path (``optim.lr: ...``); NaN
and infinity are refused wherever a number goes.
Checks that need the data or the machine (fold present in the datalist, roi not larger than the volumes, a GPU
for mixed precision) are made by ``brats_ugrip.training.train`` before it builds anything.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from brats_ugrip.errors import ConfigError
from brats_ugrip.files import read_yaml

Precision = Literal["32", "bf16-mixed", "16-mixed"]
GPU_PRECISIONS = ("bf16-mixed", "16-mixed")


@dataclass
class DataConfig:
    """Which cases, which fold, and how patches are drawn."""

    datalist: str = ""
    data_root: str | None = None
    fold: int = 0
    scheme: str = "brats2023"
    roi_size: tuple[int, int, int] = (128, 128, 128)
    cache_dir: str | None = None
    num_workers: int = 0
    batch_size: int = 2
    samples_per_case: int = 1
    train_sources: list[str] = field(default_factory=lambda: ["original"])
    extra_ratio: float | None = None
    augment_intensity: float = 0.1
    """Augmentation strength: training patches get a per-channel intensity scale and shift each drawn from
    U(±augment_intensity) (0: flips only)."""


@dataclass
class ModelConfig:
    """A network from the model registry; ``None`` keeps the registry's default for that model."""

    name: str = "mednext_b"
    kernel_size: int | None = None
    deep_supervision: bool | None = None
    init_filters: int | None = None


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd", "adamw_sf"] = "adamw_sf"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.99
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    scheduler: Literal["none", "poly", "cosine"] = "none"


@dataclass
class LossConfig:
    name: Literal["dice_bce", "dice", "dice_focal"] = "dice_bce"
    smooth: float = 1e-5


@dataclass
class TrainerConfig:
    max_epochs: int = 100
    precision: Precision = "32"
    compile: bool = False
    cudnn_benchmark: bool = True
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    val_every: int = 1
    seed: int = 0
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    gradient_clip: float | None = None
    log_every_n_steps: int = 10


@dataclass
class InferenceConfig:
    """Sliding-window settings; ``roi_size: null`` uses ``data.roi_size``."""

    roi_size: tuple[int, int, int] | None = None
    overlap: float = 0.5
    sw_batch_size: int = 4
    mode: Literal["gaussian", "constant"] = "gaussian"
    tta: bool = False
    precision: Literal["32", "bf16"] = "32"
    compile: bool = False
    threshold: float = 0.5


@dataclass
class LoggingConfig:
    """Weights & Biases. ``offline`` by default: compute nodes rarely reach the internet, so a run (on SLURM or
    not) writes ``RUN_DIR/wandb/`` and ``sweeps/monitor.py SWEEP --sync`` uploads it later. A sweep's launcher
    fills ``run_name`` (the run id), ``group`` (the sweep's name), ``tags`` and ``varied``."""

    project: str = "brats-ugrip"
    run_name: str | None = None
    mode: Literal["offline", "online", "disabled"] = "offline"
    group: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)
    varied: list[str] = field(default_factory=list)


@dataclass
class FreezeConfig:
    """``all_but_last: K`` trains only the last K parameter tensors (counted from the output side)."""

    all_but_last: int | None = None


@dataclass
class FinetuneConfig:
    init_from: str | None = None
    upkern: bool = False
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    reset_last: int = 0


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML/JSON types (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def hash(self) -> str:
        """12 hex digits identifying what the run computes (``run_dir`` and ``logging`` excluded)."""
        return config_hash(self)

    @property
    def inference_roi(self) -> tuple[int, int, int]:
        return self.inference.roi_size or self.data.roi_size


# --- conversion ---------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_type_name(args[0])}"
        return f"a list of {_type_name(args[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in the dataclass's form."""
    if isinstance(value, float) and not math.isfinite(value):
        # YAML's .nan and .inf are floats; no setting means anything with them (a NaN lr passes `lr <= 0`).
        raise ConfigError(path, f"must be a finite number, got {value!r}")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping of settings, got {value!r}")
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"must be set (expected {_type_name(tp)})")
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        # YAML reads `precision: 32` as an int; the choices are strings.
        candidate = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if candidate not in choices:
            raise ConfigError(path, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return candidate
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
        if origin is tuple and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(path, f"expected {_type_name(tp)}, got {len(value)} values {list(value)}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        items = [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                return _convert(number, tp, path)  # "nan" and "inf" parse too
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported annotation {tp} at {path}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(key, f"unknown key; valid keys here are {', '.join(sorted(known))}")
    kwargs = {name: _convert(value, hints[name], f"{prefix}.{name}" if prefix else name)
              for name, value in values.items()}
    return cls(**kwargs)


# --- semantic checks ----------------------------------------------------------------------------------------


def _check(config: RunConfig) -> None:
    """Value checks that need no data and no machine."""
    from brats_ugrip.labels import SCHEMES
    from brats_ugrip.model_specs import check_model_config

    def positive(path: str, value: float | None, allow_zero: bool = False) -> None:
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise ConfigError(path, f"must be {'≥ 0' if allow_zero else '> 0'}, got {value}")

    data, optim, trainer, inference = config.data, config.optim, config.trainer, config.inference
    if not data.datalist:
        raise ConfigError("data.datalist", "required: the path of a datalist JSON (tools/make_datalist.py builds one)")
    if data.scheme not in SCHEMES:
        raise ConfigError("data.scheme", f"unknown label scheme {data.scheme!r}; choose one of {sorted(SCHEMES)}")
    if data.fold < 0:
        raise ConfigError("data.fold", f"must be a validation fold ≥ 0, got {data.fold}")
    for name in ("batch_size", "samples_per_case"):
        positive(f"data.{name}", getattr(data, name))
    positive("data.num_workers", data.num_workers, allow_zero=True)
    for i, size in enumerate(data.roi_size):
        positive(f"data.roi_size[{i}]", size)
    if not data.train_sources:
        raise ConfigError("data.train_sources", "is empty; list at least one source, e.g. [original]")
    positive("data.extra_ratio", data.extra_ratio, allow_zero=True)
    positive("optim.lr", optim.lr)
    positive("optim.weight_decay", optim.weight_decay, allow_zero=True)
    positive("optim.warmup_steps", optim.warmup_steps, allow_zero=True)
    if optim.name == "adamw_sf" and optim.scheduler != "none":
        raise ConfigError("optim.scheduler", "schedule-free AdamW (adamw_sf) takes no scheduler; use `none` "
                          "(its warmup is optim.warmup_steps)")
    if not 0 <= optim.momentum < 1:
        raise ConfigError("optim.momentum", f"must be in [0, 1), got {optim.momentum}")
    positive("loss.smooth", config.loss.smooth)
    positive("trainer.max_epochs", trainer.max_epochs)
    positive("trainer.val_every", trainer.val_every)
    positive("trainer.log_every_n_steps", trainer.log_every_n_steps)
    positive("trainer.gradient_clip", trainer.gradient_clip)
    for name in ("limit_train_batches", "limit_val_batches"):
        value = getattr(trainer, name)
        positive(f"trainer.{name}", value, allow_zero=True)  # 0 turns validation (or training) off
        if isinstance(value, float) and value > 1:
            raise ConfigError(f"trainer.{name}", f"a fraction must be ≤ 1.0 (or give an integer count), got {value}")
    if trainer.accelerator == "cpu" and trainer.precision in GPU_PRECISIONS:
        raise ConfigError("trainer.precision", f"{trainer.precision} needs a GPU but trainer.accelerator is cpu; use 32")
    if not 0 <= inference.overlap < 1:
        raise ConfigError("inference.overlap", f"must be in [0, 1), got {inference.overlap}")
    positive("inference.sw_batch_size", inference.sw_batch_size)
    if not 0 < inference.threshold < 1:
        raise ConfigError("inference.threshold", f"must be in (0, 1), got {inference.threshold}")
    if not 0 <= config.data.augment_intensity < 1:
        raise ConfigError("data.augment_intensity", f"must be in [0, 1), got {config.data.augment_intensity}")
    _check_logging(config.logging)
    finetune = config.finetune
    positive("finetune.freeze.all_but_last", finetune.freeze.all_but_last)
    positive("finetune.reset_last", finetune.reset_last, allow_zero=True)
    if finetune.upkern and not finetune.init_from:
        raise ConfigError("finetune.upkern", "UpKern initialises from a checkpoint; set finetune.init_from")
    check_model_config(config)


# wandb.init's own checks (wandb.sdk.wandb_settings): made here, as a run would fail them on the compute node.
WANDB_PROJECT_MAX = 128
WANDB_TAG_MAX = 64


def _check_logging(logging: LoggingConfig) -> None:
    if not 0 < len(logging.project) <= WANDB_PROJECT_MAX:
        raise ConfigError("logging.project", f"must be 1 to {WANDB_PROJECT_MAX} characters, got {logging.project!r}")
    for name in ("run_name", "group", "job_type"):
        if getattr(logging, name) == "":
            raise ConfigError(f"logging.{name}", "is empty; give a name or null")
    for i, tag in enumerate(logging.tags):
        if not 0 < len(tag) <= WANDB_TAG_MAX:
            raise ConfigError(f"logging.tags[{i}]", f"a W&B tag has 1 to {WANDB_TAG_MAX} characters, got {tag!r}")
    for i, key in enumerate(logging.varied):
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"logging.varied[{i}]", f"expected a dotted key path like optim.lr, got {key!r}")


def _absolute_paths(config: RunConfig) -> None:
    """Relative paths are relative to the working directory at load time; stored absolute, so that a job
    started elsewhere (a SLURM node, a sweep worker) reads the same files."""
    def absolute(path: str | None) -> str | None:
        return os.path.abspath(os.path.expanduser(path)) if path else path

    config.data.datalist = absolute(config.data.datalist)
    config.data.data_root = absolute(config.data.data_root)
    config.data.cache_dir = absolute(config.data.cache_dir)
    config.finetune.init_from = absolute(config.finetune.init_from)
    config.run_dir = absolute(config.run_dir)


# --- loading ------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` → ``("optim.lr", 0.0003)``; the value is read as YAML (``null``, lists, numbers)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(text, "an override must look like key.path=value, e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(key, f"cannot read the value {raw!r} ({error})") from error
    return key, value


def apply_overrides(values: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Set ``key.path`` entries in a nested dict (a copy); keys are checked when the config is built."""
    values = json.loads(json.dumps(values))
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    for key, value in items:
        node = values
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is a value, not a section; cannot set {key}")
            node = child
        node[parts[-1]] = value
    return values


def config_from_dict(values: dict[str, Any], source: str | None = None) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a nested dict (YAML content)."""
    if not isinstance(values, dict):
        raise ConfigError("<root>", "a run config must be a YAML mapping of sections", source)
    try:
        config = _build(RunConfig, values, "")
        _check(config)
        _absolute_paths(config)
    except ConfigError as error:
        if source and not error.source:
            raise ConfigError(error.key_path, str(error).split(": ", 1)[1], source) from None
        raise
    return config


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | dict[str, Any] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config, apply ``key.path=value`` overrides, validate.

    Args:
        path: YAML file; omitted, the config starts from ``base`` (or the defaults).
        overrides: ``["optim.lr=3e-4", ...]`` or ``{"optim.lr": 3e-4}``.
        base: a dict to start from (e.g. a sweep's run entry).
    """
    values: dict[str, Any] = dict(base or {})
    source = None
    if path is not None:
        path = Path(path)
        source = str(path)
        loaded = read_yaml(path, what="config file") or {}
        if not isinstance(loaded, dict):
            raise ConfigError("<root>", "a run config must be a YAML mapping of sections", source)
        values = apply_overrides(values, _flatten(loaded))
    if overrides:
        values = apply_overrides(values, overrides)
    return config_from_dict(values, source)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def flat_config(config: RunConfig) -> dict[str, Any]:
    """The resolved config as dotted keys (``{"optim.lr": 0.001, "data.fold": 0, ...}``; lists stay values)."""
    return _flatten(config.to_dict())


HASH_EXCLUDED = ("run_dir", "logging")
HASH_OMITTED_DEFAULTS: dict[tuple[str, str], Any] = {("data", "augment_intensity"): 0.1}
"""Keys added after runs existed: left out of the hash at their default, so those runs keep their hash (and resume)."""


def config_hash(config: RunConfig | dict[str, Any]) -> str:
    """Hash of the resolved config without ``run_dir`` and ``logging`` (they do not change what is computed)."""
    values = config.to_dict() if isinstance(config, RunConfig) else dict(config)
    for key in HASH_EXCLUDED:
        values.pop(key, None)
    for (section, key), default in HASH_OMITTED_DEFAULTS.items():
        if isinstance(values.get(section), dict) and values[section].get(key, default) == default:
            values[section] = {k: v for k, v in values[section].items() if k != key}
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def save_config(config: RunConfig, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config as YAML, atomically."""
    from brats_ugrip.atomic import atomic_write_yaml

    return atomic_write_yaml(path, config.to_dict())
