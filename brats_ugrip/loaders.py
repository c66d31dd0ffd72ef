"""PyTorch datasets and loaders over preprocessed (cached) cases.

Training items are random patches biased towards tumour with flips and intensity jitter (computed
in loader workers); validation items are whole brain crops, evaluated with sliding-window inference.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from brats_ugrip.data import Case, Datalist
from brats_ugrip.labels import LabelScheme, get_scheme
from brats_ugrip.preprocess import CaseCache


def tumour_biased_box(shape: Sequence[int], roi: Sequence[int], foreground: np.ndarray, pos_fraction: float,
                      generator: torch.Generator) -> tuple[slice, ...]:
    """A random ``roi`` box inside ``shape`` (clipped when the volume is smaller), centred with probability
    ``pos_fraction`` on a random voxel of ``foreground`` (flat indices) and otherwise on a uniform random voxel."""
    if len(foreground) and torch.rand((), generator=generator) < pos_fraction:
        flat = int(foreground[int(torch.randint(len(foreground), (), generator=generator))])
        centre = np.unravel_index(flat, tuple(shape))
    else:
        centre = [int(torch.randint(n, (), generator=generator)) for n in shape]
    box = []
    for c, size, n in zip(centre, roi, shape):
        start = min(max(int(c) - size // 2, 0), max(n - size, 0))
        box.append(slice(start, start + size))
    return tuple(box)


def pad_to(array: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    """Zero-pad the spatial axes of (C, x, y, z) ``array`` symmetrically up to ``roi``."""
    missing = [max(r - n, 0) for r, n in zip(roi, array.shape[1:])]
    if not any(missing):
        return array
    return np.pad(array, [(0, 0)] + [(m // 2, m - m // 2) for m in missing])


def augment_patch(image: torch.Tensor, label: torch.Tensor, generator: torch.Generator,
                  intensity: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random flips on every axis (image and label together), and the draw of a per-channel intensity jitter
    ``image * (1 + U(±intensity)) + U(±intensity)`` on brain voxels, applied later by :func:`training_batch`
    (on the GPU when training on one: in the worker it would mean float32 copies of the whole patch).

    Returns:
        the flipped ``image`` and ``label`` (their dtypes kept) and the jitter ``(2, C)`` float32 (scale, shift).
    """
    axes = [axis + 1 for axis in range(3) if torch.rand((), generator=generator) < 0.5]
    if axes:
        image, label = image.flip(axes), label.flip(axes)
    jitter = (torch.rand((2, image.shape[0]), generator=generator) * 2 - 1) * intensity
    return image, label, jitter


def training_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loader batch of compact training patches → float32 network input and target, on the batch's device.

    Args:
        batch: ``{"image": float16 (B, 4, *roi), "label": uint8 (B, 3, *roi), "jitter": float32 (B, 2, 4)}``.

    Returns:
        ``{"image": float32 (B, 4, *roi) with the intensity jitter applied, "label": float32 (B, 3, *roi)}``.
    """
    image = batch["image"].float()
    scale, shift = (batch["jitter"][:, i, :, None, None, None].to(image) for i in range(2))
    return {"image": image * (1 + scale) + (image != 0) * shift, "label": batch["label"].float()}


class TrainDataset(Dataset):
    """``samples_per_case`` random patches per case and epoch.

    Items are compact: ``{"image": float16 (4, *roi), "label": uint8 (3, *roi), "jitter": float32 (2, 4)}``
    (label channels TC, WT, ET); :func:`training_batch` turns a batch into float32 input and target. The patch
    is cut from the memory-mapped cached arrays and never converted in the worker, so an item costs a copy of
    the patch at 11 bytes a voxel (float32 image and label would be 28) to cut, flip, send and collate.
    Randomness comes from torch's per-worker RNG, so loader workers draw different patches and runs are
    reproducible under ``seed_everything``.
    """

    def __init__(self, cases: Sequence[Case], scheme: LabelScheme | str, roi_size: Sequence[int], cache: CaseCache,
                 samples_per_case: int = 1, augment: bool = True, pos_fraction: float = 0.5,
                 intensity: float = 0.1):
        self.cases = list(cases)
        self.intensity = intensity  # augmentation strength: see augment_patch
        self.scheme = get_scheme(scheme).name
        self.cache = cache
        self.roi = tuple(int(r) for r in roi_size)
        self.samples_per_case = samples_per_case
        self.pos_fraction = pos_fraction
        self.augment = augment

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_case

    def patch(self, index: int, generator: torch.Generator) -> dict[str, np.ndarray]:
        """The un-augmented patch of item ``index``: ``image`` float16 (4, *roi), ``label`` uint8 (3, *roi)."""
        case = self.cases[index // self.samples_per_case]
        pre = self.cache.get(case, self.scheme, mmap=True)
        if pre.regions is None:
            raise ValueError(f"{case.case_id}: a training case needs a label")
        box = (slice(None), *tumour_biased_box(pre.image.shape[1:], self.roi, pre.tumour_voxels,
                                                self.pos_fraction, generator))
        # np.array copies: the patch leaves the (read-only) memory map, once.
        return {"image": pad_to(np.array(pre.image[box], dtype=np.float16), self.roi),
                "label": pad_to(np.array(pre.regions[box], dtype=np.uint8), self.roi)}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        item = self.patch(index, generator)
        image, label = torch.from_numpy(item["image"]), torch.from_numpy(item["label"])
        if not self.augment:
            return {"image": image, "label": label, "jitter": torch.zeros(2, image.shape[0])}
        image, label, jitter = augment_patch(image, label, generator, self.intensity)
        return {"image": image, "label": label, "jitter": jitter}


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
                 train_cases: Sequence[Case] | None = None, intensity: float = 0.1,
                 stage_dir: str | os.PathLike[str] | None = None) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders for ``fold`` (validation: that fold; training: the rest and fold −1).

    Args:
        train_cases: overrides the training split (e.g. to mix in extra sources).
        intensity: augmentation strength of the training patches (:func:`augment_patch`).
        stage_dir: node-local folder the cached cases are read from (:func:`~brats_ugrip.preprocess.case_stage_dir`).
    """
    train, val = datalist.split(fold)
    cache = CaseCache(cache_dir, stage_dir=stage_dir)
    workers = {"num_workers": num_workers, "persistent_workers": num_workers > 0,
               "pin_memory": torch.cuda.is_available()}
    train_set = TrainDataset(train_cases if train_cases is not None else train, scheme, roi_size, cache, samples_per_case,
                             intensity=intensity)
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=False, **workers)
    val_loader = DataLoader(ValDataset(val, scheme, cache), batch_size=1, shuffle=False, **workers)
    return train_loader, val_loader
