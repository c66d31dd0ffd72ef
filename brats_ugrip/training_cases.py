"""Extra training data (synthetic, sampled from another dataset, ...) kept apart from the original cases.

Extra cases are always appended to fold −1 (training only) with a ``"source"`` other than ``"original"``, so
every validation fold stays exactly the original cases. A run then picks its training cases by source::

    train_cases = select_training_cases(datalist, fold, train_sources=["original", "synthetic"], ratio=0.5, seed=0)
    make_loaders(datalist, fold, ..., train_cases=train_cases)

Entry keys written by ``tools/integrate_cases.py`` and ``tools/sample_cases.py`` besides the usual ones:
``source`` (``"synthetic"``, ``"sampled:<name>"``...), ``origin`` (the case's id where it came from),
``generator`` and ``seed`` (how it was made, when generated) and ``source_case`` (the original case a synthetic
case was conditioned on, which keeps it out of training when that case is validating).
"""
from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import nibabel as nib

from brats_ugrip.data import TRAINING_ONLY_FOLD, Case, Datalist
from brats_ugrip.errors import ConfigError, DataError

if TYPE_CHECKING:
    from brats_ugrip.config import RunConfig

ORIGINAL = "original"


def entry_key(entry: dict[str, Any]) -> tuple[str, str, str | None, Any]:
    """What makes two datalist entries the same extra case: ``(source, origin, generator, seed)``.

    ``origin`` falls back to the case id, so entries without provenance are keyed by their id.
    """
    return (str(entry.get("source", ORIGINAL)), str(entry.get("origin", entry.get("case_id"))),
            entry.get("generator"), entry.get("seed"))


def append_training_only(datalist_raw: dict[str, Any],
                         entries: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Append ``entries`` to fold −1 of a datalist, skipping those already present (same :func:`entry_key`).

    The input is not modified and existing entries (every fold ≥ 0 among them) are kept as they are.

    Returns:
        (the new datalist dict, the entries actually added).

    Raises:
        DataError: an entry has ``source`` ``"original"`` or reuses the id of a different case.
    """
    result = copy.deepcopy(datalist_raw)
    training = result.setdefault("training", [])
    present = {entry_key(e) for e in training}
    ids = {e.get("case_id") for e in training} | {e.get("case_id") for e in result.get("testing", [])}
    added = []
    for entry in entries:
        entry = {**entry, "fold": TRAINING_ONLY_FOLD}
        if entry.get("source", ORIGINAL) == ORIGINAL:
            raise DataError(f"{entry.get('case_id')}: extra cases need a source tag other than {ORIGINAL!r}")
        if entry_key(entry) in present:
            continue
        if entry["case_id"] in ids:
            raise DataError(f"{entry['case_id']}: a different case with this id is already in the datalist; "
                            "rename it (or give it another prefix) before adding it")
        training.append(entry)
        present.add(entry_key(entry))
        ids.add(entry["case_id"])
        added.append(entry)
    return result, added


def source_matches(source: str, wanted: str) -> bool:
    """``wanted`` selects ``source`` exactly, or every ``wanted:<name>`` source (``"sampled"`` → ``"sampled:gli"``)."""
    return source == wanted or source.startswith(f"{wanted}:")


def select_training_cases(datalist: Datalist, fold: int, train_sources: Sequence[str] = (ORIGINAL,),
                          ratio: float | None = None, seed: int = 0) -> list[Case]:
    """The training cases of a run on ``fold``, drawn from the chosen sources.

    Validation (``datalist.split(fold)[1]``) is untouched: only training is filtered. Extra cases derived from a
    case of the validation fold (``source_case``) are left out, so validation labels never leak into training.

    Args:
        train_sources: sources to train on, e.g. ``["original", "synthetic"]`` (see :func:`source_matches`).
        ratio: extra : original — use ``round(ratio × n_original)`` extra cases, a seeded random subset (all of
            them if there are fewer); None uses every extra case. ``n_original`` counts the original training
            cases of the fold whether or not ``"original"`` is among the sources.
        seed: seed of that subset.

    Returns:
        original cases (in datalist order) followed by the chosen extra cases (in datalist order).
    """
    if not train_sources:
        raise ConfigError("data.train_sources", "is empty; list at least one source, e.g. [original]")
    if ratio is not None and ratio < 0:
        raise ConfigError("data.extra_ratio", f"must be ≥ 0 (extra : original), got {ratio}")
    train, val = datalist.split(fold)
    stray = [c for c in val if c.source != ORIGINAL]
    if stray:
        raise DataError(f"{datalist.path or 'datalist'}: {stray[0].case_id} (source {stray[0].source!r}) is in fold "
                        f"{fold}; extra cases belong in fold {TRAINING_ONLY_FOLD} "
                        "(tools/integrate_cases.py puts them there)")
    available = sorted({c.source for c in datalist.training})
    for wanted in train_sources:
        if not any(source_matches(s, wanted) for s in available):
            raise ConfigError("data.train_sources",
                              f"no training case has source {wanted!r}; the datalist has {available}")
    val_ids = {c.case_id for c in val}
    original = [c for c in train if c.source == ORIGINAL]
    chosen = original if ORIGINAL in train_sources else []
    extra = [c for c in train if c.source != ORIGINAL and any(source_matches(c.source, w) for w in train_sources)
             and c.extra.get("source_case") not in val_ids]
    if ratio is not None and round(ratio * len(original)) < len(extra):
        keep = set(random.Random(seed).sample(range(len(extra)), round(ratio * len(original))))
        extra = [c for i, c in enumerate(extra) if i in keep]
    return chosen + extra


def check_run_data(config: RunConfig, datalist: Datalist) -> list[Case]:
    """What a run needs of its datalist, checked before any heavy work (by training, ``train --check`` and the
    sweep launcher): the fold exists, there are training cases, the patch fits the volumes (image headers only).
    Returns the training cases (by ``data.train_sources``)."""
    if config.data.fold not in datalist.folds:
        raise ConfigError("data.fold", f"fold {config.data.fold} is not in {datalist.path}; its folds are {datalist.folds}")
    train_cases = select_training_cases(datalist, config.data.fold, config.data.train_sources, config.data.extra_ratio,
                                        config.trainer.seed)
    if not train_cases:
        raise ConfigError("data.train_sources", f"no training cases for fold {config.data.fold} in {datalist.path}")
    roi = config.data.roi_size
    for case in train_cases + datalist.split(config.data.fold)[1]:
        if not case.images[0].is_file():
            continue  # missing files are reported by the loader, naming the case
        header = nib.load(str(case.images[0]))  # reads the header only
        shape = [0, 0, 0]  # in RAS axis order, as the network sees the volume
        for size, (axis, _) in zip(header.shape[:3], nib.orientations.io_orientation(header.affine)):
            shape[int(axis)] = size
        if any(r > s for r, s in zip(roi, shape)):
            raise ConfigError("data.roi_size", f"{list(roi)} is larger than the volumes (e.g. {case.case_id}: "
                              f"{shape} in RAS order); use a patch that fits inside every case")
    return train_cases
