"""Which cases a soup or an ensemble is selected on and which it is tested on: the one policy both follow.

- Selection (fitting) cases: the validation cases of one fold of the datalist.
- Test cases, in this order: ``test_fold`` of the test source (another fold); else its test split, when
  ``test_split`` or a separate ``test_datalist`` was given; else, for a separate ``test_datalist`` without a test
  split, its labelled cases; else none (no test scores).
- Test cases are never selection cases: any overlap is refused, naming a shared case.
- A test case that a model trained or validated on (by the case ids its checkpoint records,
  :func:`brats_ugrip.seen_cases.check_test_cases`) is refused unless ``allow_seen``; then the returned
  ``notice`` is the line every report must start with.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brats_ugrip.data import Case, Datalist
from brats_ugrip.errors import DataError
from brats_ugrip.seen_cases import check_test_cases


@dataclass(frozen=True)
class TestCases:
    """The chosen test cases. ``where`` describes them ("the test split of datalist.json"; empty without any);
    ``notice`` is set when seen cases were allowed."""

    cases: list[Case]
    where: str
    notice: str | None = None

    @property
    def description(self) -> str:
        return f"{self.where}, {len(self.cases)} cases" if self.cases else ""

    def label(self, fitted: str = "fitting") -> str | None:
        """How test scores are labelled in every table and record (None without test cases)."""
        if not self.cases:
            return None
        if self.notice:
            return f"'test' scores on {self.description}: NOT held out, some were seen in training or validation"
        return f"test scores on {self.description}, never used for training, validation or {fitted}"


def choose_test_cases(datalist: Datalist, selection_fold: int, checkpoints: Sequence[tuple[str, dict[str, Any]]], *,
                      test_fold: int | None = None, test_split: bool = True,
                      test_datalist: str | os.PathLike[str] | None = None,
                      allow_seen: bool = False) -> TestCases:
    """The test cases for models selected on ``selection_fold`` of ``datalist`` (see the module's rules).

    Args:
        checkpoints: ``(name, metadata)`` of every model that will be scored on them.

    Raises:
        DataError: a test case is a selection case, or was seen by a model (unless ``allow_seen``).
    """
    source = Datalist.load(test_datalist) if test_datalist else datalist
    name = Path(source.path or "datalist").name
    if test_fold is not None:
        if test_fold == selection_fold and not test_datalist:
            raise DataError(f"the test fold must differ from the selection fold ({selection_fold}): test cases are "
                            "never selected or fitted on")
        cases, where = source.fold_cases(test_fold), f"fold {test_fold} of {name}"
    elif source.test and (test_split or test_datalist):
        cases, where = list(source.test), f"the test split of {name}"
    elif test_datalist:
        cases, where = [c for c in source.training if c.label is not None], f"the labelled cases of {name}"
    else:
        return TestCases([], "")
    selection = {c.case_id for c in datalist.fold_cases(selection_fold)}
    shared = sorted({c.case_id for c in cases} & selection)
    if shared:
        raise DataError(f"{len(shared)} test case(s) are also selection cases (e.g. {shared[0]}); test cases must "
                        "be cases the selection never sees")
    notice = check_test_cases([c.case_id for c in cases], checkpoints, allow_seen) if cases else None
    return TestCases(cases, where, notice)
