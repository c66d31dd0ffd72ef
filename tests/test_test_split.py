"""The held-out test split: made by make_datalist, never read by folds, and guarded by the cases checkpoints record."""
from __future__ import annotations

import json
import shutil

import pytest

from brats_ugrip.data import Case, Datalist, make_datalist, save_datalist
from brats_ugrip.errors import DataError
from brats_ugrip.seen_cases import case_record, check_test_cases, seen_cases
from brats_ugrip.tools.make_datalist import main as make_datalist_main


def test_test_split_is_disjoint_from_every_fold(phantom_dir, tmp_path):
    out = tmp_path / "datalist.json"
    assert make_datalist_main([str(phantom_dir), "--folds", "2", "--test-cases", "2", "--out", str(out)]) == 0
    datalist = Datalist.load(out)
    test_ids = {c.case_id for c in datalist.test}
    assert len(test_ids) == 2 and all(c.label is not None and c.label.is_file() for c in datalist.test)
    # 6 phantoms: 2 held out, 4 dealt into 2 folds of 2.
    assert sorted(c.fold for c in datalist.training) == [0, 0, 1, 1]
    for fold in datalist.folds:
        train, val = datalist.split(fold)
        assert not test_ids & {c.case_id for c in train + val}
    assert test_ids | {c.case_id for c in datalist.training} == {p.name for p in phantom_dir.iterdir() if p.is_dir()}


def test_test_fraction_rounds_and_folds_stay_reproducible(phantom_dir):
    a = make_datalist(phantom_dir, n_folds=2, seed=3, test_fraction=0.34)  # round(0.34 × 6) = 2
    b = make_datalist(phantom_dir, n_folds=2, seed=3, test_fraction=0.34)
    assert a == b and len(a["test"]) == 2 and len(a["training"]) == 4
    assert "test" not in make_datalist(phantom_dir, n_folds=2, seed=3)  # no split asked: the old format
    with pytest.raises(DataError, match="leaves no training cases"):
        make_datalist(phantom_dir, n_folds=2, test_cases=6)


def test_old_datalists_load_and_test_cases_need_labels(phantom_dir, tmp_path):
    raw = make_datalist(phantom_dir, n_folds=2, seed=0, relative_to=tmp_path)
    save_datalist(raw, tmp_path / "old.json")
    assert Datalist.load(tmp_path / "old.json").test == []
    moved = dict(raw, test=[{k: v for k, v in raw["training"][0].items() if k != "label"}], training=raw["training"][1:])
    (tmp_path / "bad.json").write_text(json.dumps(moved))
    with pytest.raises(DataError, match="has no label"):
        Datalist.load(tmp_path / "bad.json")


def _case(case_id: str, **extra) -> Case:
    return Case(case_id, (), extra=extra)


def test_record_lists_trained_validated_inherited_and_source_cases():
    record = case_record([_case("a"), _case("syn-1", source_case="b")], [_case("c")], init=["d"])
    assert record == {"train": ["a", "b", "syn-1"], "val": ["c"], "init": ["d"]}
    assert seen_cases({"cases": record}) == {"a", "b", "syn-1", "c", "d"}


def test_a_seen_test_case_is_refused_by_name_unless_allowed():
    metas = [("x.ckpt", {"cases": case_record([_case("a")], [_case("b")])}),
             ("y.ckpt", {"cases": case_record([_case("c")], [], init=["t2"])})]
    assert check_test_cases(["t1"], metas) is None
    with pytest.raises(DataError, match=r"1 of the 2 test cases .*t2, seen by y.ckpt.*--allow-seen-test-cases"):
        check_test_cases(["t1", "t2"], metas)
    line = check_test_cases(["t1", "t2"], metas, allow_seen=True)
    assert line.startswith("NOT A TEST SCORE (--allow-seen-test-cases)") and "t2" in line


def test_the_check_survives_moving_the_datalist(phantom_dir, tmp_path):
    """A legacy checkpoint (no record) is checked through its datalist while it exists, and refused, not silently
    passed, once it is gone; a recorded one gives the same answer either way."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    path = tmp_path / "datalist.json"
    save_datalist(make_datalist(data, n_folds=2, seed=0, relative_to=tmp_path), path)
    datalist = Datalist.load(path)
    train, val = datalist.split(0)
    config = {"data": {"datalist": str(path)}}
    legacy = {"config": config, "fold": 0}
    recorded = {"config": config, "fold": 0, "cases": case_record(train, val)}
    seen = train[0].case_id
    for meta in (legacy, recorded):
        with pytest.raises(DataError, match=seen):
            check_test_cases([seen], [("m.ckpt", meta)])
    path.rename(tmp_path / "moved.json")
    with pytest.raises(DataError, match=seen):
        check_test_cases([seen], [("m.ckpt", recorded)])
    with pytest.raises(DataError, match="cannot be checked"):
        check_test_cases([seen], [("m.ckpt", legacy)])
