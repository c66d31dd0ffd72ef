"""Synthetic BraTS cases: a brain (atlas or procedural, see ``synthetic/anatomy.py``) with 1–2 glioma-like lesions.

    python synthetic/phantom.py --out DIR --cases 20 --size 96 --seed 0 [--prefix BraTS-PHA] [--full-size]

writes ``DIR/<ID>/<ID>-t1c.nii.gz``, ``-t1n``, ``-t2f``, ``-t2w`` (int16, skull-stripped: 0 outside the brain)
and ``-seg.nii.gz`` (uint8, BraTS 2023 labels 1 NETC, 2 SNFH, 3 ET) with ``<ID> = <prefix>-<case:05d>-000``.
Cubes have isotropic voxels of 192 mm / size centred on the brain; ``--full-size`` gives the 240×240×155 BraTS
grid with the atlas affine (1 mm, axis codes L, A, S). Case ``i`` is generated from the seed ``(seed, i)``, so
a case does not depend on how many cases are written or by how many workers.

Lesions are nested by construction: an irregular oedema (ellipsoid radius + smooth noise, spreading further in
white matter, clipped to the brain) holds a tumour core at least one voxel inside it, whose centre is a necrotic
core wrapped in an enhancing rim. Intensities mix per-class values (below) by the tissue's partial volumes, blend
the lesion in with soft edges and texture, then apply a smooth multiplicative bias field and Rician noise.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from brats_ugrip.cli import console, run, track
from brats_ugrip.data import MODALITIES, NAMINGS
from brats_ugrip.errors import ConfigError, DataError
from brats_ugrip.io import write_volume
from brats_ugrip.synthetic.anatomy import BRATS_SHAPE, CSF, GM, MIN_SIZE, WM, Anatomy, load_anatomy

NETC, SNFH, ET = 1, 2, 3  # BraTS 2023 labels


class Contrast(NamedTuple):
    """Relative intensity of each tissue in one MR sequence (normal white matter on T1 = 1)."""

    csf: float
    gm: float
    wm: float
    netc: float
    snfh: float
    et: float


CONTRASTS: dict[str, Contrast] = {
    # T1 post-gadolinium: enhancing rim brightest, necrosis dark, oedema darker than brain.
    "t1c": Contrast(csf=0.30, gm=0.70, wm=1.00, netc=0.35, snfh=0.62, et=1.60),
    # T1 native: the same without enhancement.
    "t1n": Contrast(csf=0.30, gm=0.70, wm=1.00, netc=0.40, snfh=0.62, et=0.72),
    # FLAIR: CSF suppressed, grey brighter than white, oedema brightest.
    "t2f": Contrast(csf=0.12, gm=0.75, wm=0.55, netc=0.55, snfh=1.25, et=0.95),
    # T2: fluid bright (CSF, necrosis, oedema), white matter darkest.
    "t2w": Contrast(csf=1.60, gm=0.70, wm=0.45, netc=1.30, snfh=1.05, et=0.85),
}

LESION_RADIUS_MM = ((18.0, 36.0), (10.0, 20.0))
"""Whole-tumour radius range of the first and of the second lesion."""
MIN_LESION_RADIUS_VOXELS = 6.0  # keeps a necrotic core and an enhancing rim resolvable on coarse grids


@dataclass
class Phantom:
    """One synthetic case.

    Args:
        images: int16 ``(X, Y, Z)`` per modality, keyed ``t1c``, ``t1n``, ``t2f``, ``t2w``; 0 outside the brain.
        label: uint8 ``(X, Y, Z)`` BraTS 2023 labels (0, 1 NETC, 2 SNFH, 3 ET).
        affine: ``(4, 4)`` voxel → world (mm), as written to the NIfTI files.
    """

    images: dict[str, np.ndarray]
    label: np.ndarray
    affine: np.ndarray


def case_seed(seed: int, index: int) -> np.random.SeedSequence:
    """The random stream of case ``index`` of a run seeded with ``seed``."""
    return np.random.SeedSequence([seed, index])


def case_id(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}-000"


def make_phantom(shape: Sequence[int] = (96, 96, 96), seed: int | np.random.SeedSequence = 0,
                 anatomy: Anatomy | None = None) -> Phantom:
    """Generate one case in the grid ``shape`` (the anatomy's, if given); identical for identical seeds."""
    shape = tuple(int(s) for s in shape)
    anatomy = anatomy or load_anatomy(shape)
    if anatomy.shape != shape:
        raise DataError(f"anatomy grid {anatomy.shape} does not match the phantom grid {shape}")
    rng = np.random.default_rng(seed)
    label = _lesion_labels(anatomy, rng)
    bounds = np.argwhere(label)
    box = tuple(slice(max(lo - 3, 0), hi + 4) for lo, hi in zip(bounds.min(0), bounds.max(0)))
    scene = _Scene(anatomy, label, box,
                   texture=_smooth_noise(rng, label[box].shape, cells=4),
                   tissue=anatomy.tissue.ravel()[anatomy.brain_index])
    images = {m: _synthesise(CONTRASTS[m], scene, rng) for m in MODALITIES}
    return Phantom(images, label, anatomy.affine.copy())


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], cells: int) -> np.ndarray:
    """Smooth random field ``shape`` (float32, zero mean, unit spread): Gaussian-kernel interpolation of a coarse
    random grid of ``cells + 1`` nodes a side, separable, so it costs about ``cells`` multiply-adds a voxel."""
    field = rng.standard_normal((cells + 1,) * 3).astype(np.float32)
    nodes = np.linspace(0.0, 1.0, cells + 1)
    for axis, n in enumerate(shape):
        weights = np.exp(-0.5 * ((np.linspace(0.0, 1.0, n)[:, None] - nodes[None, :]) * cells / 0.6) ** 2)
        weights /= weights.sum(axis=1, keepdims=True)
        field = np.moveaxis(np.tensordot(weights.astype(np.float32), field, axes=(1, axis)), 0, axis)
    return (field - field.mean()) / (field.std() + 1e-6)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _lesion_labels(anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """uint8 BraTS 2023 label map with 1–2 nested irregular lesions centred in white matter."""
    shape, spacing = anatomy.shape, anatomy.spacing
    # Nesting rank (inner wins when lesions overlap): 1 oedema, 2 enhancing, 3 necrosis.
    rank = np.zeros(shape, np.uint8)
    white_matter = np.flatnonzero(anatomy.classes == WM)
    for radius_range in LESION_RADIUS_MM[: rng.integers(1, 3)]:
        centre = np.array(np.unravel_index(rng.choice(white_matter), shape))
        radius_mm = max(rng.uniform(*radius_range), MIN_LESION_RADIUS_VOXELS * spacing.max())
        semi_axes = radius_mm * np.array([1.0, *rng.uniform(0.7, 1.0, 2)])
        half = np.ceil(1.5 * radius_mm / spacing).astype(int) + 2
        box = tuple(slice(max(c - h, 0), min(c + h + 1, n)) for c, h, n in zip(centre, half, shape))
        grid = np.meshgrid(*(np.arange(s.start, s.stop) for s in box), indexing="ij")
        offsets_mm = np.stack([(g - c) * d for g, c, d in zip(grid, centre, spacing)], axis=-1)
        rho = np.linalg.norm((offsets_mm @ _random_rotation(rng)) / semi_axes, axis=-1)  # 1 on the ellipsoid
        box_shape = rho.shape
        tissue = anatomy.tissue[box]
        white = np.clip(tissue - GM, 0, 1)
        whole = ((rho + 0.3 * _smooth_noise(rng, box_shape, 5) - 0.2 * white < 1) | (rho < 0.3)) & (tissue > 0)
        core_fraction = rng.uniform(0.4, 0.6)
        core = (rho / core_fraction + 0.3 * _smooth_noise(rng, box_shape, 4) < 1) & ndimage.binary_erosion(whole)
        rim_voxels = max(1, round(rng.uniform(2.0, 5.0) / spacing.min()))
        necrosis_fraction = core_fraction * rng.uniform(0.5, 0.8)
        necrosis = ((rho / necrosis_fraction + 0.3 * _smooth_noise(rng, box_shape, 3) < 1)
                    & ndimage.binary_erosion(core, iterations=rim_voxels))
        np.maximum(rank[box], whole.astype(np.uint8) + core + necrosis, out=rank[box])
    return np.array([0, SNFH, ET, NETC], np.uint8)[rank]


class _Scene(NamedTuple):
    """What every modality of one case shares."""

    anatomy: Anatomy
    label: np.ndarray  # uint8 (X, Y, Z)
    box: tuple[slice, ...]  # the lesions' bounding box with a margin
    texture: np.ndarray  # float32, the box's shape: lesion heterogeneity
    tissue: np.ndarray  # float32 (N,): tissue coordinate of the brain voxels


def _synthesise(contrast: Contrast, scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """One modality, int16 ``(X, Y, Z)``: tissue mixture → lesion blend → bias field → Rician noise → scaling."""
    values = Contrast(*(np.asarray(contrast) * rng.lognormal(0.0, 0.05, len(contrast))))
    anatomy, label, box, brain = scene.anatomy, scene.label, scene.box, scene.anatomy.brain_index
    image = np.zeros(anatomy.shape, np.float32)
    image.ravel()[brain] = np.interp(scene.tissue, [CSF, GM, WM], [values.csf, values.gm, values.wm])
    # Lesion intensities per label (oedema's just outside it, so the blurred edge fades into oedema).
    lesion = np.array([values.snfh, values.netc, values.snfh, values.et], np.float32)[label[box]]
    lesion = ndimage.gaussian_filter(lesion, 0.6) * (1 + 0.08 * scene.texture)
    weight = ndimage.gaussian_filter((label[box] > 0).astype(np.float32), 0.7)
    image[box] += weight * (lesion - image[box])
    _apply_bias_field(image, rng)
    signal = image.ravel()[brain]
    sigma = rng.uniform(0.015, 0.04) * values.wm
    noisy = np.hypot(signal + sigma * rng.standard_normal(signal.size, np.float32),
                     sigma * rng.standard_normal(signal.size, np.float32))
    gain = rng.uniform(300.0, 1200.0)
    out = np.zeros(anatomy.shape, np.int16)
    # At least 1 inside the brain, so "non-zero" means "brain" as in skull-stripped BraTS images.
    out.ravel()[brain] = np.clip(np.rint(noisy * gain), 1, np.iinfo(np.int16).max)
    return out


def _apply_bias_field(image: np.ndarray, rng: np.random.Generator) -> None:
    """Multiply ``image`` in place by a smooth separable field: ``exp(a·u + b·u²)`` per axis, ``u`` in [-1, 1]."""
    for axis, n in enumerate(image.shape):
        u = np.linspace(-1.0, 1.0, n)
        a, b = rng.normal(0.0, 0.12, 2)
        image *= np.exp(a * u + b * u * u).astype(np.float32).reshape([-1 if k == axis else 1 for k in range(3)])


def write_case(phantom: Phantom, out_dir: str | os.PathLike[str], case: str) -> Path:
    """Write ``phantom`` as the BraTS 2023 case ``out_dir/<case>/``; returns that folder."""
    out_dir = Path(out_dir)
    naming = NAMINGS["brats2023"]
    for name, modality in zip(naming.image_names(case), MODALITIES):
        write_volume(out_dir / name, phantom.images[modality], phantom.affine)
    write_volume(out_dir / naming.label_name(case), phantom.label, phantom.affine)
    return out_dir / case


def _write_one(out_dir: Path, shape: tuple[int, int, int], seed: int, index: int, prefix: str) -> Path:
    return write_case(make_phantom(shape, case_seed(seed, index), load_anatomy(shape)), out_dir, case_id(prefix, index))


def write_phantoms(out_dir: str | os.PathLike[str], n_cases: int, size: int | Sequence[int] = 96, seed: int = 0,
                   prefix: str = "BraTS-PHA", workers: int = 1, progress: bool = False) -> list[Path]:
    """Write cases ``0 … n_cases-1`` under ``out_dir``.

    Args:
        size: edge of a cube, or a full shape such as ``BRATS_SHAPE``.
        workers: processes generating cases in parallel (the output is the same for any number).
        progress: draw a progress bar.

    Returns:
        the case folders, in case order.
    """
    shape = (int(size),) * 3 if np.isscalar(size) else tuple(int(s) for s in size)
    if n_cases < 1:
        raise ConfigError("--cases", f"must be at least 1, got {n_cases}")
    if len(shape) != 3 or min(shape) < MIN_SIZE:
        raise ConfigError("--size", f"phantoms need at least {MIN_SIZE} voxels a side, got {shape}")
    out_dir = Path(out_dir)
    load_anatomy(shape)  # build the cached anatomy once, before any worker needs it
    description = f"phantoms {'×'.join(map(str, shape))}"
    if workers <= 1:
        indices = track(range(n_cases), description) if progress else range(n_cases)
        return [_write_one(out_dir, shape, seed, i, prefix) for i in indices]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_write_one, out_dir, shape, seed, i, prefix) for i in range(n_cases)]
        for future in track(as_completed(futures), description, n_cases) if progress else as_completed(futures):
            future.result()
    return [out_dir / case_id(prefix, i) for i in range(n_cases)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (case folders are created in it)")
    parser.add_argument("--cases", type=int, default=10, help="number of cases (default 10)")
    parser.add_argument("--size", type=int, default=96, help="cube edge in voxels (default 96)")
    parser.add_argument("--full-size", action="store_true", help=f"use the BraTS grid {BRATS_SHAPE} instead of a cube")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--prefix", default="BraTS-PHA", help="case id prefix (default BraTS-PHA)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    args = parser.parse_args(argv)
    size = BRATS_SHAPE if args.full_size else args.size
    paths = write_phantoms(args.out, args.cases, size, args.seed, args.prefix, args.workers, progress=True)
    console.print(f"{args.out}: {len(paths)} phantom cases ({paths[0].name} … {paths[-1].name})")
    return 0


if __name__ == "__main__":
    run(main)
