"""Where a comparison's candidates come from: per-case scores of prediction folders, checkpoints, ensemble specs,
soups' and ensembles' stored test scores, or score CSVs; and the labelled cases they are scored on.

Contract: every function returns :class:`~brats_ugrip.comparison.Candidate` objects whose ``scores`` are
``{case_id: {metric: value}}`` on the labelled cases given (or stored), ready for
:func:`brats_ugrip.comparison.compare`. Predicted folders are scored exactly as ``brats-ugrip evaluate`` scores
them (:func:`brats_ugrip.metrics.evaluation.score_files`: a missing prediction scores as the worst case).
Checkpoints and specs are first predicted into ``work/<name>/`` (torch is imported only then); which one a file
is comes from the function called (the command's flag), never from its name. Stored scores are
used as stored: nothing is recomputed, and a soup or fit report without per-case scores is refused (older
versions stored means only; make them again).
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brats_ugrip.comparison import Candidate
from brats_ugrip.data import Case
from brats_ugrip.errors import DataError

if TYPE_CHECKING:  # torch is imported when there is a model to run, not for --help
    from brats_ugrip.inference import CasePredictor

_NOT_SCORES = {"case_id", "prediction_missing"}


def _existing(path: str | os.PathLike[str], what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    return path


def labelled(cases: Sequence[Case]) -> list[Case]:
    """The cases, checked to all have a reference segmentation (a comparison needs labels)."""
    missing = [case.case_id for case in cases if case.label is None]
    if missing or not cases:
        raise DataError(f"{len(missing)} case(s) have no reference segmentation (e.g. {missing[0]}); a comparison "
                        "needs labelled cases" if missing else "no cases to compare on")
    return list(cases)


SECTIONS = ("test", "training", "all", "testing")
"""Datalist sections a comparison scores on: ``test`` (the held-out split, the default), ``training``, ``all``
(training + test: every labelled section) and ``testing`` (unlabelled as ``make_datalist`` writes it, so refused
unless its cases have labels)."""


def labelled_cases(path: str | os.PathLike[str], section: str = "test") -> list[Case]:
    """The labelled cases of a case folder, a folder of case folders, or a datalist's ``section`` (:data:`SECTIONS`).

    Not ``infer``'s sections: those are what to *predict* (default ``testing``, the unlabelled cases), while a
    comparison needs references, which a datalist keeps in ``training`` and the held-out ``test`` split."""
    from brats_ugrip.data import Datalist, cases_from_dir

    path = Path(path)
    if not path.is_file():
        return labelled(cases_from_dir(path))
    if section not in SECTIONS:
        raise DataError(f"unknown datalist section {section!r}; choose one of {', '.join(SECTIONS)}")
    datalist = Datalist.load(path)
    cases = {"test": datalist.test, "training": datalist.training, "all": datalist.training + datalist.test,
             "testing": datalist.testing}[section]
    if not cases:
        raise DataError(f"{path}: the datalist has no {section} cases; choose another --section ({', '.join(SECTIONS)})")
    return labelled(cases)


def from_predictions(name: str, pred_dir: str | os.PathLike[str], cases: Sequence[Case], scheme: str, metrics: str,
                     kind: str = "other") -> Candidate:
    """A folder of ``<ID>.nii.gz`` label maps scored against the cases' references."""
    from brats_ugrip.metrics.evaluation import score_files

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder not found")
    scores = {}
    for case in labelled(cases):
        path = pred_dir / f"{case.case_id}.nii.gz"
        row = score_files(case.case_id, path if path.is_file() else None, case.label, scheme, metrics)
        scores[case.case_id] = {k: float(v) for k, v in row.items() if k not in _NOT_SCORES}
    return Candidate(name, scores, kind)


def from_checkpoint(name: str, path: str | os.PathLike[str], cases: Sequence[Case], work: str | os.PathLike[str],
                    scheme: str, metrics: str, device: str | None = None) -> Candidate:
    """A checkpoint (``single``, or ``soup`` when its metadata says so) predicted on ``cases`` into
    ``work/<name>/``, then scored."""
    from brats_ugrip.checkpoints import load_model
    from brats_ugrip.config import config_from_dict
    from brats_ugrip.inference import ModelPredictor, inference_settings, prepare_model

    path = _existing(path, "checkpoint")
    model, meta = load_model(path, map_location=_device(device))
    if "config" not in meta:
        raise DataError(f"{path}: its metadata holds no run config (inference settings unknown)")
    config = config_from_dict(meta["config"])
    settings = inference_settings(config)
    predictor = ModelPredictor(prepare_model(model, settings), settings, config.data.scheme)
    return _predicted(name, predictor, cases, work, scheme, metrics, "soup" if meta.get("soup") else "single")


def from_spec(name: str, path: str | os.PathLike[str], cases: Sequence[Case], work: str | os.PathLike[str],
              scheme: str, metrics: str, device: str | None = None) -> Candidate:
    """An ensemble spec (``ensemble``) predicted on ``cases`` into ``work/<name>/``, then scored. The file is read
    as a spec whatever its name ends with (a checkpoint given here is refused, naming the file)."""
    from brats_ugrip.ensembling.predict import Ensemble
    from brats_ugrip.ensembling.spec import EnsembleSpec

    spec = EnsembleSpec.load(_existing(path, "ensemble spec"))
    return _predicted(name, Ensemble(spec, device=_device(device)), cases, work, scheme, metrics, "ensemble")


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _predicted(name: str, predictor: CasePredictor, cases: Sequence[Case], work: str | os.PathLike[str], scheme: str,
               metrics: str, kind: str) -> Candidate:
    from brats_ugrip.inference import predict_cases

    out = Path(work) / name
    predict_cases(predictor, labelled(cases), out)
    return from_predictions(name, out, cases, scheme, metrics, kind)


def _kind(model: str) -> str:
    if model.startswith("best ingredient") or model.startswith("best single"):
        return "single"
    return "soup" if "soup" in model else "other"


def _per_case(where: str, model: str, entry: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    per_case = (entry or {}).get("per_case")
    if not per_case:
        raise DataError(f"{where}: {model} has no per-case test scores (made by an older version, which stored "
                        "means only); make it again to compare")
    return {case: {k: float(v) for k, v in row.items()} for case, row in per_case.items()}


def from_soup(path: str | os.PathLike[str]) -> tuple[list[Candidate], dict[str, Any]]:
    """Every model of a soup checkpoint's stored test table (best ingredient, uniform or greedy soup), and the
    table's record (``label``, ``where``, ``notice``)."""
    from brats_ugrip.checkpoints import checkpoint_meta, load_checkpoint

    path = _existing(path, "soup checkpoint")
    meta = checkpoint_meta(load_checkpoint(path, mmap=True), path)
    test = (meta.get("soup") or {}).get("test")
    if not test or "models" not in test:
        raise DataError(f"{path}: holds no test scores; soup on a datalist with a test split (or pass --test-fold)")
    return [Candidate(model, _per_case(str(path), model, entry), _kind(model))
            for model, entry in test["models"].items()], test


def from_fit_report(path: str | os.PathLike[str], name: str | None = None) -> tuple[Candidate, dict[str, Any]]:
    """The fitted ensemble's test scores from ``<spec>.fit.json`` (``ensembling/cli.py --fit``), and its fit record."""
    try:
        report = json.loads(_existing(path, "ensemble fit report").read_text())
    except ValueError as error:
        raise DataError(f"{path}: not a JSON fit report ({error})") from error
    record = report.get("fit") or {}
    if not report.get("test"):
        raise DataError(f"{path}: the ensemble fit report holds no test scores; fit on a datalist with a test split")
    n = len(record.get("single_model_scores") or [])
    name = name or f"ensemble (fitted per channel, {n} models)"
    return Candidate(name, _per_case(str(path), name, report["test"]), "ensemble"), record


def from_csv(name: str, path: str | os.PathLike[str], kind: str = "other") -> Candidate:
    """Per-case scores from a CSV with a ``case_id`` column (``brats-ugrip evaluate --out``'s file)."""
    with open(_existing(path, "scores CSV"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "case_id" not in rows[0]:
        raise DataError(f"{path}: expected a CSV with a case_id column and one row per case")
    scores = {}
    for row in rows:
        scores[row["case_id"]] = {k: float(v) for k, v in row.items() if k not in _NOT_SCORES and v not in ("", None)}
    return Candidate(name, scores, kind)
