"""Ensemble fits from Python: checkpoints and a datalist in, a fitted ensemble and its scores out.

    from brats_ugrip.ensembling.api import fit_ensemble_from_checkpoints
    fitted = fit_ensemble_from_checkpoints(["a.ckpt", "b.ckpt"], datalist="datalist.json", fold=0)
    fitted.ensemble.spec.save("ensemble.yaml"); fitted.result.test.dice

The weights, thresholds and post-processing are chosen on the validation cases of ``fold``
(:func:`brats_ugrip.ensembling.fit.fit_ensemble`); the fitted ensemble is then scored on the datalist's test split
when it has one (or on ``test_fold``). A test case that a member trained or validated on is refused, by the case
ids its checkpoint records, unless ``allow_seen_test_cases`` (the one policy of soups and ensembles:
:func:`brats_ugrip.case_policy.choose_test_cases`, which also refuses test cases that are fitting cases);
then the spec's fit record, the console table and the fit report carry the same label saying so.
``brats-ugrip ensemble --fit`` (``ensembling/cli.py``) parses its arguments and calls this.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from brats_ugrip.case_policy import choose_test_cases
from brats_ugrip.data import Datalist
from brats_ugrip.ensembling.fit import FitResult, fit_ensemble, training_overlap
from brats_ugrip.ensembling.predict import Ensemble
from brats_ugrip.ensembling.spec import EnsembleSpec, spec_from_checkpoints
from brats_ugrip.errors import DataError
from brats_ugrip.heldout import HeldOutSet


@dataclass
class FittedEnsemble:
    """A fitted ensemble and what was measured of it.

    Attributes:
        ensemble: the ensemble with the fitted spec (``ensemble.spec`` is what MLCube packages).
        result: its scores on the fitting cases and, when there were test cases, on them.
        test_label: how the test scores are labelled everywhere (None without test cases).
        warnings: members trained on the fitting fold (their held-out scores there are optimistic).
    """

    ensemble: Ensemble
    result: FitResult
    test_label: str | None
    warnings: list[str]


def fit_ensemble_from_checkpoints(checkpoints: Sequence[str | os.PathLike[str]] | None = None, *,
                                  datalist: str | os.PathLike[str], fold: int, spec: EnsembleSpec | None = None,
                                  data_root: str | os.PathLike[str] | None = None, test_fold: int | None = None,
                                  test_split: bool = True, allow_seen_test_cases: bool = False,
                                  method: str = "fitted", postprocessing: bool = True,
                                  cache_dir: str | os.PathLike[str] | None = None, device: str | None = None,
                                  inference: dict[str, Any] | None = None, progress: bool = True) -> FittedEnsemble:
    """Fit an ensemble of ``checkpoints`` (or refit ``spec``) on fold ``fold`` and score it on the test cases.

    Args:
        checkpoints: the members' checkpoints (or give ``spec``).
        datalist, data_root: the datalist holding the fitting fold and the test split.
        test_fold: test on this fold instead of the test split; ``test_split=False``: no test scores.
        allow_seen_test_cases: score test cases a member trained or validated on (refused otherwise).
        method: ``fitted``, ``dice`` or ``equal`` (see ``ensembling/fit.py``).
        inference: overrides of every member's inference settings (``tta``, ``overlap``, ``sw_batch_size``).
    """
    if (checkpoints is None) == (spec is None):
        raise DataError("give the members' checkpoints or an ensemble spec (one of them)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = spec if spec is not None else spec_from_checkpoints(list(checkpoints))
    if inference:
        import dataclasses

        spec.members = [dataclasses.replace(m, inference={**m.inference, **inference}) for m in spec.members]
    ensemble = Ensemble(spec, device)
    loaded = Datalist.load(datalist, data_root)
    chosen = choose_test_cases(loaded, fold, [(m.path.name, m.meta) for m in ensemble.members], test_fold=test_fold,
                               test_split=test_split, allow_seen=allow_seen_test_cases)
    test_cases = chosen.cases
    warnings = [f"{path} was trained on fold {fold}'s cases (its validation fold is another): its held-out scores "
                "there are optimistic and the fit will favour it" for path in training_overlap(ensemble, fold)]
    held_out = HeldOutSet.from_fold(loaded, fold, cache_dir=cache_dir, device=device, progress=progress)
    test_set = (HeldOutSet(test_cases, loaded.label_scheme, cache_dir, device, progress=progress)
                if test_cases else None)
    label = chosen.label("fitting")
    record = {"datalist": str(Path(datalist).resolve()), "fold": fold, "test_fold": test_fold,
              "test_cases_from": chosen.where or None, "test_label": label, "test_notice": chosen.notice}
    result = fit_ensemble(ensemble, held_out, method, test_set, postprocessing, record=record, progress=progress)
    return FittedEnsemble(ensemble.with_spec(result.spec), result, label, warnings)
