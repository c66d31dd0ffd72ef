"""Optimizers (``adamw``, ``sgd``, schedule-free ``adamw_sf``) and learning-rate schedules (none, poly, cosine).

Schedule-free AdamW keeps two sets of weights: ``y`` (where gradients are taken, in the parameters while the
optimizer is in ``train()`` mode) and the average ``x`` (in the parameters after ``eval()``). Validation, testing
and every checkpoint must see ``x``; :func:`averaged_parameters` computes ``x`` without touching the live
parameters, so a checkpoint written at any moment can hold the averaged weights.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from schedulefree import AdamWScheduleFree

from brats_ugrip.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimizer over ``params`` (pass only trainable ones). AdamW is fused on CUDA."""
    params = list(params)
    if config.name == "adamw":
        fused = bool(params) and all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                 fused=fused or None)
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
                               weight_decay=config.weight_decay)
    if config.name == "adamw_sf":
        return AdamWScheduleFree(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                 warmup_steps=config.warmup_steps)
    raise ValueError(f"unknown optimizer {config.name!r}")


@dataclass
class WarmupSchedule:
    """Learning-rate factor at a step: linear warmup over ``warmup`` steps, then ``poly`` ((1 − t)^0.9),
    ``cosine`` or constant (``none``) over the remaining ``total − warmup`` steps. A plain object, so
    ``LambdaLR.state_dict()`` stores its fields and a resumed run continues the same schedule."""

    kind: str
    warmup: int
    total: int

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "none":
            return 1.0
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        if self.kind == "poly":
            return (1.0 - progress) ** 0.9
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A per-step schedule, or None (schedule-free, or constant without warmup)."""
    if config.name == "adamw_sf" or (config.scheduler == "none" and config.warmup_steps == 0):
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(config.scheduler, config.warmup_steps, total_steps))


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    return "train_mode" in optimizer.defaults


def set_train_mode(optimizer: torch.optim.Optimizer, train: bool) -> None:
    """``optimizer.train()`` / ``.eval()`` for schedule-free optimizers; nothing for the others."""
    if is_schedule_free(optimizer):
        optimizer.train() if train else optimizer.eval()


@torch.no_grad()
def averaged_parameters(optimizer: torch.optim.Optimizer) -> dict[torch.nn.Parameter, torch.Tensor]:
    """For a schedule-free optimizer in train mode: the averaged weights ``x`` of each parameter, computed as
    ``eval()`` would (``y.lerp(z, 1 − 1/β1)``) but out of place. Empty when the parameters already hold ``x``."""
    averaged: dict[torch.nn.Parameter, torch.Tensor] = {}
    if not is_schedule_free(optimizer):
        return averaged
    for group in optimizer.param_groups:
        if not group["train_mode"]:
            continue
        beta1 = group["betas"][0]
        for param in group["params"]:
            state = optimizer.state[param]
            if "z" in state:
                averaged[param] = param.lerp(state["z"].to(param.device), 1 - 1 / beta1)
    return averaged
