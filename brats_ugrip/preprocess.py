"""Preprocessing shared by training, validation and inference, and a disk cache of its results.

Every image is checked finite where it is read (``brats_ugrip.io.read_volume``): a case with a NaN or infinite
voxel is refused with a :class:`~brats_ugrip.errors.DataError` naming the case, modality, file and count, never
zero-filled, so training and inference (which both preprocess here) stop on it.

One case becomes a :class:`PreprocessedCase`: the four modalities reoriented to RAS, cropped to the brain's
bounding box (plus a margin) and z-score normalised per channel on non-zero (brain) voxels; the label as
region channels (TC, WT, ET). :meth:`PreprocessedCase.restore` pastes an array predicted on the crop back into
the input's full shape and orientation, so predictions are written in the input geometry.

:class:`CaseCache` stores preprocessed cases as fp16/uint8 ``.npy`` files: reading one is tens of times faster
than decoding four ``.nii.gz`` (``bench/cache.py``), so epochs never re-decode NIfTI. An entry is keyed by the
case's content (each file's size and a hash of its first and last MiB, not its path) and the preprocessing
settings, so every run of a dataset shares one cache: :func:`case_cache_dir` is the one rule for where it lives.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from brats_ugrip.atomic import atomic_path, atomic_write_json
from brats_ugrip.data import MODALITIES, Case
from brats_ugrip.errors import DataError
from brats_ugrip.io import read_volume
from brats_ugrip.labels import LabelScheme, get_scheme
from brats_ugrip.run_files import own_cache

CACHE_VERSION = 3
CACHE_ENV = "BRATS_UGRIP_CACHE"
STAGE_ENV = "BRATS_UGRIP_STAGE_DIR"
"""A shared cache root (e.g. a project folder on the cluster): its ``cases/`` folder serves every run."""
_FINGERPRINT_BYTES = 1 << 20
BRAIN_MARGIN = 2
"""Voxels kept around the brain's bounding box by default (training, validation and inference alike)."""
RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))


@dataclass(frozen=True)
class CaseGeometry:
    """Where a crop sits in its input volume.

    Attributes:
        shape: input volume shape ``(X, Y, Z)`` in the file's own orientation.
        affine: the input's 4×4 affine.
        ornt: nibabel orientation of the input axes (``io_orientation``), used to go to RAS and back.
        bbox_start, bbox_stop: the crop in RAS voxel coordinates (stop exclusive).
    """

    shape: tuple[int, int, int]
    affine: tuple[tuple[float, ...], ...]
    ornt: tuple[tuple[float, float], ...]
    bbox_start: tuple[int, int, int]
    bbox_stop: tuple[int, int, int]

    @property
    def crop_shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.bbox_start, self.bbox_stop))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> CaseGeometry:
        return cls(tuple(obj["shape"]), tuple(map(tuple, obj["affine"])), tuple(map(tuple, obj["ornt"])),
                   tuple(obj["bbox_start"]), tuple(obj["bbox_stop"]))


def _to_ras(volume: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    return nib.orientations.apply_orientation(volume, nib.orientations.ornt_transform(ornt, RAS))


def _from_ras(volume: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    return nib.orientations.apply_orientation(volume, nib.orientations.ornt_transform(RAS, ornt))


@dataclass
class PreprocessedCase:
    """A case ready for a network.

    Attributes:
        case_id: the case's id.
        image: float (4, x, y, z), RAS, cropped to the brain box, normalised; channels in ``MODALITIES`` order.
        regions: uint8 (3, x, y, z) TC, WT, ET on the same crop, or None for unlabelled cases.
        geometry: what :meth:`restore` needs.
        tumour_voxels: int32 flat indices of the whole-tumour voxels of the crop (for tumour-biased sampling).
    """

    case_id: str
    image: np.ndarray
    regions: np.ndarray | None
    geometry: CaseGeometry
    tumour_voxels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.tumour_voxels is None and self.regions is not None:
            self.tumour_voxels = np.flatnonzero(self.regions[1]).astype(np.int32)

    def restore(self, array: np.ndarray, fill: float = 0) -> np.ndarray:
        """Paste ``array`` (C, x, y, z) computed on the crop back into the input geometry: (C, X, Y, Z)."""
        geometry = self.geometry
        if tuple(array.shape[1:]) != geometry.crop_shape:
            raise ValueError(f"{self.case_id}: array of shape {array.shape} does not match the crop {geometry.crop_shape}")
        ornt = np.asarray(geometry.ornt)
        ras_shape = _to_ras(np.empty(geometry.shape, dtype=np.uint8), ornt).shape
        full = np.full((array.shape[0], *ras_shape), fill, dtype=array.dtype)
        box = tuple(slice(a, b) for a, b in zip(geometry.bbox_start, geometry.bbox_stop))
        full[(slice(None), *box)] = array
        return np.stack([_from_ras(channel, ornt) for channel in full])


def brain_bbox(mask: np.ndarray, margin: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bounding box ``(start, stop)`` of the non-zero voxels of ``mask`` grown by ``margin`` voxels (clipped)."""
    if not mask.any():
        return (0,) * mask.ndim, tuple(mask.shape)
    start, stop = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        start.append(max(int(hits[0]) - margin, 0))
        stop.append(min(int(hits[-1]) + 1 + margin, mask.shape[axis]))
    return tuple(start), tuple(stop)


def normalise_nonzero(image: np.ndarray) -> np.ndarray:
    """Per-channel z-score over non-zero voxels; voxels outside the brain stay 0. ``image``: (C, x, y, z)."""
    out = np.zeros(image.shape, dtype=np.float32)
    for c, channel in enumerate(image):
        brain = channel != 0
        if brain.any():
            values = channel[brain]
            out[c][brain] = (values - values.mean()) / max(float(values.std()), 1e-8)
    return out


def preprocess_case(image_paths: Sequence[str | os.PathLike[str]], label_path: str | os.PathLike[str] | None = None,
                    scheme: LabelScheme | str = "brats2023", margin: int = BRAIN_MARGIN,
                    case_id: str | None = None) -> PreprocessedCase:
    """Read, reorient to RAS, crop to the brain and normalise one case (see the module docstring)."""
    if len(image_paths) != len(MODALITIES):
        raise DataError(f"expected {len(MODALITIES)} images ({', '.join(MODALITIES)}), got {len(image_paths)}")
    case_id = case_id or Path(image_paths[0]).parent.name
    volumes, affine = [], None
    for name, path in zip(MODALITIES, image_paths):
        data, this_affine = read_volume(path, what=f"{case_id} {name}: ")
        if volumes and data.shape != volumes[0].shape:
            raise DataError(f"{case_id}: {name} shape {data.shape} differs from {MODALITIES[0]} {volumes[0].shape} ({path})")
        affine = this_affine if affine is None else affine
        volumes.append(data)
    ornt = nib.orientations.io_orientation(affine)
    image = np.stack([_to_ras(v, ornt) for v in volumes])
    start, stop = brain_bbox((image != 0).any(axis=0), margin)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    image = normalise_nonzero(image[(slice(None), *box)])
    regions = None
    if label_path is not None:
        label, _ = read_volume(label_path, dtype=np.int16, what=f"{case_id} seg: ")
        if label.shape != volumes[0].shape:
            raise DataError(f"{case_id}: label shape {label.shape} differs from image shape {volumes[0].shape} "
                            f"({label_path})")
        regions = get_scheme(scheme).to_regions(_to_ras(label, ornt)[box], source=str(label_path)).astype(np.uint8)
    geometry = CaseGeometry(tuple(volumes[0].shape), tuple(map(tuple, affine.tolist())),
                            tuple(map(tuple, ornt.tolist())), start, stop)
    return PreprocessedCase(case_id, image, regions, geometry)


_fingerprints: dict[tuple[str, int, int], str] = {}


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """``size:sha256`` of a file's first and last MiB (memoised per path, size and mtime in this process): what
    identifies an image's content cheaply; a missing file gives ``missing``."""
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _fingerprints:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            digest.update(handle.read(_FINGERPRINT_BYTES))
            if stat.st_size > 2 * _FINGERPRINT_BYTES:
                handle.seek(-_FINGERPRINT_BYTES, os.SEEK_END)
            digest.update(handle.read())
        _fingerprints[memo_key] = f"{stat.st_size}:{digest.hexdigest()[:16]}"
    return _fingerprints[memo_key]


def case_cache_dir(configured: str | os.PathLike[str] | None, run_dir: str | os.PathLike[str] | None,
                   shared: str | os.PathLike[str] | None = None) -> Path | None:
    """Where a run's preprocessed cases are cached: the one rule (training, soups and ensembles use it).

    1. ``configured`` (``data.cache_dir``) when set;
    2. else ``$BRATS_UGRIP_CACHE/cases`` (a shared path, e.g. a project folder);
    3. else ``shared``, the cache of the group of runs this one belongs to, named by whoever groups them (a sweep
       passes ``SWEEP_DIR/cache``: this library knows run directories, not sweeps);
    4. else the run's own ``run_dir/cache`` (None without a run directory).
    """
    if configured:
        return Path(configured)
    project = os.environ.get(CACHE_ENV)
    if project:
        return Path(project) / "cases"
    if shared:
        return Path(shared)
    return own_cache(run_dir) if run_dir is not None else None


def case_stage_dir() -> Path | None:
    """A node-local copy of the cache for this process's job (``$BRATS_UGRIP_STAGE_DIR``), or None.

    On a cluster the shared cache sits on a network file system that every loader worker of every job reads; with
    ``executor.setup: ['export BRATS_UGRIP_STAGE_DIR=$SLURM_TMPDIR/brats-cache']`` each job copies the entries it
    reads once to the node's scratch disk and reads them there (the scheduler names that folder; this library
    knows no scheduler, only the variable).
    """
    stage = os.environ.get(STAGE_ENV)
    return Path(stage) if stage else None


class CaseCache:
    """Preprocessed cases on disk: ``<case_id>-<key>.image.npy`` (fp16), ``.regions.npy`` (uint8),
    ``.tumour.npy`` (int32 whole-tumour voxel indices), ``.json``.

    The key hashes the input files (content fingerprints), the scheme, the margin and the cache version, so an
    edited case or a different setting is recomputed rather than served stale. Writes are atomic, so parallel
    loader workers (and jobs) may fill the cache concurrently. With a ``stage_dir`` (node-local scratch), an entry
    is read from there: copied from the shared cache the first time (computed and published there first when
    missing), the JSON last, so a half-copied entry is never read.
    """

    def __init__(self, cache_dir: str | os.PathLike[str] | None, margin: int = BRAIN_MARGIN,
                 stage_dir: str | os.PathLike[str] | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.margin = margin
        self.stage_dir = Path(stage_dir) if stage_dir is not None and cache_dir is not None else None

    def key(self, case: Case, scheme: str) -> str:
        """Hash of the preprocessing settings and of each input file's content fingerprint (not its path, so copies
        of a dataset and every run of it share the entries)."""
        parts = [str(CACHE_VERSION), scheme, str(self.margin)]
        for path in (*case.images, case.label):
            parts.append("-" if path is None else file_fingerprint(path))
        return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]

    def _paths(self, case: Case, scheme: str, folder: Path | None = None) -> tuple[Path, Path, Path, Path]:
        folder = folder or self.cache_dir
        assert folder is not None
        stem = folder / f"{case.case_id}-{self.key(case, scheme)}"
        return (stem.with_suffix(".image.npy"), stem.with_suffix(".regions.npy"), stem.with_suffix(".tumour.npy"),
                stem.with_suffix(".json"))

    def _stage(self, case: Case, scheme: str, label: Path | None) -> tuple[Path, Path, Path, Path]:
        """The entry's paths in the stage folder, copied there from the shared cache (filled first if needed)."""
        assert self.stage_dir is not None
        staged = self._paths(case, scheme, self.stage_dir)
        if staged[3].is_file():
            return staged
        shared = self._paths(case, scheme)
        if not shared[3].is_file() or (label is not None and not json.loads(shared[3].read_text())["has_regions"]):
            CaseCache(self.cache_dir, self.margin).get(case, scheme, with_label=label is not None)
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        for source, target in zip(shared, staged):  # the JSON last: its presence means the arrays are complete
            if source.is_file():
                with atomic_path(target) as tmp:
                    shutil.copyfile(source, tmp)
        return staged

    def get(self, case: Case, scheme: LabelScheme | str = "brats2023", with_label: bool = True,
            mmap: bool = False) -> PreprocessedCase:
        """The preprocessed case, from the cache when present, else computed (and stored when caching).

        Args:
            mmap: return memory-mapped arrays from the cache (read-only), so slicing a patch reads only the patch.
        """
        scheme_name = get_scheme(scheme).name
        label = case.label if with_label else None
        if self.cache_dir is None:
            return preprocess_case(case.images, label, scheme_name, self.margin, case.case_id)
        if self.stage_dir is not None:
            image_path, regions_path, tumour_path, meta_path = self._stage(case, scheme_name, label)
        else:
            image_path, regions_path, tumour_path, meta_path = self._paths(case, scheme_name)
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            mode = "r" if mmap else None
            labelled = label is not None and meta["has_regions"]
            if label is None or labelled:
                return PreprocessedCase(case.case_id, np.load(image_path, mmap_mode=mode),
                                        np.load(regions_path, mmap_mode=mode) if labelled else None,
                                        CaseGeometry.from_json(meta["geometry"]),
                                        np.load(tumour_path) if labelled else None)
        result = preprocess_case(case.images, case.label, scheme_name, self.margin, case.case_id)
        arrays = [(image_path, result.image.astype(np.float16))]
        if result.regions is not None:
            arrays += [(regions_path, result.regions), (tumour_path, result.tumour_voxels)]
        for path, array in arrays:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, array)
        # The JSON is written last: its presence means the arrays are complete.
        atomic_write_json(meta_path, {"case_id": case.case_id, "has_regions": result.regions is not None,
                                      "geometry": result.geometry.to_json()})
        if not with_label:
            result.regions = result.tumour_voxels = None
        result.image = result.image.astype(np.float16)
        return result
