"""PyTorch datasets and loaders over preprocessed (cached) cases.

Training items are random patches biased towards tumour with flips and intensity jitter (MONAI transforms,
run in loader workers); validation items are whole brain crops, evaluated with sliding-window inference.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)
from torch.utils.data import DataLoader, Dataset

from brats_ugrip.data import Case, Datalist
from brats_ugrip.labels import LabelScheme, get_scheme
from brats_ugrip.preprocess import CaseCache


def train_transforms(roi_size: Sequence[int], pos_fraction: float = 0.5, augment: bool = True) -> Compose:
    """Random ``roi_size`` patch (centre on tumour with probability ``pos_fraction``), flips on every axis,
    per-channel intensity scale and shift. Input/output dict keys ``image`` (4, ...) and ``label`` (3, ...)."""
    roi = tuple(int(r) for r in roi_size)
    steps = [
        SpatialPadd(keys=("image", "label"), spatial_size=roi),
        RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=roi,
                               pos=pos_fraction, neg=1.0 - pos_fraction, num_samples=1, allow_smaller=False),
    ]
    if augment:
        steps += [RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=axis) for axis in range(3)]
        steps += [RandScaleIntensityd(keys="image", factors=0.1, prob=1.0, channel_wise=True),
                  RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0, channel_wise=True)]
    return Compose(steps)


class TrainDataset(Dataset):
    """``samples_per_case`` random patches per case and epoch.

    Items: ``{"image": float32 (4, *roi), "label": float32 (3, *roi)}`` (label channels TC, WT, ET).
    """

    def __init__(self, cases: Sequence[Case], scheme: LabelScheme | str, roi_size: Sequence[int], cache: CaseCache,
                 samples_per_case: int = 1, augment: bool = True, pos_fraction: float = 0.5):
        self.cases = list(cases)
        self.scheme = get_scheme(scheme).name
        self.cache = cache
        self.samples_per_case = samples_per_case
        self.transform = train_transforms(roi_size, pos_fraction, augment)

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_case

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        case = self.cases[index // self.samples_per_case]
        pre = self.cache.get(case, self.scheme)
        if pre.regions is None:
            raise ValueError(f"{case.case_id}: a training case needs a label")
        item = {"image": pre.image.astype(np.float32), "label": pre.regions.astype(np.float32)}
        patch = self.transform(item)[0]
        return {"image": torch.as_tensor(np.asarray(patch["image"]), dtype=torch.float32),
                "label": torch.as_tensor(np.asarray(patch["label"]), dtype=torch.float32)}


class ValDataset(Dataset):
    """Whole brain crops: ``{"image": (4, x, y, z), "label": (3, x, y, z), "case_id": str}``."""

    def __init__(self, cases: Sequence[Case], scheme: LabelScheme | str, cache: CaseCache):
        self.cases = list(cases)
        self.scheme = get_scheme(scheme).name
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        pre = self.cache.get(case, self.scheme)
        item = {"image": torch.as_tensor(pre.image.astype(np.float32)), "case_id": case.case_id}
        if pre.regions is not None:
            item["label"] = torch.as_tensor(pre.regions.astype(np.float32))
        return item


def make_loaders(datalist: Datalist, fold: int, scheme: LabelScheme | str, roi_size: Sequence[int], batch_size: int,
                 cache_dir: str | os.PathLike[str] | None, num_workers: int = 0, samples_per_case: int = 1,
                 train_cases: Sequence[Case] | None = None) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders for ``fold`` (validation: that fold; training: the rest and fold −1).

    Args:
        train_cases: overrides the training split (e.g. to mix in extra sources).
    """
    train, val = datalist.split(fold)
    cache = CaseCache(cache_dir)
    workers = {"num_workers": num_workers, "persistent_workers": num_workers > 0,
               "pin_memory": torch.cuda.is_available()}
    train_loader = DataLoader(TrainDataset(train_cases if train_cases is not None else train, scheme, roi_size, cache,
                                           samples_per_case), batch_size=batch_size, shuffle=True, drop_last=False,
                              **workers)
    val_loader = DataLoader(ValDataset(val, scheme, cache), batch_size=1, shuffle=False, **workers)
    return train_loader, val_loader
