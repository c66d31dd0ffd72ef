"""PNG overlay of one case for a quick look: an MR image, the predicted labels on it, and the uncertainty map.

    python ensembling/overlay.py --case CASE_DIR --pred PRED.nii.gz [--uncertainty U.nii.gz] --out case.png
        [--modality t2f] [--slice K] [--scheme brats2023]

The slice is taken along the file's third axis (axial for BraTS files); by default the one with the most predicted
tumour. Colours: non-enhancing core red, oedema green, enhancing tumour yellow. Drawn with matplotlib's Agg canvas
(no display needed).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from brats_ugrip.atomic import atomic_path
from brats_ugrip.cli import console, run
from brats_ugrip.data import MODALITIES, cases_from_dir
from brats_ugrip.ensembling.predict import EnsemblePrediction
from brats_ugrip.errors import DataError
from brats_ugrip.io import read_volume
from brats_ugrip.labels import SCHEMES, LabelScheme, get_scheme

COLOURS: dict[str, tuple[float, float, float]] = {"core": (0.9, 0.1, 0.1), "edema": (0.1, 0.8, 0.2),
                                                   "enhancing": (1.0, 0.85, 0.0)}
LABEL_ALPHA = 0.55


def tumour_slice(labels: np.ndarray) -> int:
    """Index along the third axis with the most labelled voxels (the middle slice when there are none)."""
    counts = (labels > 0).sum(axis=(0, 1))
    return int(counts.argmax()) if counts.any() else labels.shape[2] // 2


def label_rgba(labels: np.ndarray, scheme: LabelScheme) -> np.ndarray:
    """A 2-D label slice → RGBA ``(*shape, 4)`` in :data:`COLOURS`, transparent background."""
    rgba = np.zeros((*labels.shape, 4), dtype=np.float32)
    for name, colour in COLOURS.items():
        mask = labels == getattr(scheme, name)
        rgba[mask] = (*colour, LABEL_ALPHA)
    return rgba


def overlay_figure(image: np.ndarray, labels: np.ndarray, scheme: LabelScheme | str,
                   uncertainty: np.ndarray | None = None, index: int | None = None, title: str = "") -> Figure:
    """Panels image | image + labels | image + uncertainty (when given) of slice ``index`` of ``(X, Y, Z)`` volumes."""
    scheme = get_scheme(scheme)
    if image.shape != labels.shape or (uncertainty is not None and uncertainty.shape != labels.shape):
        raise DataError(f"{title or 'overlay'}: image {image.shape}, labels {labels.shape} and uncertainty "
                        f"{None if uncertainty is None else uncertainty.shape} must have the same shape")
    index = tumour_slice(labels) if index is None else index
    if not 0 <= index < labels.shape[2]:
        raise DataError(f"slice {index} is outside the volume's {labels.shape[2]} slices")
    # Transposed with the origin at the bottom: the first axis runs left → right, the second bottom → top.
    show = dict(origin="lower", interpolation="nearest")
    picture = image[:, :, index].T
    low, high = np.percentile(picture[picture != 0], (1, 99)) if (picture != 0).any() else (0.0, 1.0)
    panels = 3 if uncertainty is not None else 2
    figure = Figure(figsize=(4 * panels, 4.4), layout="constrained")
    axes = figure.subplots(1, panels)
    for axis in axes:
        axis.imshow(picture, cmap="gray", vmin=low, vmax=high, **show)
        axis.set_axis_off()
    axes[0].set_title("image")
    axes[1].imshow(label_rgba(labels[:, :, index].T, scheme), **show)
    axes[1].set_title("prediction (NETC red, SNFH green, ET yellow)", fontsize=8)
    if uncertainty is not None:
        values = np.ma.masked_less_equal(uncertainty[:, :, index].T, 0.01)
        mapped = axes[2].imshow(values, cmap="magma", vmin=0, vmax=1, alpha=0.8, **show)
        axes[2].set_title("uncertainty")
        figure.colorbar(mapped, ax=axes[2], fraction=0.046)
    figure.suptitle(f"{title} slice {index}".strip())
    return figure


def write_overlay(path: str | os.PathLike[str], image: np.ndarray, labels: np.ndarray, scheme: LabelScheme | str,
                  uncertainty: np.ndarray | None = None, index: int | None = None, title: str = "") -> Path:
    """Write the overlay PNG atomically."""
    figure = overlay_figure(image, labels, scheme, uncertainty, index, title)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return Path(path)


def write_case_overlay(path: str | os.PathLike[str], image_paths: Sequence[str | os.PathLike[str]],
                       prediction: EnsemblePrediction, scheme: LabelScheme | str, modality: str = "t2f") -> Path:
    """The overlay of an ensemble's prediction of a case on one of its images (``modality``)."""
    image, _ = read_volume(image_paths[MODALITIES.index(modality)])
    return write_overlay(path, image, prediction.labels, scheme, prediction.uncertainty, title=prediction.case_id)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python ensembling/overlay.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", required=True, type=Path, help="case folder (CASE/CASE-t1c.nii.gz, ...)")
    parser.add_argument("--pred", required=True, type=Path, help="predicted label map")
    parser.add_argument("--uncertainty", type=Path, help="uncertainty map (brats-ugrip ensemble --uncertainty)")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument("--modality", choices=MODALITIES, default="t2f", help="image shown under the overlay")
    parser.add_argument("--slice", type=int, help="slice along the third axis (default: the most tumour)")
    parser.add_argument("--scheme", choices=sorted(SCHEMES), default="brats2023", help="label scheme of --pred")
    args = parser.parse_args(argv)

    cases = cases_from_dir(args.case)
    if len(cases) != 1:
        raise DataError(f"{args.case}: --case must be one case folder, found {len(cases)} cases")
    case = cases[0]
    image, _ = read_volume(case.images[MODALITIES.index(args.modality)])
    labels, _ = read_volume(args.pred, dtype=np.int16)
    get_scheme(args.scheme).check(labels, str(args.pred))
    uncertainty = read_volume(args.uncertainty)[0] if args.uncertainty else None
    write_overlay(args.out, image, labels, args.scheme, uncertainty, args.slice, title=case.case_id)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run(main)
