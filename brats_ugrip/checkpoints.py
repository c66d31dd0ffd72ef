"""Checkpoints: safe loading (``torch.load(weights_only=True)``), metadata, and models rebuilt from them.

A brats-ugrip checkpoint is a dict of plain types and tensors, and its weights are finite: every loader refuses
NaN or infinite weights, naming the file and the first bad tensor. Lightning checkpoints (``best.ckpt``,
``last.ckpt``) hold the LightningModule's ``state_dict`` (keys prefixed ``model.``, plus ``_orig_mod.`` when the
network was compiled) and everything Lightning needs to resume; model-only checkpoints written by
:func:`save_model_checkpoint` (soups, exported models) hold the bare network ``state_dict``. Both carry
``checkpoint["brats_ugrip"]``, the metadata::

    format: 1
    config: the resolved run config (dict)          model: {"name": str, "kwargs": dict}
    fold: int        epoch: epochs completed        step: optimizer steps
    val_metrics: {"TC": .., "WT": .., "ET": .., "mean": ..} of these weights (empty before any validation)
    val_epoch: the epoch those metrics were measured at (None before any validation)
    git_commit: str | None                           init_id: hash of the initial weights (see below)
    weights: "averaged" (schedule-free: the x weights) or "current"
    created: ISO timestamp                           (soups add their own keys, e.g. "soup")

``init_id`` identifies the initialisation: the hash of the network's weights before the first step, or, for a
run fine-tuned from a checkpoint (``finetune.init_from``), that checkpoint's ``init_id``. Soups use it to tell
which checkpoints share an initialisation.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import zipfile
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brats_ugrip.atomic import atomic_write
from brats_ugrip.errors import CheckpointError
from brats_ugrip.models import create_model

META_KEY = "brats_ugrip"
FORMAT_VERSION = 1
LIGHTNING_PREFIX = "model."
COMPILE_PREFIX = "_orig_mod."


def first_nonfinite(state_dict: dict[str, Any]) -> tuple[str, int] | None:
    """``(name, count)`` of the first floating-point tensor (in ``state_dict`` order) holding NaN or ±inf values."""
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex()):
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                return name, int(finite.numel() - finite.sum())
    return None


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; a clear :class:`CheckpointError` otherwise, also
    when a weight is NaN or infinite (a diverged run: its predictions are empty, a soup with it is all NaN).
    ``mmap``: tensors stay on disk until used, and are not checked (a read of the metadata only; whatever uses the
    weights loads them without ``mmap``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused by weights_only loading: it holds pickled Python objects, not only "
                              f"tensors and plain types; it was not written by brats-ugrip ({error})") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint, corrupt or truncated "
                              f"({error.__class__.__name__}: {error})") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a model checkpoint (expected a dict with a 'state_dict')")
    bad = None if mmap else first_nonfinite(checkpoint["state_dict"])
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad[0]!r} holds {bad[1]} NaN or infinite values (the run diverged); "
                              "refused, as any model with it would predict nothing")
    return checkpoint


def checkpoint_meta(checkpoint: dict[str, Any], path: str | os.PathLike[str] = "checkpoint") -> dict[str, Any]:
    """The brats-ugrip metadata of a loaded checkpoint."""
    meta = checkpoint.get(META_KEY)
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(f"{path}: has no brats-ugrip metadata (model name and settings); "
                              "was it written by brats_ugrip.train or save_model_checkpoint?")
    return meta


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's ``state_dict`` with the exact prefixes ``model.`` (Lightning) and ``_orig_mod.``
    (``torch.compile``) removed, so it loads into an uncompiled network."""
    state = checkpoint["state_dict"]
    if "pytorch-lightning_version" in checkpoint:
        state = {k.removeprefix(LIGHTNING_PREFIX): v for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}
    return {k.removeprefix(COMPILE_PREFIX): v for k, v in state.items()}


def build_model(meta: dict[str, Any]) -> nn.Module:
    """An untrained network with the architecture recorded in ``meta``."""
    return create_model(meta["model"]["name"], **meta["model"]["kwargs"])


def load_model(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network of a checkpoint and load its weights. Returns ``(model in eval mode, metadata)``."""
    checkpoint = load_checkpoint(path, map_location)
    meta = checkpoint_meta(checkpoint, path)
    model = build_model(meta)
    try:
        model.load_state_dict(model_state_dict(checkpoint))
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit {meta['model']['name']} {meta['model']['kwargs']} "
                              f"({error})") from error
    return model.to(map_location).eval(), meta


def save_model_checkpoint(path: str | os.PathLike[str], state_dict: dict[str, torch.Tensor],
                          meta: dict[str, Any]) -> Path:
    """Write a model-only checkpoint (bare network ``state_dict`` + metadata) atomically."""
    checkpoint = {"state_dict": {k.removeprefix(COMPILE_PREFIX): v.detach().cpu() for k, v in state_dict.items()},
                  META_KEY: {"format": FORMAT_VERSION, "created": now_iso(), **meta}}
    return atomic_write(path, lambda handle: torch.save(checkpoint, handle))


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """16 hex digits identifying a set of weights (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha1()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the brats-ugrip source tree, or None outside a git checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
