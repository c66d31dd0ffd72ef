"""Losses on region channels (TC, WT, ET as independent sigmoid outputs), with deep supervision.

``dice_bce`` (default): soft Dice + binary cross-entropy. MONAI's ``DiceCELoss`` applies a softmax
cross-entropy to multi-channel inputs, which is wrong for overlapping regions, hence the explicit BCE here.
``dice``: soft Dice only. ``dice_focal``: soft Dice + sigmoid focal loss.

Dice is computed over the whole batch (``batch=True``), as nnU-Net and MedNeXt do: a patch without ET does not
produce a 0/0 Dice term.
"""
from __future__ import annotations

import torch
from monai.losses import DeepSupervisionLoss, DiceFocalLoss, DiceLoss
from torch import nn

from brats_ugrip.config import LossConfig


class DiceBCELoss(nn.Module):
    """Soft Dice (sigmoid) + BCE with logits; ``logits`` and ``target`` (B, C, ...), target in {0, 1}."""

    def __init__(self, smooth: float = 1e-5):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=smooth, batch=True)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + self.bce(logits, target)


def mednext_ds_weights(levels: int) -> list[float]:
    """Deep-supervision weights of MedNeXt (nnU-Net v1): 1/2^i per level, the lowest resolution weighted 0,
    normalised to sum to 1. ``levels``: number of outputs, full resolution first."""
    if levels == 1:
        return [1.0]
    weights = [0.5**i for i in range(levels - 1)] + [0.0]
    total = sum(weights)
    return [w / total for w in weights]


class SegmentationLoss(nn.Module):
    """The configured region loss, accepting a single logits tensor or a deep-supervision tuple
    (full resolution first; targets are resized to each level with nearest-exact interpolation)."""

    def __init__(self, config: LossConfig):
        super().__init__()
        if config.name == "dice_bce":
            base: nn.Module = DiceBCELoss(config.smooth)
        elif config.name == "dice":
            base = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=config.smooth, batch=True)
        elif config.name == "dice_focal":
            base = DiceFocalLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=config.smooth, batch=True)
        else:  # the config's Literal type makes this unreachable from YAML
            raise ValueError(f"unknown loss {config.name!r}")
        # MONAI's wrapper provides the target resizing; the weights are MedNeXt's, for any number of levels.
        self.levels = DeepSupervisionLoss(base)

    def forward(self, outputs: torch.Tensor | tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, (tuple, list)):
            return self.levels.get_loss(outputs.float(), target)
        # Zero-weighted levels stay in the graph, so every parameter gets a gradient (DDP requires it).
        weights = mednext_ds_weights(len(outputs))
        return sum(w * self.levels.get_loss(out.float(), target) for w, out in zip(weights, outputs))
