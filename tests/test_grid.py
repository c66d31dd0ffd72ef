"""Grid files → runs: stable ids, zip groups, exclude rules, validation of every run, dry-run output, bad input."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import yaml

from brats_ugrip.errors import BratsUgripError, ConfigError
from brats_ugrip.sweeps import launch
from brats_ugrip.sweeps.executor import ExecutorSection, parse_time_min
from brats_ugrip.sweeps.grid import ExcludeWarning, ParameterManager
from brats_ugrip.sweeps.layout import sweep_db_path
from brats_ugrip.sweeps.run_ids import format_value, run_ids
from brats_ugrip.sweeps.state import RunState, SweepState


def _grid(fold_datalist, **extra):
    grid = {
        "name": "test",
        "base": {"data": {"datalist": fold_datalist, "roi_size": [32, 32, 32]},
                 "model": {"name": "segresnet", "init_filters": 8}, "trainer": {"max_epochs": 1}},
        "grid": {"optim.lr": [0.001, 0.0027], "data.fold": [0, 1]},
    }
    grid.update(extra)
    return grid


def _write(tmp_path, grid, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


# --- expansion and ids ------------------------------------------------------------------------------------


def test_grid_expands_all_combinations_with_readable_ids(fold_datalist):
    runs = ParameterManager(_grid(fold_datalist)).runs()
    assert [r.run_id for r in runs] == ["fold=0-lr=0.001", "fold=1-lr=0.001", "fold=0-lr=0.0027", "fold=1-lr=0.0027"]
    run = runs[2]
    assert run.params == {"optim.lr": 0.0027, "data.fold": 0}
    assert run.config.optim.lr == 0.0027 and run.config.data.fold == 0 and run.config.model.name == "segresnet"
    assert run.config_dict["data"]["datalist"] == os.path.abspath(fold_datalist)


def test_ids_are_stable_whatever_the_key_order(fold_datalist):
    a = ParameterManager(_grid(fold_datalist)).runs()
    b = ParameterManager(_grid(fold_datalist, grid={"data.fold": [1, 0], "optim.lr": [0.0027, 0.001]})).runs()
    assert sorted(r.run_id for r in a) == sorted(r.run_id for r in b)
    assert {r.run_id: r.params for r in a} == {r.run_id: r.params for r in b}


def test_id_formatting_and_ambiguous_keys():
    combos = [{"data.roi_size": [64, 64, 64], "inference.roi_size": [96, 96, 96], "finetune.init_from": "/a/fold0.ckpt",
               "trainer.compile": True, "optim.lr": 1e-4}]
    (run_id,) = run_ids(combos)
    assert run_id == ("compile=true-data.roi_size=64x64x64-inference.roi_size=96x96x96-init_from=fold0-lr=0.0001")
    # two paths with the same stem are told apart by their whole path
    ids = run_ids([{"finetune.init_from": "/a/best.ckpt"}, {"finetune.init_from": "/b/best.ckpt"}])
    assert ids[0] != ids[1] and "a_best.ckpt" in ids[0]
    assert format_value("mednext b/x") == "x" and format_value(None) == "none"
    assert len(run_ids([{"model.name": "x" * 400}])[0]) <= 150


def test_zip_groups_vary_together(fold_datalist):
    grid = _grid(fold_datalist, grid={"data.fold": [0, 1]},
                 zip=[{"model.name": ["segresnet", "mednext_s"], "data.batch_size": [4, 2]}])
    runs = ParameterManager(grid).runs()
    assert len(runs) == 4
    assert {(r.config.model.name, r.config.data.batch_size) for r in runs} == {("segresnet", 4), ("mednext_s", 2)}
    assert "batch_size=2-fold=0-name=mednext_s" in [r.run_id for r in runs]


def test_exclude_rules_remove_combinations(fold_datalist):
    runs = ParameterManager(_grid(fold_datalist, exclude=[{"optim.lr": 0.0027, "data.fold": 1}])).runs()
    assert [r.run_id for r in runs] == ["fold=0-lr=0.001", "fold=1-lr=0.001", "fold=0-lr=0.0027"]


def test_exclude_rule_matching_nothing_warns(fold_datalist):
    manager = ParameterManager(_grid(fold_datalist, exclude=[{"optim.lr": 0.5}]))
    with pytest.warns(ExcludeWarning, match=r"exclude\[0\].*matches no combination"):
        runs = manager.runs()
    assert len(runs) == 4 and "exclude[0]" in manager.warnings[0]


def test_seeds_and_repeat(fold_datalist):
    runs = ParameterManager(_grid(fold_datalist, grid={"data.fold": [0]}, seeds=[3, 4])).runs()
    assert [(r.run_id, r.config.trainer.seed) for r in runs] == [("fold=0-seed=3", 3), ("fold=0-seed=4", 4)]
    assert len(ParameterManager(_grid(fold_datalist, repeat=3)).runs()) == 12


def test_exponent_without_dot_is_a_number(tmp_path, fold_datalist):
    path = tmp_path / "grid.yaml"
    path.write_text(f"base: {{data: {{datalist: {fold_datalist}, roi_size: [32, 32, 32]}}, model: {{name: segresnet}}}}\n"
                    "grid: {optim.lr: [1e-3, 3E-4]}\n")
    runs = ParameterManager.from_file(path).runs()
    assert [r.config.optim.lr for r in runs] == [1e-3, 3e-4]
    assert [r.run_id for r in runs] == ["lr=0.001", "lr=0.0003"]


def test_executor_keys_in_the_grid_make_separate_arrays(tmp_path, fold_datalist):
    grid = _grid(fold_datalist, executor={"cluster": "slurm", "partition": "debug", "time": "00:30:00"})
    grid["grid"]["executor.cpus_per_task"] = [1, 2]
    plan = launch.plan_launch(_write(tmp_path, grid), tmp_path / "sweep")
    groups = plan.groups()
    assert len(plan.runs) == 8 and [len(g.runs) for g in groups] == [4, 4]
    assert {g.spec.parameters["cpus_per_task"] for g in groups} == {1, 2}
    assert all(g.spec.parameters["partition"] == "debug" and g.spec.parameters["time"] == 30 for g in groups)


# --- executor section ---------------------------------------------------------------------------------------


def test_executor_section_to_submitit_parameters():
    section = ExecutorSection.from_dict({
        "cluster": "slurm", "partition": "gpu", "account": "brats", "qos": "high", "constraint": "a100",
        "gpus_per_node": 2, "cpus_per_task": 8, "mem_gb": 64, "time": "1-02:00:00", "array_parallelism": 16,
        "max_num_timeout": 5, "sbatch_args": {"mail-type": "END"}, "setup": ["module load cuda"]})
    spec = section.submit_spec("sweep")
    assert spec.max_num_timeout == 5
    assert spec.parameters == {
        "job_name": "sweep", "time": 26 * 60, "nodes": 1, "ntasks_per_node": 2, "signal_delay_s": 120,
        "partition": "gpu", "account": "brats", "qos": "high", "constraint": "a100", "cpus_per_task": 8,
        "array_parallelism": 16, "mem": "64GB", "gpus_per_node": 2,
        "additional_parameters": {"mail-type": "END"}, "setup": ["module load cuda"]}
    script = spec.sbatch_script("/s/jobs/%j", array_size=40)
    for line in ("#SBATCH --array=0-39%16", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --ntasks-per-node=2", "#SBATCH --time=1560", "#SBATCH --signal=USR2@120",
                 "#SBATCH --mail-type=END", "module load cuda"):
        assert line in script
    local = ExecutorSection.from_dict({"cluster": "local", "array_parallelism": 2}).submit_spec("x")
    assert local.cluster == "local" and local.local_slots == 2 and local.parameters["timeout_min"] > 60
    # CPU DDP: several tasks without GPUs; a local job is one task (Lightning starts a process per GPU itself)
    cpu_ddp = ExecutorSection.from_dict({"cluster": "slurm", "tasks_per_node": 2}).submit_spec("x")
    assert cpu_ddp.parameters["ntasks_per_node"] == 2 and "gpus_per_node" not in cpu_ddp.parameters
    local_gpus = ExecutorSection.from_dict({"cluster": "local", "gpus_per_node": 2}).submit_spec("x")
    assert local_gpus.parameters["tasks_per_node"] == 1 and local_gpus.parameters["gpus_per_node"] == 2


@pytest.mark.parametrize("raw, key", [
    ({"cluster": "kubernetes"}, "executor.cluster"),
    ({"cluster": "slurm", "partiton": "gpu"}, "executor.partiton"),
    ({"time": "tomorrow"}, "executor.time"),
    ({"gpus_per_node": -1}, "executor.gpus_per_node"),
    ({"mem_gb": "lots"}, "executor.mem_gb"),
    ({"setup": [1, 2]}, "executor.setup"),
    ({"cluster": "slurm", "gpus_per_node": 2, "tasks_per_node": 1}, "executor.tasks_per_node"),
    ({"cluster": "local", "tasks_per_node": 2}, "executor.tasks_per_node"),
])
def test_executor_bad_values_name_their_key(raw, key):
    with pytest.raises(ConfigError) as error:
        ExecutorSection.from_dict(raw)
    assert error.value.key_path == key


def test_time_formats():
    assert [parse_time_min(v) for v in (90, "01:30:00", "1:30", "2-00:00:00", "00:00:30")] == [90, 90, 90, 2880, 1]


# --- bad input: each a clear error before anything is submitted ---------------------------------------------


def _error(grid) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        ParameterManager(grid, source="grid.yaml").runs()
    return error.value


def test_unknown_config_key_names_run_and_key(fold_datalist):
    error = _error(_grid(fold_datalist, grid={"optim.lrr": [0.1]}))
    assert error.key_path == "optim.lrr" and "unknown key" in str(error) and "(in run lrr=0.1)" in str(error)
    assert str(error).startswith("grid.yaml: optim.lrr:")


def test_unknown_top_level_key(fold_datalist):
    assert _error(_grid(fold_datalist, gird={})).key_path == "gird"


def test_empty_list(fold_datalist):
    error = _error(_grid(fold_datalist, grid={"optim.lr": []}))
    assert error.key_path == "grid.optim.lr" and "empty list" in str(error)


def test_non_list_grid_value(fold_datalist):
    error = _error(_grid(fold_datalist, grid={"optim.lr": 0.1}))
    assert error.key_path == "grid.optim.lr" and "expected a list" in str(error)


def test_zip_groups_of_unequal_length(fold_datalist):
    error = _error(_grid(fold_datalist, zip=[{"model.name": ["segresnet", "unet"], "data.batch_size": [1, 2, 3]}]))
    assert error.key_path == "zip[0]" and "model.name: 2, data.batch_size: 3" in str(error)


def test_key_varied_twice(fold_datalist):
    error = _error(_grid(fold_datalist, zip=[{"optim.lr": [0.1]}]))
    assert "varied twice" in str(error)


def test_duplicate_run_ids(fold_datalist):
    error = _error(_grid(fold_datalist, grid={"optim.lr": [0.001, 0.001]}))
    assert "same run id 'lr=0.001'" in str(error)


def test_one_bad_value_in_one_combination_fails_everything(fold_datalist):
    error = _error(_grid(fold_datalist, grid={"optim.lr": [0.001, -1.0], "data.fold": [0, 1]}))
    assert error.key_path == "optim.lr" and "(in run fold=0-lr=-1.0)" in str(error)


def test_missing_datalist(fold_datalist, tmp_path):
    grid = _grid(fold_datalist)
    grid["base"]["data"]["datalist"] = str(tmp_path / "nope.json")
    error = _error(grid)
    assert error.key_path == "data.datalist" and "datalist not found" in str(error)


def test_fold_that_does_not_exist(fold_datalist):
    error = _error(_grid(fold_datalist, grid={"data.fold": [0, 7]}))
    assert error.key_path == "data.fold" and "fold 7 is not in" in str(error) and "(in run fold=7)" in str(error)
    assert "[0, 1, 2]" in str(error)


def test_exclude_on_a_key_not_varied(fold_datalist):
    with pytest.raises(ConfigError, match=r"exclude\[0\]\.model\.name: not a varied key"):
        ParameterManager(_grid(fold_datalist, exclude=[{"model.name": "unet"}]))


def test_exclude_removing_everything(fold_datalist):
    with pytest.raises(ConfigError, match="remove every combination"):
        ParameterManager(_grid(fold_datalist, grid={"optim.lr": [0.1]}, exclude=[{"optim.lr": 0.1}])).runs()


def test_missing_grid_file(tmp_path):
    with pytest.raises(ConfigError, match="grid file not found"):
        ParameterManager.from_file(tmp_path / "none.yaml")


def test_unwritable_sweep_directory(tmp_path, fold_datalist):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    plan = launch.plan_launch(_write(tmp_path, _grid(fold_datalist)), blocker / "sweep")
    with pytest.raises(BratsUgripError, match="cannot write the sweep directory.*--sweep-dir"):
        launch.submit_plan(plan)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_read_only_sweep_directory(tmp_path, fold_datalist):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    plan = launch.plan_launch(_write(tmp_path, _grid(fold_datalist)), read_only)
    with pytest.raises(BratsUgripError, match="cannot write the sweep directory"):
        launch.submit_plan(plan)


def test_cli_exits_2_with_the_message(tmp_path, fold_datalist, capsys):
    path = _write(tmp_path, _grid(fold_datalist, grid={"data.fold": [9]}))
    with pytest.raises(SystemExit) as exit_:
        from brats_ugrip.cli import run
        run(launch.main, [str(path), "--sweep-dir", str(tmp_path / "s")])
    assert exit_.value.code == 2
    assert "fold 9 is not in" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# --- dry run ----------------------------------------------------------------------------------------------


def test_dry_run_prints_runs_and_sbatch_parameters_and_writes_nothing(tmp_path, fold_datalist, capsys):
    grid = _grid(fold_datalist, executor={"cluster": "slurm", "partition": "gpu", "gpus_per_node": 1,
                                      "array_parallelism": 2, "time": 120})
    path = _write(tmp_path, grid)
    sweep = tmp_path / "sweep"
    assert launch.main([str(path), "--sweep-dir", str(sweep), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for text in ("fold=0-lr=0.001", "fold=1-lr=0.0027", "4 runs", "array 1", "4 runs, slurm executor",
                 "#SBATCH --array=0-3%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=120"):
        assert text in out, text
    assert out.count(" new ") >= 4
    assert not sweep.exists()


def test_dry_run_shows_what_is_already_in_the_sweep(tmp_path, fold_datalist, capsys):
    path = _write(tmp_path, _grid(fold_datalist))
    sweep = tmp_path / "sweep"
    plan = launch.plan_launch(path, sweep)
    with SweepState(sweep_db_path(sweep)) as state:
        state.add_runs(plan.runs[:2])
        state.record_submission(plan.runs[0].run_id, "55")
        state.update_run(plan.runs[0].run_id, state=RunState.COMPLETED)
    replanned = launch.plan_launch(path, sweep)
    assert [r.run_id for r in replanned.to_submit] == [r.run_id for r in plan.runs[1:]]
    launch.main([str(path), "--sweep-dir", str(sweep), "--dry-run"])
    out = capsys.readouterr().out
    assert "COMPLETED" in out and "PENDING" in out and "3 runs, local executor" in out


def test_unknown_executor_key_in_grid_file_fails_before_expansion(fold_datalist):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError, match="executor.partion: unknown key"):
            ParameterManager(_grid(fold_datalist, executor={"cluster": "slurm", "partion": "gpu"}))


# --- the grids shipped in experiments/ ----------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, runs, arrays", [("grid_demo_cpu", 3, 1), ("grid_ssa_lr_folds", 25, 1),
                                                ("grid_finetune", 20, 1)])
def test_shipped_grids_expand_and_validate(name, runs, arrays, tmp_path, monkeypatch):
    """Each grid in experiments/ validates (its data swapped for a 5-fold fold_datalist) and fills one array."""
    entries = [{"case_id": f"c{i}", "fold": i % 5, "image": [f"c{i}/{m}.nii.gz" for m in "abcd"],
                "label": f"c{i}/seg.nii.gz"} for i in range(10)]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries}))
    (tmp_path / "init.ckpt").write_bytes(b"")
    monkeypatch.chdir(REPO)  # base configs are paths relative to the repository root
    grid = yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text())
    overrides = {"data.datalist": str(tmp_path / "datalist.json")}
    if "finetune.init_from" in grid.get("set", {}):
        overrides["finetune.init_from"] = str(tmp_path / "init.ckpt")
    grid["set"] = {**grid.get("set", {}), **overrides}
    plan_runs = ParameterManager(grid, source=name).runs()
    assert len(plan_runs) == runs and len({r.run_id for r in plan_runs}) == runs
    assert len({r.executor.submit_spec(name).key for r in plan_runs}) == arrays


def test_missing_finetune_checkpoint(fold_datalist, tmp_path):
    grid = _grid(fold_datalist, grid={"finetune.init_from": [str(tmp_path / "gone.ckpt")]})
    error = _error(grid)
    assert error.key_path == "finetune.init_from" and "not found" in str(error)
