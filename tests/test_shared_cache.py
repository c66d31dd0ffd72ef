"""One data cache per dataset: where it lives (one rule for training, soups and ensembles), entries keyed by
content (two runs on two copies of a dataset share them), and runs filling it at once leave one complete set."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from brats_ugrip.data import cases_from_dir
from brats_ugrip.preprocess import CACHE_ENV, CaseCache, case_cache_dir

REPO = Path(__file__).resolve().parents[1]


def _disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_one_rule_for_where_the_cache_lives(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    sweep = tmp_path / "sweep"
    (sweep / "runs" / "a").mkdir(parents=True)
    lone = tmp_path / "lone"
    assert case_cache_dir(None, lone) == lone / "cache"  # a run outside a sweep: its own
    # The core knows no sweep: the caller that groups runs names their shared cache (rule 3).
    assert case_cache_dir(None, sweep / "runs" / "a") == sweep / "runs" / "a" / "cache"
    assert case_cache_dir(None, sweep / "runs" / "a", sweep / "cache") == sweep / "cache"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "project"))
    assert case_cache_dir(None, sweep / "runs" / "a", sweep / "cache") == tmp_path / "project" / "cases"
    assert case_cache_dir(tmp_path / "mine", sweep / "runs" / "a") == tmp_path / "mine"  # data.cache_dir wins
    assert case_cache_dir(None, None) == tmp_path / "project" / "cases"

    from brats_ugrip.souping.scoring import default_cache_dir

    (tmp_path / "project" / "cases").mkdir(parents=True)
    meta = {"config": {"data": {"cache_dir": None}, "run_dir": str(sweep / "runs" / "a")}}
    assert default_cache_dir(meta) == str(tmp_path / "project" / "cases")  # soups look where training cached
    (sweep / "cache").mkdir()
    assert default_cache_dir({**meta, "case_cache": str(sweep / "cache")}) == str(sweep / "cache")  # as recorded


def test_a_sweep_names_its_runs_shared_cache(tmp_path):
    """sweeps/layout.py: a run directory of a sweep (SWEEP_DIR/runs/<id> beside SWEEP_DIR/sweep.db) shares
    SWEEP_DIR/cache; a folder that only looks like one (no sweep.db) is no sweep."""
    from brats_ugrip.sweeps import layout

    sweep = tmp_path / "sweep"
    run_dir = layout.run_dir_path(sweep, "a")
    run_dir.mkdir(parents=True)
    assert layout.sweep_of_run(run_dir) is None
    layout.sweep_db_path(sweep).touch()
    assert layout.sweep_of_run(run_dir) == sweep and layout.case_cache(sweep) == sweep / "cache"
    assert layout.sweep_of_run(tmp_path / "elsewhere" / "a") is None


FILL = r'''
import sys
from pathlib import Path
from brats_ugrip.data import cases_from_dir
from brats_ugrip.preprocess import CaseCache, case_cache_dir
from brats_ugrip.sweeps import layout
data, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
cache = CaseCache(case_cache_dir(None, run_dir, layout.case_cache(layout.sweep_of_run(run_dir))))
for case in cases_from_dir(data):
    cache.get(case)
'''


def test_two_runs_on_copies_of_a_dataset_fill_one_cache_at_once(tmp_path, phantom_dir, monkeypatch):
    """Two runs of one sweep, each on its own copy of the dataset (other paths, same content), fill the sweep's
    cache at the same time: the cache holds one entry per case, as much disk as one run alone uses."""
    monkeypatch.delenv(CACHE_ENV, raising=False)
    sweep = tmp_path / "sweep"
    (sweep / "runs").mkdir(parents=True)
    (sweep / "sweep.db").touch()
    copies = [tmp_path / f"copy{i}" for i in range(2)]
    for copy in copies:
        shutil.copytree(phantom_dir, copy)
    env = {**os.environ, "PYTHONPATH": str(REPO), CACHE_ENV: ""}
    fills = [subprocess.Popen([sys.executable, "-c", FILL, str(copy), str(sweep / "runs" / name)], env=env)
             for copy, name in zip(copies, ("a", "b"))]
    assert [p.wait(timeout=300) for p in fills] == [0, 0]
    alone = CaseCache(tmp_path / "alone")
    for case in cases_from_dir(phantom_dir):
        alone.get(case)
    n_cases = len(cases_from_dir(phantom_dir))
    shared = sweep / "cache"
    assert len(list(shared.glob("*.json"))) == n_cases
    assert not list(shared.glob(".*.tmp"))  # every write was published whole
    assert _disk(shared) == _disk(tmp_path / "alone")  # 1x, not one cache per run
    assert not (sweep / "runs" / "a" / "cache").exists()


def test_a_job_reads_the_cache_from_its_node_local_stage(tmp_path, phantom_dir, monkeypatch):
    """``$BRATS_UGRIP_STAGE_DIR``: entries are published to the shared cache, copied once to the stage and read
    there; a second job on another node copies without preprocessing again."""
    from brats_ugrip import preprocess
    from brats_ugrip.data import cases_from_dir
    from brats_ugrip.preprocess import CaseCache, case_stage_dir

    case = cases_from_dir(phantom_dir)[0]
    shared, node1, node2 = tmp_path / "shared", tmp_path / "node1", tmp_path / "node2"
    monkeypatch.setenv("BRATS_UGRIP_STAGE_DIR", str(node1))
    assert case_stage_dir() == node1
    first = CaseCache(shared, stage_dir=case_stage_dir()).get(case, mmap=True)
    names = sorted(p.name for p in shared.iterdir())
    assert len(names) == 4 and sorted(p.name for p in node1.iterdir()) == names  # published, then staged
    assert str(node1) in str(first.image.filename)  # memory-mapped from the stage, not the shared file system

    def no_preprocessing(*args, **kwargs):
        raise AssertionError("the entry was preprocessed again")

    monkeypatch.setattr(preprocess, "preprocess_case", no_preprocessing)
    second = CaseCache(shared, stage_dir=node2).get(case, mmap=True)
    assert sorted(p.name for p in node2.iterdir()) == names
    assert str(node2) in str(second.image.filename) and (second.image == first.image).all()
    assert (second.regions == first.regions).all()
    monkeypatch.delenv("BRATS_UGRIP_STAGE_DIR")
    assert case_stage_dir() is None
