import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_ugrip.data import MODALITIES, Datalist, cases_from_dir, check_case, make_datalist, save_datalist
from brats_ugrip.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or REPO, capture_output=True, text=True)


@pytest.fixture
def data_copy(phantom_dir, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(phantom_dir, target)
    return target


def test_make_datalist_cli_balanced_folds(phantom_dir, tmp_path):
    out = tmp_path / "lists" / "datalist.json"
    result = _run("tools/make_datalist.py", phantom_dir, "--folds", "3", "--seed", "1", "--out", out)
    assert result.returncode == 0, result.stderr
    raw = json.loads(out.read_text())
    assert raw["modalities"] == list(MODALITIES) and raw["label_scheme"] == "brats2023"
    folds = [e["fold"] for e in raw["training"]]
    assert sorted(set(folds)) == [0, 1, 2] and max(map(folds.count, set(folds))) - min(map(folds.count, set(folds))) <= 1
    # Paths are relative and resolve from the datalist's own folder.
    assert not Path(raw["training"][0]["image"][0]).is_absolute()
    datalist = Datalist.load(out)
    assert all(p.is_file() for c in datalist.training for p in (*c.images, c.label))
    assert [p.name.split("-")[-1] for p in datalist.training[0].images] == [f"{m}.nii.gz" for m in MODALITIES]


def test_folds_are_reproducible_and_seed_dependent(phantom_dir):
    a, b, c = (make_datalist(phantom_dir, 3, seed) for seed in (0, 0, 5))
    assert a == b
    assert [e["fold"] for e in a["training"]] != [e["fold"] for e in c["training"]]


def test_split_excludes_training_only_fold(phantom_dir, tmp_path):
    raw = make_datalist(phantom_dir, 3, 0, relative_to=tmp_path)
    raw["training"][0]["fold"] = -1
    save_datalist(raw, tmp_path / "d.json")
    datalist = Datalist.load(tmp_path / "d.json")
    for fold in datalist.folds:
        train, val = datalist.split(fold)
        assert all(c.fold == fold for c in val) and all(c.fold != fold for c in train)
        assert raw["training"][0]["case_id"] in {c.case_id for c in train} - {c.case_id for c in val}
    with pytest.raises(DataError, match="fold 7 does not exist"):
        datalist.split(7)


def test_brats2021_naming_detected(data_copy, tmp_path):
    renames = {"t1c": "t1ce", "t1n": "t1", "t2f": "flair", "t2w": "t2", "seg": "seg"}
    for case_dir in list(data_copy.iterdir()):
        new_id = case_dir.name.replace("BraTS-", "BraTS2021_").replace("-", "_")
        for old, new in renames.items():
            (case_dir / f"{case_dir.name}-{old}.nii.gz").rename(case_dir / f"{new_id}_{new}.nii.gz")
        case_dir.rename(case_dir.parent / new_id)
    raw = make_datalist(data_copy, 2, 0)
    assert raw["naming"] == "brats2021" and raw["label_scheme"] == "brats2021"
    images = raw["training"][0]["image"]
    assert images[0].endswith("_t1ce.nii.gz") and images[2].endswith("_flair.nii.gz")


def test_unlabelled_cases_go_to_testing(data_copy):
    victim = sorted(data_copy.iterdir())[0]
    (victim / f"{victim.name}-seg.nii.gz").unlink()
    raw = make_datalist(data_copy, 2, 0)
    assert [e["case_id"] for e in raw["testing"]] == [victim.name]
    assert victim.name not in {e["case_id"] for e in raw["training"]}
    assert [c.case_id for c in cases_from_dir(data_copy)] == sorted(p.name for p in data_copy.iterdir())


def test_datalist_errors_name_the_problem(tmp_path, phantom_dir):
    with pytest.raises(DataError, match="no BraTS cases found"):
        make_datalist(tmp_path, 2, 0)
    with pytest.raises(DataError, match="make_datalist.py"):
        Datalist.load(tmp_path / "missing.json")
    bad = {"training": [{"image": ["a", "b"], "label": "s", "fold": 0}]}
    with pytest.raises(DataError, match=r"training\[0\]\.image"):
        Datalist.from_dict(bad)
    bad = {"training": [{"image": ["a", "b", "c", "d"], "label": "s"}]}
    with pytest.raises(DataError, match=r"training\[0\]\.fold"):
        Datalist.from_dict(bad)


def _write(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), str(path))


def test_validator_reports_every_problem(data_copy, tmp_path):
    raw = make_datalist(data_copy, 2, 0, relative_to=tmp_path)
    save_datalist(raw, tmp_path / "d.json")
    cases = {c.case_id: c for c in Datalist.load(tmp_path / "d.json").training}
    ids = sorted(cases)
    missing, shape, affine, label, empty = (cases[i] for i in ids[:5])
    missing.images[1].unlink()
    ref = nib.load(str(shape.images[0]))
    _write(shape.images[2], np.zeros((5, 5, 5), np.float32) + 1)
    _write(affine.images[3], np.asanyarray(nib.load(str(affine.images[3])).dataobj), ref.affine * 2)
    seg = np.asanyarray(nib.load(str(label.label)).dataobj).copy()
    seg[0, 0, 0] = 4
    _write(label.label, seg, nib.load(str(label.label)).affine)
    _write(empty.images[0], np.zeros(ref.shape, np.float32), ref.affine)

    expected = {missing: "t1n: missing file", shape: "t2f: shape", affine: "t2w: affine differs",
                label: r"label values \[4\]", empty: "t1c: image is empty"}
    for case, pattern in expected.items():
        problems = check_case(case, "brats2023").problems
        assert any(__import__("re").search(pattern, p) for p in problems), (case.case_id, problems)
    assert check_case(cases[ids[5]], "brats2023").ok

    result = _run("tools/check_data.py", tmp_path / "d.json")
    assert result.returncode == 1
    for case in expected:
        assert case.case_id in result.stdout + result.stderr
