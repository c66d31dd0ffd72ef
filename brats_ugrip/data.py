"""BraTS datalists: discovering cases on disk, folds, loading and validating the MONAI-style JSON.

A datalist is the JSON used by BraTS teams with MONAI::

    {"modalities": ["t1c", "t1n", "t2f", "t2w"], "naming": "brats2023", "label_scheme": "brats2023",
     "data_root": "../data",
     "training": [{"case_id": "...", "fold": 0, "image": ["CASE/CASE-t1c.nii.gz", ...], "label": "CASE/CASE-seg.nii.gz"}],
     "test":     [{"case_id": "...", "image": [...], "label": "..."}],
     "testing":  [{"case_id": "...", "image": [...]}]}

Paths are relative to ``data_root``, itself relative to the datalist file's folder (or absolute). Fold ``-1``
marks training-only cases (extra or synthetic data) that never appear in a validation split.

``test`` (optional) is the held-out **test split**: labelled cases that no run trains or validates on. Folds,
:meth:`Datalist.split` and fold −1 read ``training`` only, so nothing that trains or selects ever sees them; soups
and ensemble fits report on them by default. ``testing`` holds unlabelled cases (to predict, not to score).
Datalists without a ``test`` section load as before.
"""
from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brats_ugrip.atomic import atomic_write_json
from brats_ugrip.errors import DataError
from brats_ugrip.labels import LabelScheme, get_scheme

MODALITIES: tuple[str, str, str, str] = ("t1c", "t1n", "t2f", "t2w")
"""Channel order of every image tensor: T1 post-contrast, T1 native, T2-FLAIR, T2-weighted."""

TRAINING_ONLY_FOLD = -1


@dataclass(frozen=True)
class Naming:
    """A file naming convention: ``CASE/CASE{sep}{suffix}.nii.gz`` per modality, in ``MODALITIES`` order."""

    name: str
    separator: str
    modality_suffixes: tuple[str, str, str, str]
    label_suffix: str
    label_scheme: str

    def image_names(self, case_id: str) -> list[str]:
        return [f"{case_id}/{case_id}{self.separator}{s}.nii.gz" for s in self.modality_suffixes]

    def label_name(self, case_id: str) -> str:
        return f"{case_id}/{case_id}{self.separator}{self.label_suffix}.nii.gz"


NAMINGS: dict[str, Naming] = {
    "brats2023": Naming("brats2023", "-", ("t1c", "t1n", "t2f", "t2w"), "seg", "brats2023"),
    "brats2021": Naming("brats2021", "_", ("t1ce", "t1", "flair", "t2"), "seg", "brats2021"),
}


@dataclass(frozen=True)
class Case:
    """One case: four image paths (absolute, ``MODALITIES`` order), an optional label path, its fold and origin."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None
    fold: int = TRAINING_ONLY_FOLD
    source: str = "original"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def detect_naming(case_dir: Path) -> Naming | None:
    """The naming convention of the files in ``case_dir``, or None if it holds no complete BraTS case."""
    for naming in NAMINGS.values():
        if all((case_dir.parent / name).is_file() for name in naming.image_names(case_dir.name)):
            return naming
    return None


def why_incomplete(case_dir: Path) -> str:
    """Why ``case_dir`` is not a case: no NIfTI files, or the modalities missing in the naming it comes closest to."""
    if not any(case_dir.glob("*.nii.gz")):
        return "no .nii.gz files"
    files = {naming: naming.image_names(case_dir.name) for naming in NAMINGS.values()}
    closest = max(files, key=lambda naming: sum((case_dir.parent / name).is_file() for name in files[naming]))
    missing = [Path(name).name for name in files[closest] if not (case_dir.parent / name).is_file()]
    return f"incomplete case: missing {', '.join(missing)} ({closest.name} naming)"


def skipped_folders(data_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Folders of ``data_dir`` that are not cases (hidden ones aside), each with :func:`why_incomplete`."""
    return {p.name: why_incomplete(p) for p in sorted(Path(data_dir).iterdir())
            if p.is_dir() and not p.name.startswith(".") and detect_naming(p) is None}


def discover_cases(data_dir: str | os.PathLike[str]) -> tuple[Naming, list[str], list[str]]:
    """Find case folders under ``data_dir`` (folders that are not cases are left out: :func:`skipped_folders`
    names them and says why).

    Returns:
        (naming, ids of cases with a segmentation, ids of cases without one), ids sorted.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found")
    found: dict[str, list[str]] = {}
    incomplete: list[str] = []
    for case_dir in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        naming = detect_naming(case_dir)
        if naming is None:
            if any(case_dir.glob("*.nii.gz")):
                incomplete.append(case_dir.name)
            continue
        found.setdefault(naming.name, []).append(case_dir.name)
    if not found:
        hint = (f" ({len(incomplete)} folders have NIfTI files but not the four modalities, e.g. {incomplete[0]})"
                if incomplete else "")
        raise DataError(
            f"{data_dir}: no BraTS cases found{hint}; expected CASE/CASE-t1c.nii.gz, -t1n, -t2f, -t2w (BraTS 2023+) "
            "or CASE/CASE_t1ce.nii.gz, _t1, _flair, _t2 (BraTS 2021)"
        )
    if len(found) > 1:
        raise DataError(f"{data_dir}: mixes naming conventions {sorted(found)}; keep one convention per data directory")
    (name, ids), = found.items()
    naming = NAMINGS[name]
    labelled = [i for i in ids if (data_dir / naming.label_name(i)).is_file()]
    unlabelled = [i for i in ids if i not in set(labelled)]
    return naming, labelled, unlabelled


def assign_folds(case_ids: list[str], n_folds: int, seed: int) -> dict[str, int]:
    """Balanced folds: a seeded shuffle dealt round-robin, so fold sizes differ by at most one."""
    if n_folds < 2:
        raise DataError(f"--folds must be at least 2, got {n_folds}")
    if len(case_ids) < n_folds:
        raise DataError(f"{len(case_ids)} labelled cases cannot fill {n_folds} folds; lower --folds")
    shuffled = sorted(case_ids)
    random.Random(seed).shuffle(shuffled)
    return {case_id: i % n_folds for i, case_id in enumerate(shuffled)}


def split_test_cases(case_ids: list[str], n_test: int, seed: int) -> tuple[list[str], list[str]]:
    """``(test, rest)``: ``n_test`` cases drawn by the seeded shuffle the folds use (so the test split is what a
    fold would be, just larger or smaller), the rest left for the folds; both sorted."""
    if n_test < 0 or n_test >= len(case_ids):
        raise DataError(f"a test split of {n_test} cases leaves no training cases out of {len(case_ids)} labelled")
    shuffled = sorted(case_ids)
    random.Random(f"test-split-{seed}").shuffle(shuffled)
    return sorted(shuffled[:n_test]), sorted(shuffled[n_test:])


def n_test_cases(n_labelled: int, fraction: float | None = None, count: int | None = None) -> int:
    """Cases in the test split: ``count``, or ``round(fraction × n_labelled)`` (at least 1 when fraction > 0)."""
    if count is not None:
        return count
    if fraction is None or fraction == 0:
        return 0
    if not 0 < fraction < 1:
        raise DataError(f"--test-fraction must be in [0, 1), got {fraction}")
    return max(1, round(fraction * n_labelled))


def make_datalist(data_dir: str | os.PathLike[str], n_folds: int = 5, seed: int = 0,
                  relative_to: str | os.PathLike[str] | None = None, test_fraction: float | None = None,
                  test_cases: int | None = None) -> dict[str, Any]:
    """Build a datalist for the cases under ``data_dir`` (see the module docstring for the format).

    Args:
        relative_to: the folder the datalist will be saved in; ``data_root`` is written relative to it.
        test_fraction, test_cases: hold out this share (or number) of the labelled cases as the ``test`` split,
            drawn before the folds are dealt; the folds are made from the rest.
    """
    data_dir = Path(data_dir).resolve()
    naming, labelled, unlabelled = discover_cases(data_dir)
    n_test = n_test_cases(len(labelled), test_fraction, test_cases)
    test, labelled = split_test_cases(labelled, n_test, seed) if n_test else ([], labelled)
    folds = assign_folds(labelled, n_folds, seed)
    root = os.path.relpath(data_dir, Path(relative_to).resolve()) if relative_to is not None else str(data_dir)
    return {
        "modalities": list(MODALITIES),
        "naming": naming.name,
        "label_scheme": naming.label_scheme,
        "data_root": root,
        "n_folds": n_folds,
        "seed": seed,
        "training": [
            {"case_id": i, "fold": folds[i], "image": naming.image_names(i), "label": naming.label_name(i)}
            for i in labelled
        ],
        **({"test": [{"case_id": i, "image": naming.image_names(i), "label": naming.label_name(i)} for i in test]}
           if test else {}),
        "testing": [{"case_id": i, "image": naming.image_names(i)} for i in unlabelled],
    }


def _case_from_entry(entry: Any, where: str, root: Path, default_fold: int | None) -> Case:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with 'image' (and 'label'), got {type(entry).__name__}")
    images = entry.get("image")
    if not isinstance(images, list) or len(images) != len(MODALITIES) or not all(isinstance(p, str) for p in images):
        raise DataError(f"{where}.image: expected a list of {len(MODALITIES)} paths in the order {list(MODALITIES)}")
    label = entry.get("label")
    if label is not None and not isinstance(label, str):
        raise DataError(f"{where}.label: expected a path string")
    fold = entry.get("fold", default_fold)
    if fold is None:
        raise DataError(f"{where}.fold: missing; every training case needs a fold (-1 for training-only)")
    if not isinstance(fold, int) or isinstance(fold, bool) or fold < TRAINING_ONLY_FOLD:
        raise DataError(f"{where}.fold: expected an integer ≥ -1, got {fold!r}")
    case_id = entry.get("case_id") or Path(images[0]).parent.name or Path(images[0]).name.split(".")[0]
    known = {"case_id", "image", "label", "fold", "source"}
    return Case(
        case_id=str(case_id),
        images=tuple(root / p for p in images),
        label=root / label if label else None,
        fold=fold,
        source=str(entry.get("source", "original")),
        extra={k: v for k, v in entry.items() if k not in known},
    )


@dataclass
class Datalist:
    """A loaded datalist: training cases with folds, testing cases, and the label scheme of the data."""

    path: Path | None
    data_root: Path
    training: list[Case]
    testing: list[Case]
    label_scheme: str = "brats2023"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    test: list[Case] = field(default_factory=list)
    """The held-out test split: labelled cases no run trains or validates on (empty when the file has none)."""

    @classmethod
    def load(cls, path: str | os.PathLike[str], data_root: str | os.PathLike[str] | None = None) -> Datalist:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: datalist not found; build one with "
                            f"`python tools/make_datalist.py DATA_DIR --out {path}`")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from error
        return cls.from_dict(raw, path=path, data_root=data_root)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: Path | None = None,
                  data_root: str | os.PathLike[str] | None = None) -> Datalist:
        where = str(path) if path else "datalist"
        if not isinstance(raw, dict) or "training" not in raw:
            raise DataError(f"{where}: expected a JSON object with a 'training' list")
        modalities = raw.get("modalities", list(MODALITIES))
        if list(modalities) != list(MODALITIES):
            raise DataError(f"{where}.modalities: expected {list(MODALITIES)}, got {modalities}")
        base = path.parent if path else Path.cwd()
        root = Path(data_root) if data_root is not None else base / raw.get("data_root", ".")
        root = root.resolve()
        training = [_case_from_entry(e, f"{where}: training[{i}]", root, None) for i, e in enumerate(raw["training"])]
        testing = [_case_from_entry(e, f"{where}: testing[{i}]", root, TRAINING_ONLY_FOLD)
                   for i, e in enumerate(raw.get("testing", []))]
        test = [_case_from_entry(e, f"{where}: test[{i}]", root, TRAINING_ONLY_FOLD)
                for i, e in enumerate(raw.get("test", []))]
        unlabelled = next((c for c in test if c.label is None), None)
        if unlabelled is not None:
            raise DataError(f"{where}: test case {unlabelled.case_id} has no label; the test split holds labelled "
                            "cases (unlabelled ones go to 'testing')")
        ids = [c.case_id for c in training + test + testing]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise DataError(f"{where}: duplicate case ids {duplicates[:5]}")
        scheme = raw.get("label_scheme", "brats2023")
        get_scheme(scheme)
        return cls(path=path, data_root=root, training=training, testing=testing, label_scheme=scheme, raw=raw,
                   test=test)

    @property
    def declared_folds(self) -> int | None:
        """``n_folds`` as recorded by ``tools/make_datalist.py``, or None when the datalist does not say."""
        value = self.raw.get("n_folds")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def fold_problems(self) -> list[str]:
        """Fold numbers that contradict the datalist. With ``n_folds`` declared: every training case's fold is
        −1 or in 0 … n_folds−1, and no fold is empty. Without: the folds are 0 … k−1, with no gap (a gap is
        usually a mistyped fold number)."""
        where = self.path or "datalist"
        declared = self.raw.get("n_folds")
        if declared is not None and (self.declared_folds is None or declared < 2):
            return [f"{where}: n_folds must be an integer ≥ 2, got {declared!r}"]
        n_folds = self.declared_folds or (max(self.folds) + 1 if self.folds else 0)
        problems = [f"{c.case_id}: fold {c.fold} is outside the datalist's {n_folds} folds (0 … {n_folds - 1}, or "
                    f"{TRAINING_ONLY_FOLD} for training only)" for c in self.training if c.fold >= n_folds]
        empty = [f for f in range(n_folds) if f not in self.folds]
        if empty:
            declared_text = f"declares n_folds {n_folds}" if self.declared_folds else f"has folds up to {n_folds - 1}"
            problems.append(f"{where}: {declared_text} but folds {empty} have no case")
        return problems

    @property
    def folds(self) -> list[int]:
        """Validation folds present (training-only fold −1 excluded), sorted."""
        return sorted({c.fold for c in self.training if c.fold != TRAINING_ONLY_FOLD})

    def split(self, fold: int) -> tuple[list[Case], list[Case]]:
        """``(train, val)`` for ``fold``: val is that fold; train is every other fold plus fold −1."""
        if fold not in self.folds:
            raise DataError(f"{self.path or 'datalist'}: fold {fold} does not exist; folds are {self.folds}")
        return [c for c in self.training if c.fold != fold], [c for c in self.training if c.fold == fold]

    def fold_cases(self, fold: int) -> list[Case]:
        """The cases of one validation fold."""
        return self.split(fold)[1]


def save_datalist(datalist: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a datalist dict (as built by :func:`make_datalist`) atomically."""
    return atomic_write_json(path, datalist)


def cases_from_dir(directory: str | os.PathLike[str]) -> list[Case]:
    """Cases in a BraTS-layout folder (a single case folder, or a folder of case folders), labels when present."""
    directory = Path(directory)
    naming = detect_naming(directory)
    if naming is not None:
        parent, ids = directory.parent, [directory.name]
    else:
        naming, labelled, unlabelled = discover_cases(directory)
        parent, ids = directory, sorted(labelled + unlabelled)
    cases = []
    for case_id in ids:
        label = parent / naming.label_name(case_id)
        cases.append(Case(case_id, tuple(parent / n for n in naming.image_names(case_id)),
                          label if label.is_file() else None))
    return cases


# --- validation -------------------------------------------------------------------------------------------


@dataclass
class CaseReport:
    """Problems found in one case (empty when the case is fine)."""

    case_id: str
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_case(case: Case, scheme: LabelScheme | str) -> CaseReport:
    """Check one case: files exist and decode, modalities share shape and affine, voxels are finite (no NaN or
    inf), images are not empty, labels are in the scheme. Collects every problem rather than stopping at the first."""
    import nibabel as nib

    from brats_ugrip.io import count_nonfinite, nonfinite_message

    scheme = get_scheme(scheme)
    problems: list[str] = []
    geometry: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}
    named = list(zip(MODALITIES, case.images)) + ([("seg", case.label)] if case.label is not None else [])
    for name, path in named:
        if not path.is_file():
            problems.append(f"{name}: missing file {path}")
            continue
        try:
            image = nib.load(str(path))
            data = np.asanyarray(image.dataobj)
        except Exception as error:
            problems.append(f"{name}: unreadable {path} ({error.__class__.__name__}: {error})")
            continue
        data = data.reshape(data.shape[:3]) if data.ndim == 4 and data.shape[3] == 1 else data
        if data.ndim != 3:
            problems.append(f"{name}: expected a 3-D volume, got shape {data.shape} in {path}")
            continue
        geometry[name] = (data.shape, image.affine)
        nonfinite = count_nonfinite(data)
        if nonfinite:
            problems.append(f"{name}: {nonfinite_message(path, data, nonfinite)}")
        elif name == "seg":
            values = sorted(set(np.unique(data).tolist()) - set(scheme.labels))
            if values:
                problems.append(f"seg: label values {values} not in scheme {scheme.name} {list(scheme.labels)} in {path}")
        elif not np.any(data):
            problems.append(f"{name}: image is empty (all zeros) in {path}")
    if geometry:
        ref_name, (ref_shape, ref_affine) = next(iter(geometry.items()))
        for name, (shape, affine) in geometry.items():
            if shape != ref_shape:
                problems.append(f"{name}: shape {shape} differs from {ref_name} {ref_shape}")
            elif not np.allclose(affine, ref_affine, atol=1e-3):
                problems.append(f"{name}: affine differs from {ref_name}")
    return CaseReport(case.case_id, problems)


def iter_cases(datalist: Datalist, sections: Iterable[str] = ("training", "test", "testing")) -> list[Case]:
    return [c for s in sections for c in getattr(datalist, s)]


_CASE_ID_NUMBER = re.compile(r"(\d{5}-\d{3})$")


def brats_case_number(case_id: str) -> str | None:
    """The ``00000-000`` part of a BraTS 2023+ case id (what MedPerf output names use), or None."""
    match = _CASE_ID_NUMBER.search(case_id)
    return match.group(1) if match else None
