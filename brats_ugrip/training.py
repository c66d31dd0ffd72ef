"""One training run: :func:`train` (the single entry the CLI, local jobs and SLURM jobs call), the Lightning
module, and the callbacks that make a run directory trustworthy.

Run directory::

    RUN_DIR/config.yaml               resolved config
    RUN_DIR/progress.json             status, epoch, step, best val Dice, host, GPU, timestamps (atomic, each epoch)
    RUN_DIR/checkpoints/best.ckpt     best validation mean Dice      (atomic writes; brats-ugrip metadata inside)
    RUN_DIR/checkpoints/last.ckpt     end of the last finished epoch (resume point)
    RUN_DIR/csv/metrics.csv           logged metrics; RUN_DIR/wandb/ when W&B is enabled (offline by default)

Rerunning a run in the same directory resumes from ``last.ckpt`` (epoch, optimizer and schedule-free state,
schedule, RNG) and ends at the same total number of epochs.

A run whose loss or weights become NaN or infinite stops with :class:`~brats_ugrip.errors.TrainingDivergedError`
("diverged at epoch E, step S"), marked ``failed`` in ``progress.json`` with that reason; no checkpoint with a
non-finite weight is ever written (:class:`DivergenceGuard`), so ``best.ckpt`` stays the last finite best.

Schedule-free AdamW: the optimizer is switched to ``train()`` at each training epoch start and to ``eval()``
before validation and at the end; every checkpoint holds the averaged ``x`` weights, whenever it is written
(:meth:`SegmentationModule.on_save_checkpoint` computes them if the optimizer is in train mode at that moment).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import socket
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.plugins.environments import LightningEnvironment, SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from brats_ugrip.atomic import atomic_write, atomic_write_json
from brats_ugrip.checkpoints import (
    FORMAT_VERSION,
    META_KEY,
    checkpoint_meta,
    first_nonfinite,
    git_commit,
    load_checkpoint,
    model_state_dict,
    now_iso,
    weights_hash,
)
from brats_ugrip.config import GPU_PRECISIONS, RunConfig, config_from_dict, flat_config, load_config, save_config
from brats_ugrip.data import Datalist
from brats_ugrip.errors import CheckpointError, ConfigError, TrainingDivergedError
from brats_ugrip.heldout import fingerprint
from brats_ugrip.inference import inference_settings, sliding_window_probabilities
from brats_ugrip.labels import REGIONS, get_scheme
from brats_ugrip.loaders import make_loaders, training_batch
from brats_ugrip.losses import SegmentationLoss
from brats_ugrip.metrics.regions import label_map_scores
from brats_ugrip.models import (
    config_model_kwargs,
    create_model,
    freeze_all_but_last,
    get_spec,
    reset_last_convolutions,
    resolve_kwargs,
    upkern_state_dict,
)
from brats_ugrip.optim import averaged_parameters, build_optimizer, build_scheduler, is_schedule_free, set_train_mode
from brats_ugrip.preprocess import BRAIN_MARGIN, case_stage_dir
from brats_ugrip.run_files import (
    BEST_CHECKPOINT,
    CSV_LOG_DIR,
    LAST_CHECKPOINT,
    checkpoint_dir,
    config_path,
    last_checkpoint,
    progress_path,
)
from brats_ugrip.seen_cases import case_record, seen_cases
from brats_ugrip.training_cases import check_run_data

MONITOR = "val/dice_mean"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: temp file + fsync + rename on save; ``weights_only=True`` on load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path)


class _AppendingCSVWriter(ExperimentWriter):
    """Continues an existing ``metrics.csv`` (a resumed run) instead of deleting it. Rows of an epoch that was
    interrupted and redone appear twice; readers keep the last row per epoch and key."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSV logger, appending to the run's ``metrics.csv`` across restarts."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingCSVWriter(log_dir=self.log_dir)
        return self._experiment


# --- the Lightning module -----------------------------------------------------------------------------------


class SegmentationModule(pl.LightningModule):
    """A network trained on region channels, validated by sliding window on whole brain crops.

    Batches: training ``{"image": (B, 4, *roi), "label": (B, 3, *roi)}``; validation one case
    ``{"image": (1, 4, x, y, z), "label": (1, 3, x, y, z), "case_id": [str]}``.
    Logged: ``train/loss``, ``val/dice_TC``, ``val/dice_WT``, ``val/dice_ET``, ``val/dice_mean``.
    """

    def __init__(self, config: RunConfig):
        super().__init__()
        self.config = config
        self.model_name = config.model.name
        self.model_kwargs = resolve_kwargs(self.model_name, **config_model_kwargs(config))
        network = create_model(self.model_name, **self.model_kwargs)
        self.init_cases: set[str] = set()  # cases the init_from checkpoint had seen (set by _initialise)
        self.case_record: dict[str, list[str]] = {}  # brats_ugrip.seen_cases record, set by train()
        self.case_cache: str | None = None  # where train() cached the cases: soups read them from there
        self.init_id, self.trainable_parameters = self._initialise(network)
        self.model = torch.compile(network) if config.trainer.compile else network
        self.loss = SegmentationLoss(config.loss)
        self.settings = inference_settings(config)
        self.val_metrics: dict[str, float] = {}
        self.val_epoch: int | None = None
        self.val_fingerprint: str | None = None
        self._case_scores: list[list[float]] = []
        self._case_ids: list[str] = []

    def _initialise(self, network: torch.nn.Module) -> tuple[str, int]:
        """Apply ``finetune`` (init_from / UpKern, reset_last, freeze); returns (init id, trainable count)."""
        finetune = self.config.finetune
        surgery_size = 2 * get_spec(self.model_name).divisor
        init_id = None
        if finetune.init_from:
            checkpoint = load_checkpoint(finetune.init_from)
            state = model_state_dict(checkpoint)
            if finetune.upkern:
                state = upkern_state_dict(state, network)
            try:
                network.load_state_dict(state)
            except RuntimeError as error:
                raise CheckpointError(f"{finetune.init_from}: weights do not fit {self.model_name} {self.model_kwargs}; "
                                      "for a larger kernel than the checkpoint's set finetune.upkern: true "
                                      f"({error})") from error
            init_id = checkpoint.get(META_KEY, {}).get("init_id") or weights_hash(state)
            self.init_cases = seen_cases(checkpoint.get(META_KEY, {})) or set()
        if finetune.reset_last:
            reset_last_convolutions(network, finetune.reset_last, surgery_size)
        if finetune.freeze.all_but_last:
            freeze_all_but_last(network, finetune.freeze.all_but_last, surgery_size)
        trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
        total = sum(p.numel() for p in network.parameters())
        rank_zero_info(f"{self.model_name}: {trainable:,} trainable parameters of {total:,}")
        return init_id or weights_hash(network.state_dict()), trainable

    # training ---------------------------------------------------------------------------------------------

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Training patches travel compact (fp16 image, uint8 label) and become float32 on the device.
        return training_batch(batch) if isinstance(batch, dict) and "jitter" in batch else batch

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.model(batch["image"]), batch["label"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch["image"].shape[0],
                 sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer((p for p in self.model.parameters() if p.requires_grad), self.config.optim)
        scheduler = build_scheduler(optimizer, self.config.optim, int(self.trainer.estimated_stepping_batches))
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _set_optimizer_mode(self, train: bool) -> None:
        if self._trainer is not None:
            for optimizer in self.trainer.optimizers:
                set_train_mode(optimizer, train)

    def on_train_epoch_start(self) -> None:
        self._set_optimizer_mode(True)

    def on_train_end(self) -> None:
        self._set_optimizer_mode(False)

    # validation -------------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._set_optimizer_mode(False)
        self._case_scores, self._case_ids = [], []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._case_scores.append(case_dice(self.model, batch["image"], batch["label"], self.settings,
                                           self.config.data.scheme))
        self._case_ids.extend(batch["case_id"])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        scores = dict(zip(self._case_ids, self._case_scores))
        if self.trainer.world_size > 1:
            # Each process scored its share of the fold (DistributedSampler repeats cases to even the shares):
            # gather every case once, so all processes log, compare and checkpoint the same fold metrics.
            shares: list[dict[str, list[float]]] = [{} for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(shares, scores)
            scores = {case_id: share[case_id] for share in shares for case_id in share}
        if not scores:
            return
        self.val_metrics = summarise_dice([scores[case_id] for case_id in sorted(scores)])
        self.val_epoch = self.current_epoch + 1
        self.val_fingerprint = fingerprint(scores, self.config.data.scheme, BRAIN_MARGIN, self.settings)
        for name, value in self.val_metrics.items():
            # Equal on every rank already; sync_dist keeps Lightning from warning about epoch-level DDP logs.
            self.log(f"val/dice_{name}", value, prog_bar=name == "mean", sync_dist=True)

    # checkpoints ------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the averaged weights (whatever the optimizer's mode now), the metadata and the RNG states."""
        schedule_free = any(is_schedule_free(o) for o in self.trainer.optimizers)
        names = {id(p): name for name, p in self.named_parameters()}
        for i, optimizer in enumerate(self.trainer.optimizers):
            averaged = averaged_parameters(optimizer)
            for param, value in averaged.items():
                checkpoint["state_dict"][names[id(param)]] = value
            if averaged and "optimizer_states" in checkpoint:
                for group in checkpoint["optimizer_states"][i]["param_groups"]:
                    group["train_mode"] = False
        bad = first_nonfinite(checkpoint["state_dict"])
        if bad is not None:  # the last line of defence: no checkpoint (best.ckpt above all) is ever a diverged one
            raise TrainingDivergedError(f"diverged at epoch {self.trainer.current_epoch + 1}, step "
                                        f"{self.trainer.global_step}: weight {bad[0]!r} holds {bad[1]} NaN or "
                                        "infinite values (no checkpoint written)")
        checkpoint[META_KEY] = {
            "format": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "config_hash": self.config.hash(),
            "model": {"name": self.model_name, "kwargs": dict(self.model_kwargs)},
            "fold": self.config.data.fold,
            # Checkpoints are written after an epoch's training batches (validation end or train epoch end).
            "epoch": self.trainer.current_epoch + 1,
            "step": self.trainer.global_step,
            "val_metrics": dict(self.val_metrics),
            "val_epoch": self.val_epoch,
            # Names the cases and settings of val_metrics, so souping can trust them wherever the checkpoint goes;
            # only when they were measured on these weights (last.ckpt may be written between validations).
            **({"val_fingerprint": self.val_fingerprint} if self.val_epoch == self.trainer.current_epoch + 1 else {}),
            "git_commit": git_commit(),
            "init_id": self.init_id,
            "cases": self.case_record,
            **({"case_cache": self.case_cache} if self.case_cache else {}),
            "trainable_parameters": self.trainable_parameters,
            "weights": "averaged" if schedule_free else "current",
            "created": now_iso(),
        }
        checkpoint["rng_states"] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(META_KEY, {})
        self.val_metrics = dict(meta.get("val_metrics", {}))
        self.val_epoch = meta.get("val_epoch")
        self.val_fingerprint = meta.get("val_fingerprint")
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])


def case_dice(model: torch.nn.Module, image: torch.Tensor, label: torch.Tensor, settings: Any,
              scheme: str = "brats2023") -> list[float]:
    """Dice of TC, WT, ET for one case: sliding-window probabilities thresholded at ``settings.threshold``, written
    as a label map in ``scheme`` and scored by :func:`brats_ugrip.metrics.regions.label_map_scores`, as soups and ensemble
    fitting score. ``image`` (1, 4, x, y, z), ``label`` (1, 3, x, y, z)."""
    probabilities = sliding_window_probabilities(model, image, settings)
    labels = get_scheme(scheme).to_labels((probabilities[0] > settings.threshold).cpu().numpy())
    scores = label_map_scores(labels, label[0].cpu().numpy() > 0.5, scheme, with_hd95=False)
    return [scores[f"dice_{r}"] for r in REGIONS]


def summarise_dice(case_scores: list[list[float]]) -> dict[str, float]:
    """Per-region means over cases, and their mean: ``{"TC", "WT", "ET", "mean"}``."""
    per_region = np.asarray(case_scores, dtype=np.float64).mean(axis=0)
    metrics = {region: float(v) for region, v in zip(REGIONS, per_region)}
    metrics["mean"] = float(per_region.mean())
    return metrics


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, settings: Any, scheme: str = "brats2023") -> dict[str, float]:
    """Mean region Dice of ``model`` over a validation loader (as logged during training)."""
    return summarise_dice([case_dice(model, batch["image"], batch["label"], settings, scheme) for batch in loader])


def _rng_states() -> dict[str, Any]:
    """RNG states as tensors and plain types (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# --- divergence ---------------------------------------------------------------------------------------------


class DivergenceGuard(Callback):
    """Stops a run whose training loss becomes NaN or infinite with :class:`TrainingDivergedError` ("diverged at
    epoch E, step S": E counts epochs from 1, S is the optimizer step that used the loss), which the progress file
    records as the run's failure. A step's loss is copied to the host without waiting and checked when the next step
    ends, or before validation and the epoch's end (so before any checkpoint): on a GPU the check waits for that
    copy only, never for the step in flight, so it adds no synchronisation per step.
    Weights are checked where checkpoints are written (:meth:`SegmentationModule.on_save_checkpoint`)."""

    def __init__(self) -> None:
        self._pending: tuple[torch.Tensor, Any, int, int] | None = None  # host loss, its copy's CUDA event, E, S

    def _check(self) -> None:
        if self._pending is None:
            return
        loss, copied, epoch, step = self._pending
        self._pending = None
        if copied is not None:
            copied.synchronize()
        if not math.isfinite(float(loss)):
            raise TrainingDivergedError(f"diverged at epoch {epoch}, step {step}: the training loss is {float(loss)}; "
                                        "lower optim.lr, add warmup or trainer.gradient_clip")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._check()
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss, copied = loss.detach(), None
        if loss.is_cuda:
            host = torch.empty((), dtype=loss.dtype, pin_memory=True)
            host.copy_(loss, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            loss = host
        self._pending = (loss, copied, trainer.current_epoch + 1, trainer.global_step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check()


# --- progress file ------------------------------------------------------------------------------------------


class ProgressFile(Callback):
    """``RUN_DIR/progress.json``, written atomically at start, after each epoch and at the end; the monitor
    reads it. Fields: status (starting, running, completed, paused, failed, interrupted), epoch (completed),
    max_epochs, step, best_val_dice, best_epoch, val_metrics, val_curve (``[[epoch, val_metrics], ...]``: every
    validation so far, kept across resumes through the checkpoint, what ``promote: predicted`` extrapolates),
    epoch_seconds, first_step_seconds (includes ``torch.compile``), host, gpu, pid, slurm_job_id, config_hash,
    started_at, updated_at, finished_at, error."""

    def __init__(self, path: Path, config: RunConfig):
        self.path = path
        self.state: dict[str, Any] = {
            "status": "starting", "epoch": 0, "max_epochs": config.trainer.max_epochs, "step": 0,
            "best_val_dice": None, "best_epoch": None, "val_metrics": {}, "val_curve": [], "epoch_seconds": None,
            "first_step_seconds": None, "compile": config.trainer.compile, "host": socket.gethostname(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "config_hash": config.hash(),
            "started_at": now_iso(), "updated_at": None, "finished_at": None, "error": None,
        }
        self._epoch_started = 0.0
        self._first_step_started: float | None = None

    def write(self, **updates: Any) -> None:
        self.state.update(updates, updated_at=now_iso())
        if rank_zero_only.rank == 0:  # one writer when several processes train the run (DDP)
            atomic_write_json(self.path, self.state)

    def state_dict(self) -> dict[str, Any]:
        return {k: self.state[k] for k in ("best_val_dice", "best_epoch", "started_at", "val_curve")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state.update(state_dict)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume has restored the loops, so epoch and step are the checkpoint's.
        self.write(status="running", epoch=trainer.current_epoch, step=trainer.global_step, pid=os.getpid(),
                   trainable_parameters=getattr(pl_module, "trainable_parameters", None))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.state["first_step_seconds"] is None and self._first_step_started is None:
            self._first_step_started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.state["first_step_seconds"] is None and self._first_step_started is not None:
            self.state["first_step_seconds"] = round(time.perf_counter() - self._first_step_started, 3)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the module's on_validation_epoch_end (callbacks' epoch-end hooks run before the module's).
        metrics = getattr(pl_module, "val_metrics", {})
        if trainer.sanity_checking or not metrics:
            return
        epoch = trainer.current_epoch + 1
        best = self.state["best_val_dice"]
        if best is None or metrics["mean"] > best:
            self.state.update(best_val_dice=metrics["mean"], best_epoch=epoch)
        self.state["val_metrics"] = dict(metrics)
        # One entry per epoch: a resumed run re-validating an epoch it had (it never does today) replaces it.
        curve = [entry for entry in self.state.get("val_curve") or [] if entry[0] != epoch]
        self.state["val_curve"] = [*curve, [epoch, {k: float(v) for k, v in metrics.items()}]]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(epoch=trainer.current_epoch + 1, step=trainer.global_step,
                   epoch_seconds=round(time.perf_counter() - self._epoch_started, 3))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        stopped = isinstance(exception, (SIGTERMException, KeyboardInterrupt))  # preempted or cancelled: resumable
        # A diverged run's reason is its message ("diverged at epoch E, step S: ..."), what the monitor shows.
        error = str(exception) if isinstance(exception, TrainingDivergedError) else \
            f"{exception.__class__.__name__}: {exception}"
        self.write(status="interrupted" if stopped else "failed", error=error, finished_at=now_iso())


def read_progress(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The progress file of a run, or None when there is none yet."""
    path = progress_path(run_dir)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --- the entry point ----------------------------------------------------------------------------------------


def _as_config(config: RunConfig | dict[str, Any] | str | os.PathLike[str]) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


def check_runtime(config: RunConfig) -> None:
    """Checks that need this machine: a GPU for mixed precision."""
    if config.trainer.precision in GPU_PRECISIONS and not torch.cuda.is_available():
        raise ConfigError("trainer.precision", f"{config.trainer.precision} needs a GPU and this machine has none; "
                          "use 32 on CPU (e.g. --set trainer.precision=32)")
    if config.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator", "gpu requested but this machine has no CUDA device; use auto or cpu")


def _process_layout() -> tuple[int | str, int]:
    """Lightning's ``(devices, num_nodes)``: from the task layout when a scheduler started one process per device
    (``brats_ugrip.sweeps.jobs`` exports ``LOCAL_WORLD_SIZE`` and ``WORLD_SIZE`` for multi-task jobs), else every
    visible device of one node (``"auto"``: Lightning starts a process per GPU itself)."""
    if "LOCAL_WORLD_SIZE" not in os.environ:
        return "auto", 1
    local = int(os.environ["LOCAL_WORLD_SIZE"])
    return local, max(1, int(os.environ.get("WORLD_SIZE", local)) // local)


def wandb_run_id(config: RunConfig, run_dir: Path) -> str:
    """One W&B run per run directory and config: a resumed or requeued run (same directory, same config) continues
    the same W&B run; another config in the directory (refused by :func:`train` anyway) would be another run."""
    return hashlib.sha1(f"{run_dir.resolve()}|{config.hash()}".encode()).hexdigest()[:16]


def wandb_init_args(config: RunConfig, run_dir: Path) -> dict[str, Any]:
    """The arguments of ``wandb.init``: the resolved config as dotted keys (``optim.lr``, ``data.fold``, and
    ``logging.varied``: the keys a sweep varied), name = ``logging.run_name`` (a sweep's run id) or the directory's
    name, group = the sweep, job_type = ``fold<N>``, tags = the varied ``key=value``s."""
    logging = config.logging
    return {
        "project": logging.project, "name": logging.run_name or run_dir.name, "id": wandb_run_id(config, run_dir),
        "group": logging.group, "job_type": logging.job_type or f"fold{config.data.fold}",
        "tags": list(logging.tags), "config": {**flat_config(config), "config_hash": config.hash()},
        "save_dir": str(run_dir), "resume": "allow", "mode": logging.mode,
    }


class TrackedWandbLogger(WandbLogger):
    """Lightning's W&B logger that writes ``summary`` (code version, node, GPU of this attempt) into the run's
    summary when the W&B run starts (on rank 0 only, as Lightning starts it there)."""

    def __init__(self, summary: dict[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self._start_summary = summary

    @property
    def experiment(self) -> Any:
        starting = self._experiment is None
        experiment = super().experiment
        if starting and self._experiment is not None:
            experiment.summary.update(self._start_summary)
        return experiment


def _run_summary() -> dict[str, Any]:
    return {"git_commit": git_commit(), "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "gpu_count": torch.cuda.device_count()}


def _loggers(config: RunConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [ResumableCSVLogger(save_dir=str(run_dir), name=CSV_LOG_DIR, version="",
                                                    flush_logs_every_n_steps=1)]
    if config.logging.mode != "disabled":
        loggers.append(TrackedWandbLogger(_run_summary(), offline=config.logging.mode == "offline",
                                          **wandb_init_args(config, run_dir)))
    return loggers


def _cache_dir(config: RunConfig, run_dir: Path, shared: str | os.PathLike[str] | None) -> Path | None:
    """Where this run caches preprocessed cases: :func:`brats_ugrip.preprocess.case_cache_dir`'s one rule."""
    from brats_ugrip.preprocess import case_cache_dir

    return case_cache_dir(config.data.cache_dir, run_dir, shared)


def _trainer(config: RunConfig, run_dir: Path, max_epochs: int, callbacks: list[Callback]) -> pl.Trainer:
    """Lightning's trainer for a run: the config's settings, the task layout's devices, atomic checkpoint writes."""
    # Under SLURM, requeueing is submitit's job (brats_ugrip.sweeps.jobs), not Lightning's; elsewhere a plain environment
    # (which also spares the "srun is available but not used" warning on SLURM login nodes).
    environment = SLURMEnvironment(auto_requeue=False) if "SLURM_JOB_ID" in os.environ else LightningEnvironment()
    devices, num_nodes = _process_layout()
    trainer_config = config.trainer
    warnings.filterwarnings("ignore", message="The `srun` command is available")  # login nodes have srun
    return pl.Trainer(
        default_root_dir=str(run_dir), max_epochs=max_epochs, accelerator=trainer_config.accelerator,
        devices=devices, num_nodes=num_nodes, precision=trainer_config.precision, benchmark=trainer_config.cudnn_benchmark,
        check_val_every_n_epoch=trainer_config.val_every, num_sanity_val_steps=0,
        limit_train_batches=trainer_config.limit_train_batches, limit_val_batches=trainer_config.limit_val_batches,
        gradient_clip_val=trainer_config.gradient_clip, log_every_n_steps=trainer_config.log_every_n_steps,
        logger=_loggers(config, run_dir), callbacks=callbacks, plugins=[AtomicCheckpointIO(), environment],
        enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False,
    )


def _checkpoint_callbacks(checkpoints: Path) -> tuple[ModelCheckpoint, ModelCheckpoint]:
    """``best.ckpt`` (best validation Dice) and ``last.ckpt`` (every epoch's end, what a resumed run continues from)."""
    best = ModelCheckpoint(dirpath=checkpoints, filename=Path(BEST_CHECKPOINT).stem, monitor=MONITOR, mode="max",
                           save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
    last = ModelCheckpoint(dirpath=checkpoints, filename=Path(LAST_CHECKPOINT).stem, monitor=None, save_top_k=1,
                           every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False)
    return best, last


def train(config: RunConfig | dict[str, Any] | str | os.PathLike[str], run_dir: str | os.PathLike[str] | None = None,
          callbacks: Sequence[Callback] = (), stop_at_epoch: int | None = None,
          shared_cache: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Train one run in ``run_dir`` (default ``config.run_dir``), resuming from its ``last.ckpt`` if there is one.

    Args:
        config: a :class:`RunConfig`, its dict, or a YAML path.
        callbacks: extra Lightning callbacks (profilers, tests).
        shared_cache: the case cache of a group of runs (a sweep passes its own), used when neither
            ``data.cache_dir`` nor ``$BRATS_UGRIP_CACHE`` names one (:func:`brats_ugrip.preprocess.case_cache_dir`).
        stop_at_epoch: stop cleanly after this many epochs (a successive-halving rung), below
            ``trainer.max_epochs``: the run is then "paused", with ``last.ckpt`` to continue from and the latest
            validation in ``latest_val_metrics``. The config (and its hash) is unchanged: schedule-free AdamW ties nothing
            to the number of epochs, so a paused run continues exactly as one that never stopped.

    Returns:
        ``{"status", "run_dir", "best_checkpoint", "last_checkpoint", "best_val_dice", "best_epoch",
        "val_metrics" (of the best checkpoint), "epochs", "steps", "config_hash", "init_id"}``; status is
        "completed", or "paused" (``stop_at_epoch`` reached first) with ``latest_val_metrics`` too.
    """
    config = _as_config(config)
    if run_dir is None and config.run_dir is None:
        raise ConfigError("run_dir", "no run directory: set run_dir in the config or pass --run-dir")
    run_dir = Path(run_dir if run_dir is not None else config.run_dir).resolve()
    config = dataclasses.replace(config, run_dir=str(run_dir))
    check_runtime(config)
    datalist = Datalist.load(config.data.datalist, config.data.data_root)
    train_cases = check_run_data(config, datalist)

    checkpoints = checkpoint_dir(run_dir)
    last = last_checkpoint(run_dir)
    previous = read_progress(run_dir)
    if last.is_file() and previous and previous.get("config_hash") not in (None, config.hash()):
        raise ConfigError("run_dir", f"{run_dir} holds a run of another config (hash {previous['config_hash']}, this one "
                          f"{config.hash()}); use a new run directory or the original config")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in checkpoints.glob(".*.tmp"):  # left by a process killed while writing; the target is intact
        stale.unlink(missing_ok=True)  # several processes of one DDP run clean up at once
    save_config(config, config_path(run_dir))
    progress = ProgressFile(progress_path(run_dir), config)
    progress.write()

    pl.seed_everything(config.trainer.seed, workers=True, verbose=False)
    module = SegmentationModule(config)
    module.case_record = case_record(train_cases, datalist.fold_cases(config.data.fold), module.init_cases)
    cache = _cache_dir(config, run_dir, shared_cache)
    module.case_cache = str(cache.resolve()) if cache is not None else None
    train_loader, val_loader = make_loaders(
        datalist, config.data.fold, config.data.scheme, config.data.roi_size, config.data.batch_size,
        cache, config.data.num_workers, config.data.samples_per_case, train_cases=train_cases,
        intensity=config.data.augment_intensity, stage_dir=case_stage_dir())
    best, last_callback = _checkpoint_callbacks(checkpoints)
    trainer_config = config.trainer
    trainer = _trainer(config, run_dir, min(trainer_config.max_epochs, stop_at_epoch or trainer_config.max_epochs),
                       [DivergenceGuard(), progress, best, last_callback, *callbacks])
    if trainer_config.compile:
        rank_zero_info("torch.compile is on: the first training step includes compilation (seconds to minutes; "
                       "see first_step_seconds in progress.json)")
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(last) if last.is_file() else None, weights_only=True)
    finally:
        for logger in trainer.loggers:  # flush and close the W&B run (several runs may share a process)
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish(exit_code=0 if trainer.state.status.value == "finished" else 1)

    best_path = Path(best.best_model_path) if best.best_model_path else None
    best_meta = checkpoint_meta(load_checkpoint(best_path), best_path) if best_path and best_path.is_file() else {}
    paused = stop_at_epoch is not None and stop_at_epoch <= trainer.current_epoch < trainer_config.max_epochs
    status = "paused" if paused else "completed"
    progress.write(status=status, epoch=trainer.current_epoch, step=trainer.global_step, finished_at=now_iso())
    return {
        "status": status, "run_dir": str(run_dir),
        "best_checkpoint": str(best_path) if best_path else None, "last_checkpoint": str(last) if last.is_file() else None,
        "best_val_dice": progress.state["best_val_dice"], "best_epoch": progress.state["best_epoch"],
        "val_metrics": best_meta.get("val_metrics", {}), "epochs": trainer.current_epoch,
        **({"latest_val_metrics": progress.state["val_metrics"]} if status == "paused" else {}),
        "steps": trainer.global_step,
        "config_hash": config.hash(), "init_id": module.init_id,
    }
