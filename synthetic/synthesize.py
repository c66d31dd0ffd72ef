"""Label-conditioned synthetic BraTS cases by domain randomisation (SynthSeg, Billot et al. 2023).

    python synthetic/synthesize.py --datalist F --out DIR --per-case K [--seed S] [--workers N]

Each labelled case of the datalist (source ``original``) is a *condition*: its tumour labels and its brain's
tissue classes (1-D k-means of the lightly smoothed t1n inside the brain, tumour excluded) form a class map.
Every synthetic case deforms that class map (random affine + smooth elastic field, nearest-neighbour, so the
label map stays exactly a label map), then paints each class with a Gaussian intensity per modality whose mean
is random but follows BraTS contrast rules (:data:`CONTRAST_RULES`: enhancing tumour bright on t1c, oedema
bright on t2f/t2w and dark-ish on t1n, necrosis dark on t1c), and finally blurs, applies a bias field and
adds noise. Images and label come from the same deformed class map, so they always agree.

Output: ``DIR/<id>/<id>-{t1c,t1n,t2f,t2w,seg}.nii.gz`` (BraTS 2023 naming and labels) in the source case's
geometry, and ``DIR/<id>/synthesis.json`` recording the generator, source case and seed; the same seed gives
the same case. ``tools/integrate_cases.py`` adds such a folder to a datalist's training-only fold.
"""
from __future__ import annotations

import argparse
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from brats_ugrip.atomic import atomic_write_json
from brats_ugrip.cli import console, map_with_progress, run
from brats_ugrip.data import MODALITIES, NAMINGS, Case, Datalist
from brats_ugrip.errors import DataError
from brats_ugrip.io import read_volume, write_volume
from brats_ugrip.labels import LabelScheme, get_scheme
from brats_ugrip.preprocess import brain_bbox
from brats_ugrip.synthetic.anatomy import tissue_centres

GENERATOR = "synthseg-style/1"
"""Name and version of this generator, recorded with every case it makes (bump when outputs change)."""

OUTPUT_NAMING = NAMINGS["brats2023"]
OUTPUT_SCHEME = get_scheme("brats2023")
TISSUE_CLASSES: tuple[str, str, str] = ("csf", "gm", "wm")
"""Normal tissue classes of a source brain, dark → bright on its t1n (CSF-, grey- and white-matter-like)."""
TUMOUR_CLASSES: tuple[str, str, str] = ("NETC", "SNFH", "ET")
CLASS_NAMES: tuple[str, ...] = ("background", *TISSUE_CLASSES, *TUMOUR_CLASSES)
"""Names of the class map's values."""
INTENSITY_SCALE = 1000.0
"""Synthetic intensities live in about [0, 2]; they are written as int16 after multiplying by this."""

CONTRAST_RULES: tuple[tuple[str, str, str, str], ...] = (
    # (modality, class, "above"|"below", reference); applied in order, so "others" sees the classes set before.
    ("t1c", "NETC", "below", "tissue_min"),  # necrosis is dark on post-contrast T1
    ("t1c", "ET", "above", "others_max"),  # enhancing tumour is the brightest class on post-contrast T1
    ("t2f", "SNFH", "above", "tissue_max"),  # oedema is bright on FLAIR
    ("t2w", "SNFH", "above", "tissue_mean"),  # ... and on T2 (CSF may still be brighter)
    ("t1n", "SNFH", "below", "tissue_mean"),  # ... and dark-ish on native T1
)
"""BraTS contrast semantics imposed on the random class means (``tissue_*``: over the normal tissue classes;
``others_max``: over every other brain class)."""


@dataclass(frozen=True)
class SynthesisParams:
    """Ranges of the random draws. Intensities are in units where normal tissue means lie in ``tissue_mean_range``.

    Attributes:
        tissue_mean_range: uniform range of every unconstrained class mean.
        relative_std_range: per-class standard deviation as a fraction of its mean.
        contrast_factor_range: a rule puts its class at ``reference × (1 + f)`` (above) or ``reference / (1 + f)``
            (below), ``f`` drawn from this range.
        max_rotation_deg, max_scaling: random affine (per axis).
        displacement_std_mm: standard deviation of the elastic displacement (mm) at the control points.
        deformation_grid: control points per axis of the elastic field (fewer → smoother).
        bias_log_std, bias_grid: multiplicative bias field ``exp(N(0, bias_log_std))`` on a coarse grid.
        max_blur_mm: Gaussian blur per modality, sigma uniform in ``[0, max]`` mm (lower effective resolution).
        max_noise: additive Gaussian noise, std uniform in ``[0, max]`` (same units as the means).
    """

    tissue_mean_range: tuple[float, float] = (0.15, 0.75)
    relative_std_range: tuple[float, float] = (0.02, 0.1)
    contrast_factor_range: tuple[float, float] = (0.25, 0.8)
    max_rotation_deg: float = 10.0
    max_scaling: float = 0.1
    displacement_std_mm: float = 1.5
    deformation_grid: int = 5
    bias_log_std: float = 0.15
    bias_grid: int = 4
    max_blur_mm: float = 1.5
    max_noise: float = 0.03



@dataclass
class SynthesizedCase:
    """One generated case.

    Attributes:
        images: int16 (4, X, Y, Z) in ``MODALITIES`` order; 0 outside the (deformed) brain, ≥ 1 inside.
        label: uint8 (X, Y, Z), BraTS 2023 labels, the deformed label map the images were painted from.
        classes: uint8 (X, Y, Z), the deformed class map (indices into :data:`CLASS_NAMES`).
        means: float (4, n_classes), the class means drawn for each modality (before blur, bias and noise).
    """

    images: np.ndarray
    label: np.ndarray
    classes: np.ndarray
    means: np.ndarray


def tissue_classes(t1n: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Split normal tissue into :data:`TISSUE_CLASSES` by the k-means of ``brats_ugrip.synthetic.anatomy.tissue_centres``.

    Args:
        t1n: float (X, Y, Z), native T1 (any intensity scale).
        tissue: bool (X, Y, Z), normal brain voxels (brain minus tumour).

    Returns:
        uint8 (X, Y, Z): 0 outside ``tissue``, else 1, 2, 3 from the darkest to the brightest class on t1n.
    """
    values = t1n[tissue]
    # tissue_centres clusters intensities rounded to integers: bring any scale (e.g. z-scores) to ±1000 first.
    scale = 1000 / max(float(np.abs(values).max()), 1e-6)
    centres = np.sort(tissue_centres(values * scale)) / scale
    classes = np.zeros(t1n.shape, dtype=np.uint8)
    classes[tissue] = np.searchsorted((centres[:-1] + centres[1:]) / 2, values) + 1
    return classes


def class_map(t1n: np.ndarray, label: np.ndarray, scheme: LabelScheme) -> np.ndarray:
    """The class map a case is synthesised from: tissues of the brain (``t1n ≠ 0``) and its tumour labels.

    Returns:
        uint8 (X, Y, Z) with the classes of :data:`CLASS_NAMES`.
    """
    scheme.check(label)
    tumour = label != 0
    brain = (t1n != 0) | tumour
    if not (brain & ~tumour).any():
        raise DataError("the brain (t1n ≠ 0) has no voxel outside the tumour to derive tissue classes from")
    classes = tissue_classes(ndimage.gaussian_filter(t1n, 1.0), brain & ~tumour)
    for offset, tumour_label in enumerate((scheme.core, scheme.edema, scheme.enhancing)):
        classes[label == tumour_label] = len(TISSUE_CLASSES) + 1 + offset
    return classes


def sample_intensities(rng: np.random.Generator, params: SynthesisParams) -> tuple[np.ndarray, np.ndarray]:
    """Random class means and standard deviations per modality, following :data:`CONTRAST_RULES`.

    Returns:
        (means, stds), each float (4, n_classes); background (class 0) is 0.
    """
    tissues = [CLASS_NAMES.index(t) for t in TISSUE_CLASSES]
    means = rng.uniform(*params.tissue_mean_range, size=(len(MODALITIES), len(CLASS_NAMES)))
    for modality, name, relation, reference in CONTRAST_RULES:
        row, target = means[MODALITIES.index(modality)], CLASS_NAMES.index(name)
        if reference == "others_max":
            base = np.delete(row, [0, target]).max()
        else:
            base = {"tissue_min": np.min, "tissue_mean": np.mean, "tissue_max": np.max}[reference](row[tissues])
        factor = 1 + rng.uniform(*params.contrast_factor_range)
        row[target] = base * factor if relation == "above" else base / factor
    means[:, 0] = 0
    stds = means * rng.uniform(*params.relative_std_range, size=means.shape)
    return means, stds


def smooth_field(shape: Sequence[int], grid: int, rng: np.random.Generator) -> np.ndarray:
    """Standard-normal values on a ``grid``³ lattice, cubic-interpolated to ``shape``: a smooth random field.

    Interpolation is separable, so the cost is one small matrix product per axis, not a spline per voxel.
    """
    coarse = rng.standard_normal((grid,) * 3).astype(np.float32)
    weights = [ndimage.zoom(np.eye(grid, dtype=np.float32), (size / grid, 1), order=3, mode="nearest")[:size]
               for size in shape]
    return np.einsum("xa,yb,zc,abc->xyz", *weights, coarse, optimize=True)


def random_deformation(shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator,
                       params: SynthesisParams) -> np.ndarray:
    """Sampling coordinates of a random affine (rotation, scaling about the centre) plus elastic deformation.

    Args:
        spacing: voxel size (mm) along each axis.

    Returns:
        float32 (3, X, Y, Z): for each output voxel, the input voxel it takes its value from.
    """
    angles = np.deg2rad(rng.uniform(-params.max_rotation_deg, params.max_rotation_deg, 3))
    matrix = np.diag(rng.uniform(1 - params.max_scaling, 1 + params.max_scaling, 3))
    for axis, angle in enumerate(angles):
        plane = [a for a in range(3) if a != axis]
        rotation = np.eye(3)
        rotation[np.ix_(plane, plane)] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
        matrix = rotation @ matrix
    to_mm = np.diag(np.asarray(spacing, dtype=np.float64))
    matrix = (np.linalg.inv(to_mm) @ matrix @ to_mm).astype(np.float32)  # rotate in mm: no shear of anisotropic voxels
    centre = (np.asarray(shape, dtype=np.float32) - 1) / 2
    offsets = np.ix_(*(np.arange(n, dtype=np.float32) - c for n, c in zip(shape, centre)))  # broadcastable axes
    coords = np.empty((3, *shape), dtype=np.float32)
    for axis in range(3):
        coords[axis] = centre[axis] + sum(matrix[axis, j] * offsets[j] for j in range(3))
        coords[axis] += params.displacement_std_mm / spacing[axis] * smooth_field(shape, params.deformation_grid, rng)
    return coords


def render(classes: np.ndarray, spacing: Sequence[float], means: np.ndarray, stds: np.ndarray,
           rng: np.random.Generator, params: SynthesisParams) -> np.ndarray:
    """Paint a class map: Gaussian intensities per class, blur, bias field, noise; 0 outside the brain.

    Args:
        classes: uint8 (X, Y, Z); means, stds: float (4, n_classes).

    Returns:
        int16 (4, X, Y, Z), ≥ 1 inside the brain (so ``image ≠ 0`` still marks the brain).
    """
    brain = classes != 0
    # Paint only the brain's bounding box (plus room for the blur): a third of a BraTS grid or less.
    margin = int(np.ceil(3 * params.max_blur_mm / min(spacing))) + 1
    start, stop = brain_bbox(brain, margin)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    classes, inside = classes[box], brain[box]
    images = np.zeros((len(MODALITIES), *brain.shape), dtype=np.int16)
    means, stds = means.astype(np.float32), stds.astype(np.float32)
    for channel in range(len(MODALITIES)):
        image = means[channel][classes] + stds[channel][classes] * rng.standard_normal(classes.shape, np.float32)
        image = ndimage.gaussian_filter(image, rng.uniform(0, params.max_blur_mm) / np.asarray(spacing))
        image *= np.exp(params.bias_log_std * smooth_field(classes.shape, params.bias_grid, rng))
        image += rng.uniform(0, params.max_noise) * rng.standard_normal(classes.shape, np.float32)
        scaled = np.clip(np.rint(image * INTENSITY_SCALE), 1, np.iinfo(np.int16).max)
        images[(channel, *box)] = np.where(inside, scaled, 0)
    return images


def synthesize_case(t1n: np.ndarray, label: np.ndarray, scheme: LabelScheme | str, seed: int,
                    params: SynthesisParams = SynthesisParams(),
                    spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> SynthesizedCase:
    """One synthetic case conditioned on a real case's t1n (for its tissue classes) and label map.

    Args:
        t1n: float (X, Y, Z); label: integer (X, Y, Z) in ``scheme``.
        spacing: voxel size (mm) along each axis; deformation and blur are set in mm.
        seed: the whole case is a function of the inputs, ``params`` and this seed.
    """
    rng = np.random.default_rng(seed)
    classes = class_map(t1n, label, get_scheme(scheme))
    coords = random_deformation(classes.shape, spacing, rng, params)
    classes = ndimage.map_coordinates(classes, coords, order=0, mode="constant", cval=0)
    means, stds = sample_intensities(rng, params)
    images = render(classes, spacing, means, stds, rng, params)
    to_label = np.zeros(len(CLASS_NAMES), dtype=np.uint8)
    to_label[len(TISSUE_CLASSES) + 1:] = (OUTPUT_SCHEME.core, OUTPUT_SCHEME.edema, OUTPUT_SCHEME.enhancing)
    return SynthesizedCase(images, to_label[classes], classes, means)


def case_seed(base_seed: int, source_case_id: str, index: int) -> int:
    """The seed of synthetic case ``index`` of a source case: independent of which other cases are synthesised."""
    return int(np.random.SeedSequence([base_seed, zlib.crc32(source_case_id.encode()), index]).generate_state(1)[0])


def synthetic_case_id(source_case_id: str, base_seed: int, index: int) -> str:
    return f"{source_case_id}-syn{base_seed}-{index:03d}"


def synthesize_from_case(case: Case, scheme: LabelScheme | str, out_dir: Path, index: int, base_seed: int,
                         params: SynthesisParams = SynthesisParams(), provenance: dict[str, Any] | None = None) -> Path:
    """Synthesise case ``index`` from a labelled ``case`` and write it under ``out_dir`` (layout: module docstring).

    Returns:
        the new case's folder.
    """
    if case.label is None:
        raise DataError(f"{case.case_id}: has no label map to condition a synthetic case on")
    t1n, affine = read_volume(case.images[MODALITIES.index("t1n")])
    label, _ = read_volume(case.label, np.int16)
    if label.shape != t1n.shape:
        raise DataError(f"{case.case_id}: label shape {label.shape} differs from t1n shape {t1n.shape} ({case.label})")
    seed = case_seed(base_seed, case.case_id, index)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    synthetic = synthesize_case(t1n, label, scheme, seed, params, spacing)
    case_id = synthetic_case_id(case.case_id, base_seed, index)
    case_dir = out_dir / case_id
    for name, image in zip(OUTPUT_NAMING.image_names(case_id), synthetic.images):
        write_volume(out_dir / name, image, affine)
    write_volume(out_dir / OUTPUT_NAMING.label_name(case_id), synthetic.label, affine)
    atomic_write_json(case_dir / "synthesis.json", {
        "generator": GENERATOR,
        "source_case": case.case_id,
        "seed": seed,
        "base_seed": base_seed,
        "index": index,
        "label_scheme": OUTPUT_SCHEME.name,
        **(provenance or {}),
        "class_means": {m: dict(zip(CLASS_NAMES, map(float, row))) for m, row in zip(MODALITIES, synthetic.means)},
        "params": asdict(params),
    })
    return case_dir


def _synthesize_job(job: tuple[Case, str, Path, int, int, SynthesisParams, dict[str, Any]]) -> Path:
    return synthesize_from_case(*job)


def synthesize_datalist(datalist: Datalist, out_dir: str | Path, per_case: int, seed: int = 0, workers: int = 1,
                        params: SynthesisParams = SynthesisParams()) -> list[Path]:
    """``per_case`` synthetic cases from every labelled ``original`` training case of ``datalist``.

    Returns:
        the new case folders, in (source case, index) order.
    """
    if per_case < 1:
        raise DataError(f"--per-case must be at least 1, got {per_case}")
    sources = [c for c in datalist.training if c.label is not None and c.source == "original"]
    if not sources:
        raise DataError(f"{datalist.path}: no labelled training cases with source 'original' to synthesise from")
    provenance = {"source_datalist": str(datalist.path) if datalist.path else None}
    jobs = [(case, datalist.label_scheme, Path(out_dir), index, seed, params, {**provenance, "source_fold": case.fold})
            for case in sources for index in range(per_case)]
    return map_with_progress(_synthesize_job, jobs, "synthesising", workers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", type=Path, required=True,
                        help="datalist whose labelled cases condition the synthesis")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the synthetic case folders into")
    parser.add_argument("--per-case", type=int, default=1, help="synthetic cases per source case (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0); the same seed gives the same cases")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--data-root", type=Path, default=None, help="override the datalist's data_root")
    args = parser.parse_args(argv)
    datalist = Datalist.load(args.datalist, args.data_root)
    paths = synthesize_datalist(datalist, args.out, args.per_case, args.seed, args.workers)
    console.print(f"{args.out}: {len(paths)} synthetic cases ({GENERATOR}, seed {args.seed}); "
                  "add them to training with "
                  f"`python tools/integrate_cases.py --datalist {args.datalist} --cases {args.out} --tag synthetic`")
    return 0


if __name__ == "__main__":
    run(main)
