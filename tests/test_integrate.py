import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_ugrip.data import Datalist, cases_from_dir, check_case, make_datalist, save_datalist
from brats_ugrip.errors import ConfigError, DataError
from brats_ugrip.io import read_volume
from brats_ugrip.loaders import make_loaders
from brats_ugrip.synthetic.synthesize import GENERATOR, synthesize_datalist
from brats_ugrip.tools.sample_cases import sample_cases
from brats_ugrip.training_cases import append_training_only, select_training_cases

REPO = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True)


def _text(result):
    """A command's output with rich's line wrapping undone."""
    return " ".join((result.stdout + result.stderr).split())


@pytest.fixture(scope="module")
def synthetic_cases(phantom_dir, tmp_path_factory):
    """One synthetic case per phantom (seed 5), made from a datalist of the phantoms."""
    root = tmp_path_factory.mktemp("synthetic")
    synthesize_datalist(Datalist.from_dict(make_datalist(phantom_dir, 3, 0)), root / "cases", per_case=1, seed=5)
    return root / "cases"


@pytest.fixture
def dataset(phantom_dir, tmp_path):
    """A copy of the phantoms with a 3-fold datalist next to it (data_root ``data``)."""
    shutil.copytree(phantom_dir, tmp_path / "data")
    path = tmp_path / "datalist.json"
    save_datalist(make_datalist(tmp_path / "data", 3, 0, relative_to=tmp_path), path)
    return path


def _validation_ids(path):
    datalist = Datalist.load(path)
    return {fold: [c.case_id for c in datalist.split(fold)[1]] for fold in datalist.folds}


def test_integration_appends_to_fold_minus_one_once(dataset, synthetic_cases):
    before = json.loads(dataset.read_text())
    validation_before = _validation_ids(dataset)
    result = _run("tools/integrate_cases.py", "--datalist", dataset, "--cases", synthetic_cases, "--tag", "synthetic")
    assert result.returncode == 0, result.stderr
    after = json.loads(dataset.read_text())
    assert after["training"][: len(before["training"])] == before["training"]  # folds ≥ 0 untouched
    added = after["training"][len(before["training"]):]
    assert len(added) == len(cases_from_dir(synthetic_cases))
    assert _validation_ids(dataset) == validation_before
    # Re-discovering the data root finds only the original cases.
    assert make_datalist(dataset.parent / "data", 3, 0, relative_to=dataset.parent)["training"] == before["training"]
    datalist = Datalist.load(dataset)
    sources = {c.case_id for c in datalist.training if c.source == "original"}
    for entry, case in zip(added, datalist.training[len(before["training"]):]):
        assert entry["fold"] == -1 and entry["source"] == "synthetic" and entry["generator"] == GENERATOR
        assert entry["case_id"].startswith("BraTS-SYN-") and entry["source_case"] in sources
        assert isinstance(entry["seed"], int) and (synthetic_cases / entry["origin"]).is_dir()
        assert check_case(case, "brats2023").ok and case.images[0].parent.parent == datalist.data_root / "synthetic"
    # Copied images are the generated ones.
    first = cases_from_dir(synthetic_cases / added[0]["origin"])[0]
    np.testing.assert_array_equal(read_volume(datalist.training[len(before["training"])].label)[0],
                                  read_volume(first.label)[0])
    # Idempotent: a second run changes nothing, not even the file.
    text = dataset.read_text()
    again = _run("tools/integrate_cases.py", "--datalist", dataset, "--cases", synthetic_cases, "--tag", "synthetic")
    assert again.returncode == 0 and "nothing new" in _text(again)
    assert dataset.read_text() == text


def test_bad_cases_are_reported_and_skipped_and_labels_converted(dataset, synthetic_cases, tmp_path):
    """An external generator's cases in BraTS 2021 naming, one with a broken label map."""
    external = tmp_path / "external"
    renames = {"t1c": "t1ce", "t1n": "t1", "t2f": "flair", "t2w": "t2", "seg": "seg"}
    for i, case in enumerate(cases_from_dir(synthetic_cases)[:3]):
        new_id = f"ddpm_{i:03d}"
        (external / new_id).mkdir(parents=True)
        for path in (*case.images, case.label):
            suffix = path.name[len(case.case_id) + 1:].split(".")[0]
            target = external / new_id / f"{new_id}_{renames[suffix]}.nii.gz"
            if suffix == "seg":
                label, affine = read_volume(path, np.uint8)
                label = np.where(label == 3, 4, label).astype(np.uint8)  # BraTS 2021: ET is 4
                label[0, 0, 0] = 9 if i == 1 else label[0, 0, 0]
                nib.save(nib.Nifti1Image(label, affine), str(target))
            else:
                shutil.copyfile(path, target)
    result = _run("tools/integrate_cases.py", "--datalist", dataset, "--cases", external, "--tag", "ddpm",
                  "--generator", "med-ddpm")
    assert result.returncode == 1 and "ddpm_001" in _text(result)
    added = [e for e in json.loads(dataset.read_text())["training"] if e.get("source") == "ddpm"]
    assert [e["origin"] for e in added] == ["ddpm_000", "ddpm_002"]
    assert all(e["generator"] == "med-ddpm" and e["case_id"].startswith("BraTS-DDP-") for e in added)
    datalist = Datalist.load(dataset)
    converted = [c for c in datalist.training if c.source == "ddpm"][0]
    assert check_case(converted, "brats2023").ok
    assert 3 in np.unique(read_volume(converted.label, np.uint8)[0])


def test_sampling_is_reproducible_and_stratified(dataset, synthetic_cases, tmp_path):
    other = tmp_path / "other.json"
    save_datalist(make_datalist(synthetic_cases, 2, 0, relative_to=tmp_path), other)
    copies = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        target = tmp_path / f"{name}.json"
        shutil.copyfile(dataset, target)
        result = _run("tools/sample_cases.py", "--datalist", other, "--n", 3, "--seed", seed, "--into", target,
                      "--stratify", "volume", "--bins", 3)
        assert result.returncode == 0, result.stderr
        copies.append([e for e in json.loads(target.read_text())["training"] if e["fold"] == -1])
    assert copies[0] == copies[1] and len(copies[0]) == 3
    assert all(e["source"] == "sampled:other" for e in copies[0])
    # One case from each volume tercile of the six candidates.
    volumes = sorted(float((read_volume(c.label)[0] > 0).sum()) for c in cases_from_dir(synthetic_cases))
    chosen = sorted(float((read_volume(c.label)[0] > 0).sum()) for c in Datalist.load(tmp_path / "a.json").training
                    if c.source.startswith("sampled"))
    assert [volumes.index(v) // 2 for v in chosen] == [0, 1, 2]
    assert _validation_ids(tmp_path / "a.json") == _validation_ids(dataset)
    again = _run("tools/sample_cases.py", "--datalist", other, "--n", 3, "--seed", 0, "--into", tmp_path / "a.json",
                 "--stratify", "volume", "--bins", 3)
    assert again.returncode == 0 and "added 0 of 3" in _text(again)


def test_unstratified_samples_depend_on_the_seed(dataset, synthetic_cases, tmp_path):
    other = Datalist.from_dict(make_datalist(synthetic_cases, 2, 0))
    draws = [tuple(c.case_id for c in sample_cases(other, 3, seed)[0]) for seed in range(5)]
    assert draws[0] == tuple(c.case_id for c in sample_cases(other, 3, 0)[0])
    assert len(set(draws)) > 1


def _datalist(n_original=6, folds=3):
    entries = [{"case_id": f"orig{i}", "fold": i % folds, "image": ["a", "b", "c", "d"], "label": "s"}
               for i in range(n_original)]
    raw = {"training": entries}
    extra = [{"case_id": f"syn{i}", "image": ["a", "b", "c", "d"], "label": "s", "source": "synthetic",
              "origin": f"x{i}", "generator": GENERATOR, "seed": i, "source_case": f"orig{i % n_original}"}
             for i in range(12)]
    extra += [{"case_id": f"gli{i}", "image": ["a", "b", "c", "d"], "label": "s", "source": "sampled:gli"}
              for i in range(4)]
    raw, added = append_training_only(raw, extra)
    assert len(added) == len(extra)
    return raw


def test_append_training_only_is_idempotent_and_guarded():
    raw = _datalist()
    assert all(e["fold"] == -1 for e in raw["training"][6:])
    same, added = append_training_only(raw, [{**e} for e in raw["training"][6:]])
    assert added == [] and same == raw
    with pytest.raises(DataError, match="source tag"):
        append_training_only(raw, [{"case_id": "new", "image": [], "fold": 0}])
    with pytest.raises(DataError, match="orig0"):
        append_training_only(raw, [{"case_id": "orig0", "image": [], "source": "synthetic", "origin": "elsewhere"}])


def test_select_training_cases_by_source_and_ratio():
    datalist = Datalist.from_dict(_datalist())
    for fold in datalist.folds:
        train, val = datalist.split(fold)
        val_ids = {c.case_id for c in val}
        base = select_training_cases(datalist, fold, ["original"])
        assert {c.case_id for c in base} == {c.case_id for c in train if c.source == "original"}
        mixed = select_training_cases(datalist, fold, ["original", "synthetic"], seed=0)
        synthetic = [c for c in mixed if c.source == "synthetic"]
        # Synthetic cases made from this fold's validation cases would leak their labels: left out.
        assert synthetic and all(c.extra["source_case"] not in val_ids for c in synthetic)
        assert len(synthetic) == sum(c.source == "synthetic" and c.extra["source_case"] not in val_ids for c in train)
        assert not val_ids & {c.case_id for c in mixed}
        half = select_training_cases(datalist, fold, ["original", "synthetic"], ratio=0.5, seed=0)
        assert sum(c.source == "synthetic" for c in half) == round(0.5 * len(base))
        assert half == select_training_cases(datalist, fold, ["original", "synthetic"], ratio=0.5, seed=0)
    draws = {tuple(c.case_id for c in select_training_cases(datalist, 0, ["original", "synthetic"], 0.5, s))
             for s in range(6)}
    assert len(draws) > 1
    sampled = select_training_cases(datalist, 0, ["original", "sampled"])
    assert {c.source for c in sampled} == {"original", "sampled:gli"}
    with pytest.raises(ConfigError, match="synthetc"):
        select_training_cases(datalist, 0, ["original", "synthetc"])


def test_extra_cases_in_a_validation_fold_are_refused():
    raw = _datalist()
    raw["training"][-1]["fold"] = 1
    with pytest.raises(DataError, match="gli3"):
        select_training_cases(Datalist.from_dict(raw), 1, ["original"])


def test_make_loaders_trains_on_the_selected_cases(dataset, synthetic_cases):
    assert _run("tools/integrate_cases.py", "--datalist", dataset, "--cases", synthetic_cases,
                "--tag", "synthetic").returncode == 0
    datalist = Datalist.load(dataset)
    chosen = select_training_cases(datalist, 0, ["original", "synthetic"], ratio=1.0, seed=0)
    train_loader, val_loader = make_loaders(datalist, 0, "brats2023", (32, 32, 32), 1, None, train_cases=chosen)
    assert train_loader.dataset.cases == chosen and val_loader.dataset.cases == datalist.split(0)[1]
    batch = next(iter(train_loader))
    assert batch["image"].shape == (1, 4, 32, 32, 32)
