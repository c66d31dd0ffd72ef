"""The one selection/test-case policy of soups and ensembles (brats_ugrip.case_policy), on hand-made datalists:
which cases are the test cases, that test cases are never selection cases, and how seen cases are refused."""
from __future__ import annotations

import json

import pytest

from brats_ugrip.case_policy import choose_test_cases
from brats_ugrip.data import Datalist
from brats_ugrip.errors import DataError


def _entry(case_id: str, fold: int | None = None) -> dict:
    entry = {"case_id": case_id, "image": [f"{case_id}/{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f")],
             "label": f"{case_id}/seg.nii.gz"}
    return {**entry, "fold": fold} if fold is not None else entry


def _datalist(tmp_path, name: str, training: list[dict], test: list[dict]) -> Datalist:
    path = tmp_path / name
    path.write_text(json.dumps({"training": training, "test": test}))
    return Datalist.load(path)


@pytest.fixture
def datalist(tmp_path):
    # fold 0: a, b (the selection fold); fold 1: c, d; test split: t
    return _datalist(tmp_path, "datalist.json", [_entry("a", 0), _entry("b", 0), _entry("c", 1), _entry("d", 1)],
                     [_entry("t")])


UNSEEN = [("m.ckpt", {"cases": {"train": ["c", "d"], "val": ["a", "b"], "init": []}})]


def test_the_test_split_by_default_another_fold_on_request_none_when_asked(datalist):
    chosen = choose_test_cases(datalist, 0, UNSEEN)
    assert [c.case_id for c in chosen.cases] == ["t"] and chosen.where == "the test split of datalist.json"
    assert chosen.label("fitting") == ("test scores on the test split of datalist.json, 1 cases, never used for "
                                       "training, validation or fitting")
    assert [c.case_id for c in choose_test_cases(datalist, 0, [], test_fold=1).cases] == ["c", "d"]
    assert choose_test_cases(datalist, 0, UNSEEN, test_split=False).cases == []


def test_the_selection_fold_is_never_the_test_fold(datalist):
    with pytest.raises(DataError, match="must differ from the selection fold"):
        choose_test_cases(datalist, 0, UNSEEN, test_fold=0)


def test_test_cases_shared_with_the_selection_are_refused(datalist, tmp_path):
    """A separate test datalist that holds a selection case (b): refused, naming it, for soups and ensembles alike
    (before, only soups checked)."""
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"training": [_entry("x", 0)], "test": [_entry("b"), _entry("y")]}))
    with pytest.raises(DataError, match=r"1 test case\(s\) are also selection cases \(e.g. b\)"):
        choose_test_cases(datalist, 0, [], test_datalist=other)


def test_a_test_case_a_model_saw_is_refused_unless_allowed(datalist):
    seen = [("m.ckpt", {"cases": {"train": ["t", "c"], "val": ["a", "b"], "init": []}})]
    with pytest.raises(DataError, match="test cases were in a model"):
        choose_test_cases(datalist, 0, seen)
    chosen = choose_test_cases(datalist, 0, seen, allow_seen=True)
    assert chosen.notice and "NOT held out" in chosen.label()
