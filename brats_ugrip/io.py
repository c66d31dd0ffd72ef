"""Reading and writing NIfTI volumes, keeping the geometry (affine, shape) of the input."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from brats_ugrip.atomic import atomic_path
from brats_ugrip.errors import DataError


def load_nifti(path: str | os.PathLike[str]) -> nib.Nifti1Image:
    """Open a NIfTI file (header only; data is read lazily). Raises :class:`DataError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: not a readable NIfTI file ({error})") from error
    return image


def count_nonfinite(data: np.ndarray) -> int:
    """Voxels that are NaN or ±inf (0 for integer data, which cannot hold them)."""
    if not np.issubdtype(data.dtype, np.inexact):
        return 0
    finite = np.isfinite(data)
    return 0 if finite.all() else int(finite.size - np.count_nonzero(finite))


def nonfinite_message(path: str | os.PathLike[str], data: np.ndarray, count: int) -> str:
    return (f"{path}: {count} of {data.size} voxels are NaN or infinite; fix or re-export the image (a network "
            "given them predicts nothing, and zero-filling them silently would hide a broken file)")


def read_volume(path: str | os.PathLike[str], dtype: np.dtype | type = np.float32,
                what: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D volume as ``(array (X, Y, Z), affine (4, 4))``; a trailing singleton 4th axis is squeezed.

    Args:
        what: prefix of error messages naming what the file is, e.g. ``"BraTS-00001-000 t1c: "``.

    Raises:
        DataError: unreadable, not 3-D, or holding NaN or infinite voxels (counted; checked once, on the data as
            stored, before any conversion could turn them into arbitrary integers).
    """
    image = load_nifti(path)
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:
        raise DataError(f"{what}{path}: cannot decode image data ({error})") from error
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{what}{path}: expected a 3-D volume, got shape {data.shape}")
    bad = count_nonfinite(data)
    if bad:
        raise DataError(what + nonfinite_message(path, data, bad))
    return data.astype(dtype, copy=False), image.affine


def write_volume(path: str | os.PathLike[str], data: np.ndarray, affine: np.ndarray,
                 header: nib.Nifti1Header | None = None) -> Path:
    """Write ``data`` with ``affine`` atomically (``.nii.gz`` compresses). The dtype of ``data`` is kept."""
    path = Path(path)
    image = nib.Nifti1Image(np.asarray(data), affine, header=header)
    image.set_data_dtype(np.asarray(data).dtype)
    if header is None:
        image.header.set_xyzt_units("mm", "sec")
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    with atomic_path(path) as tmp:
        named = tmp.with_name(tmp.name + suffix)  # nibabel picks the format from the name
        try:
            nib.save(image, str(named))
            os.replace(named, tmp)
        finally:
            named.unlink(missing_ok=True)  # a failed save (a full disk) leaves nothing behind
    return path


def write_label_map(path: str | os.PathLike[str], labels: np.ndarray, reference: str | os.PathLike[str]) -> Path:
    """Write an integer label map in the geometry (affine, shape) of the ``reference`` image file."""
    ref = load_nifti(reference)
    if tuple(labels.shape) != tuple(ref.shape[:3]):
        raise DataError(f"{path}: label map shape {labels.shape} differs from {reference} shape {ref.shape[:3]}")
    return write_volume(path, labels.astype(np.uint8), ref.affine)
