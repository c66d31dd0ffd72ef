"""Bad input and faults (issue 17): nothing non-finite passes silently, and every fault is one line naming the file
and the cause, exit code 2, with nothing partial left behind.

Covered: NaN/inf voxels (check_case, check_data, preprocessing, the training cache, infer), NaN/inf config numbers,
a run that diverges (loss, weights), checkpoints with non-finite weights (every loader, soup ingredients, MLCube
build), make_datalist's skipped folders, check_data's folds, ``train --check`` reading the datalist, ``infer --out``
on a file, a full disk for every atomic writer (uniform soup, label map, infer), and grid/config/spec YAML that is
invalid or holds a ``!!python`` tag.
"""
from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from brats_ugrip import atomic
from brats_ugrip.checkpoints import load_checkpoint, load_model, save_model_checkpoint
from brats_ugrip.cli import run
from brats_ugrip.config import config_from_dict, load_config
from brats_ugrip.data import Case, Datalist, check_case, make_datalist, save_datalist
from brats_ugrip.errors import CheckpointError, ConfigError, DataError, DiskFullError, TrainingDivergedError
from brats_ugrip.io import read_volume, write_label_map, write_volume
from brats_ugrip.models import create_model, resolve_kwargs
from brats_ugrip.preprocess import CaseCache, preprocess_case

REPO = Path(__file__).resolve().parents[1]
NAN_VOXELS = 1000
CASE = "BraTS-PHA-00000-000"


@pytest.fixture(autouse=True)
def _unwrapped_messages(monkeypatch):
    """Rich wraps messages at the terminal width (80 without a terminal); these tests read them whole."""
    monkeypatch.setenv("COLUMNS", "1000")


def _cli(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m module args``; messages unwrapped (rich wraps at the terminal width, 80 in a pipe)."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "1000"})


def _run_main(main, argv, capsys) -> tuple[int, str]:
    """``cli.run(main, argv)`` in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exited:
        run(main, [str(a) for a in argv])
    return exited.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def bad_voxels(phantom_dir, tmp_path_factory):
    """``(data, datalist)``: a copy of the phantoms whose first case has 1000 NaN t1c voxels (stored as float32)
    and 10 +inf t2w voxels; the datalist has 3 folds."""
    data = tmp_path_factory.mktemp("nan") / "data"
    shutil.copytree(phantom_dir, data)
    case = sorted(p for p in data.iterdir() if p.is_dir())[0]
    for modality, value, count in (("t1c", np.nan, NAN_VOXELS), ("t2w", np.inf, 10)):
        path = case / f"{case.name}-{modality}.nii.gz"
        image, affine = read_volume(path)
        flat = image.reshape(-1).copy()
        flat[np.flatnonzero(flat)[:count]] = value  # inside the brain: a zero-filled voxel would look like background
        write_volume(path, flat.reshape(image.shape).astype(np.float32), affine)
    return data, save_datalist(make_datalist(data, 3, 0), data.parent / "datalist.json")


def _bad_case(bad_voxels) -> Case:
    loaded = Datalist.load(bad_voxels[1])
    return min(loaded.training + loaded.testing, key=lambda c: c.case_id)


def tiny_checkpoint(path: Path, poison: str | None = None) -> Path:
    """An untrained width-8 SegResNet with a run config (48³ windows); ``poison`` names a tensor set to NaN."""
    config = config_from_dict({"data": {"datalist": "unused.json", "roi_size": [48, 48, 48]},
                               "model": {"name": "segresnet", "init_filters": 8},
                               "inference": {"overlap": 0.25, "sw_batch_size": 1}}).to_dict()
    torch.manual_seed(0)
    state = create_model("segresnet", init_filters=8).state_dict()
    if poison:
        state[poison] = state[poison].clone()
        state[poison].view(-1)[:3] = float("nan")
    model = {"name": "segresnet", "kwargs": resolve_kwargs("segresnet", init_filters=8)}
    return save_model_checkpoint(path, state, {"model": model, "config": config, "fold": 0, "init_id": "tiny",
                                               "weights": "averaged"})


# --- NaN/inf voxels ------------------------------------------------------------------------------------------


def test_check_case_reports_nonfinite_voxels_per_modality(bad_voxels):
    report = check_case(_bad_case(bad_voxels), "brats2023")
    by_modality = {p.split(":")[0]: p for p in report.problems}
    assert set(by_modality) == {"t1c", "t2w"}, report.problems
    assert f"{NAN_VOXELS} of {48 ** 3} voxels are NaN or infinite" in by_modality["t1c"]
    assert f"10 of {48 ** 3} voxels" in by_modality["t2w"] and "-t2w.nii.gz" in by_modality["t2w"]


def test_check_data_names_the_case_and_modality_and_exits_1(bad_voxels):
    result = _cli("brats_ugrip.tools.check_data", bad_voxels[1])
    assert result.returncode == 1, result.stderr
    assert "1 of 6 cases have problems" in result.stderr and "all 6 cases OK" not in result.stderr
    case = _bad_case(bad_voxels)
    assert f"{NAN_VOXELS} of {48 ** 3} voxels are NaN or infinite" in result.stderr
    assert f"{case.case_id}" in result.stderr and f"{case.case_id}-t1c.nii.gz" in result.stderr


def test_preprocessing_and_the_training_cache_refuse_the_case_by_name(bad_voxels, tmp_path):
    case = _bad_case(bad_voxels)
    with pytest.raises(DataError) as refused:
        preprocess_case(case.images, case.label, case_id=case.case_id)
    message = str(refused.value)
    assert message.startswith(f"{case.case_id} t1c: {case.images[0]}: {NAN_VOXELS} of ")
    with pytest.raises(DataError, match=f"{case.case_id} t1c: .*{NAN_VOXELS} of"):
        CaseCache(tmp_path / "cache").get(case)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing cached


def test_infer_refuses_a_case_with_nan_voxels_instead_of_an_empty_map(bad_voxels, tmp_path, capsys):
    from brats_ugrip.infer import main

    case = _bad_case(bad_voxels)
    code, err = _run_main(main, ["--ckpt", tiny_checkpoint(tmp_path / "m.ckpt"), "--input", case.images[0].parent,
                                 "--out", tmp_path / "preds", "--device", "cpu"], capsys)
    assert code == 2 and f"{case.case_id} t1c" in err and str(NAN_VOXELS) in err and "Traceback" not in err
    assert not list((tmp_path / "preds").glob("*.nii.gz"))


class _BadCases(torch.utils.data.Dataset):
    def __init__(self, case: Case):
        self.case = case

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        return preprocess_case(self.case.images, case_id=self.case.case_id).image


def test_a_case_refused_in_a_loader_worker_is_still_one_line(bad_voxels, capsys):
    case = _bad_case(bad_voxels)

    def main(argv):
        next(iter(torch.utils.data.DataLoader(_BadCases(case), num_workers=1)))

    code, err = _run_main(main, [], capsys)
    assert code == 2 and "Traceback" not in err and "worker" not in err
    assert err.strip() == f"error: {case.case_id} t1c: {case.images[0]}: {NAN_VOXELS} of {48 ** 3} voxels are NaN or " \
                          "infinite; fix or re-export the image (a network given them predicts nothing, and " \
                          "zero-filling them silently would hide a broken file)"


# --- non-finite numbers in configs -------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [("optim.lr", ".nan"), ("optim.lr", ".inf"), ("loss.smooth", "-.inf"),
                                        ("trainer.limit_train_batches", ".inf"), ("inference.threshold", ".nan"),
                                        ("optim.betas", "[0.9, .nan]")])
def test_config_rejects_nonfinite_numbers_naming_the_key(tmp_path, key, value):
    path = tmp_path / "run.yaml"
    section, name = key.split(".")
    path.write_text(f"data: {{datalist: d.json, roi_size: [32, 32, 32]}}\nmodel: {{name: segresnet}}\n"
                    f"{section}: {{{name}: {value}}}\n")
    with pytest.raises(ConfigError, match=r"finite number") as info:
        load_config(path)
    assert info.value.key_path.startswith(key) and str(path) in str(info.value)
    with pytest.raises(ConfigError, match=r"finite number"):  # --set values are YAML too, "nan" text as well
        load_config(base={"data": {"datalist": "d.json"}}, overrides=[f"{key}={value}"])


def test_override_text_nan_is_rejected():
    with pytest.raises(ConfigError, match="optim.lr: must be a finite number"):
        load_config(base={"data": {"datalist": "d.json"}}, overrides={"optim.lr": "nan"})


# --- a run that diverges -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_workspace(phantom_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("diverge")
    return root, save_datalist(make_datalist(phantom_dir, 3, 0), root / "datalist.json")


def _tiny_run(train_workspace, name: str, max_epochs: int = 2):
    root, datalist = train_workspace
    config = load_config(base={
        "data": {"datalist": str(datalist), "roi_size": [32, 32, 32], "batch_size": 1, "cache_dir": str(root / "cache")},
        "model": {"name": "segresnet", "init_filters": 8}, "optim": {"name": "adamw_sf", "lr": 0.003},
        "trainer": {"max_epochs": max_epochs, "accelerator": "cpu", "limit_train_batches": 1, "limit_val_batches": 1,
                    "log_every_n_steps": 1, "cudnn_benchmark": False},
        "inference": {"roi_size": [48, 48, 48], "sw_batch_size": 1}, "logging": {"mode": "disabled"}})
    return config, root / name


def test_a_run_whose_loss_becomes_nan_fails_at_that_step_and_keeps_a_finite_best(train_workspace, monkeypatch):
    from brats_ugrip.losses import SegmentationLoss
    from brats_ugrip.training import read_progress, train

    calls = []
    forward = SegmentationLoss.forward

    def nan_from_step_2(self, *args, **kwargs):
        calls.append(1)
        loss = forward(self, *args, **kwargs)
        return loss * float("nan") if len(calls) >= 2 else loss

    monkeypatch.setattr(SegmentationLoss, "forward", nan_from_step_2)
    config, run_dir = _tiny_run(train_workspace, "nan_loss")
    with pytest.raises(TrainingDivergedError, match=r"^diverged at epoch 2, step 2: the training loss is nan"):
        train(config, run_dir)  # one step an epoch: epoch 1 is finite, the first step of epoch 2 is not
    progress = read_progress(run_dir)
    assert progress["status"] == "failed" and progress["error"].startswith("diverged at epoch 2, step 2")
    for name in ("best.ckpt", "last.ckpt"):  # written at epoch 1, before the divergence; loading checks finiteness
        assert load_checkpoint(run_dir / "checkpoints" / name)["brats_ugrip"]["epoch"] == 1


def test_weights_that_become_nan_are_never_checkpointed(train_workspace):
    from pytorch_lightning.callbacks import Callback

    from brats_ugrip.training import read_progress, train

    class PoisonLastStep(Callback):
        """NaN into one weight after the epoch's only step: the loss never sees it, only the checkpoint would."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with torch.no_grad():
                    next(pl_module.parameters()).view(-1)[0] = float("nan")

    config, run_dir = _tiny_run(train_workspace, "nan_weights", max_epochs=1)
    with pytest.raises(TrainingDivergedError, match=r"^diverged at epoch 1, step 1: weight 'model\..*' holds"):
        train(config, run_dir, callbacks=[PoisonLastStep()])
    assert read_progress(run_dir)["status"] == "failed"
    assert not list((run_dir / "checkpoints").glob("*.ckpt"))  # no best.ckpt of NaN weights, no last.ckpt either


# --- checkpoints with non-finite weights ----------------------------------------------------------------------------


def test_every_loader_refuses_nonfinite_weights_naming_file_and_tensor(tmp_path):
    poisoned = tiny_checkpoint(tmp_path / "diverged.ckpt", poison="conv_final.2.conv.weight")
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=r"diverged\.ckpt: tensor 'conv_final\.2\.conv\.weight' holds 3 NaN"):
            load(poisoned)
    assert load_checkpoint(poisoned, mmap=True)["brats_ugrip"]["fold"] == 0  # metadata reads stay cheap


def test_soup_ingredients_skip_a_nonfinite_checkpoint_with_a_named_warning(tmp_path):
    from brats_ugrip.souping.ingredients import SoupWarning, load_ingredients

    tiny_checkpoint(tmp_path / "a.ckpt")
    tiny_checkpoint(tmp_path / "b.ckpt", poison="conv_final.2.conv.weight")
    with pytest.warns(SoupWarning, match=r"skipping .*b\.ckpt: .*NaN or infinite"):
        ingredients = load_ingredients(tmp_path)
    assert [i.name for i in ingredients] == ["a.ckpt"] and [p.name for p, _ in ingredients.skipped] == ["b.ckpt"]


def test_uniform_soup_cli_leaves_the_nan_ingredient_out(tmp_path, capsys):
    from brats_ugrip.souping.uniform import main

    folder = tmp_path / "models"
    tiny_checkpoint(folder / "a.ckpt")
    tiny_checkpoint(folder / "b.ckpt", poison="conv_final.2.conv.weight")
    code, err = _run_main(main, ["--ckpts", folder, "--out", tmp_path / "soup.ckpt", "--no-score"], capsys)
    assert code == 0 and "b.ckpt" in err
    assert load_checkpoint(tmp_path / "soup.ckpt")["brats_ugrip"]["soup"]["kept"] == 1


def test_mlcube_build_refuses_nonfinite_weights(tmp_path):
    from brats_ugrip.mlcube.build import build_package

    poisoned = tiny_checkpoint(tmp_path / "diverged.ckpt", poison="conv_final.2.conv.weight")
    with pytest.raises(CheckpointError, match=r"diverged\.ckpt: tensor 'conv_final\.2\.conv\.weight'"):
        build_package(poisoned, "brats2024-ssa", tmp_path / "build", accelerator_count=0)
    assert not (tmp_path / "build").exists() and not list(tmp_path.glob(".build*"))


# --- make_datalist, check_data folds, train --check ---------------------------------------------------------------


def test_make_datalist_names_an_incomplete_case_and_stops(phantom_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    (data / CASE / f"{CASE}-t2f.nii.gz").unlink()
    (data / "notes").mkdir()
    out = tmp_path / "datalist.json"
    stopped = _cli("brats_ugrip.tools.make_datalist", data, "--folds", 2, "--out", out)
    assert stopped.returncode == 2 and not out.exists(), stopped.stderr
    assert f"skipped {data / CASE}: incomplete case: missing {CASE}-t2f.nii.gz" in stopped.stderr
    assert f"skipped {data / 'notes'}: no .nii.gz files" in stopped.stderr
    assert "--skip-incomplete" in stopped.stderr and "Traceback" not in stopped.stderr
    skipped = _cli("brats_ugrip.tools.make_datalist", data, "--folds", 2, "--out", out, "--skip-incomplete")
    assert skipped.returncode == 0, skipped.stderr
    assert f"incomplete case: missing {CASE}-t2f.nii.gz" in skipped.stderr
    assert len(json.loads(out.read_text())["training"]) == 5


def test_check_data_rejects_a_fold_outside_the_declared_folds(phantom_dir, tmp_path):
    datalist = make_datalist(phantom_dir, 3, 0)
    datalist["training"][0]["fold"] = 9
    path = save_datalist(datalist, tmp_path / "datalist.json")
    assert "fold 9 is outside the datalist's 3 folds" in Datalist.load(path).fold_problems()[0]
    result = _cli("brats_ugrip.tools.check_data", path)
    assert result.returncode == 1 and "fold 9" in result.stderr, result.stderr
    undeclared = {k: v for k, v in datalist.items() if k != "n_folds"}  # folds 0, 1, 2 and 9: a gap
    problems = Datalist.from_dict(undeclared, path=path).fold_problems()
    assert any("folds [3, 4, 5, 6, 7, 8] have no case" in p for p in problems), problems


def test_train_check_reads_the_datalist(phantom_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"datalist": "datalist.json", "roi_size": [32, 32, 32]},
                                      "model": {"name": "segresnet"}}))
    missing = _cli("brats_ugrip.train", config, "--check", cwd=tmp_path)
    assert missing.returncode == 2 and "datalist.json: datalist not found" in missing.stderr, missing.stderr
    save_datalist(make_datalist(phantom_dir, 2, 0), tmp_path / "datalist.json")
    absent = _cli("brats_ugrip.train", config, "--check", "--set", "data.fold=4", cwd=tmp_path)
    assert absent.returncode == 2 and "data.fold: fold 4 is not in" in absent.stderr, absent.stderr
    good = _cli("brats_ugrip.train", config, "--check", cwd=tmp_path)
    assert good.returncode == 0 and "Traceback" not in good.stderr, good.stderr


# --- clear errors: --out on a file, a full disk, bad YAML -----------------------------------------------------------


def test_infer_out_on_an_existing_file_is_a_one_line_error(tmp_path, capsys):
    from brats_ugrip.infer import main

    (tmp_path / "preds").write_text("keep me")
    code, err = _run_main(main, ["--ckpt", tmp_path / "absent.ckpt", "--input", tmp_path, "--out", tmp_path / "preds"],
                          capsys)
    assert code == 2 and "preds: --out names an existing file" in err and "Traceback" not in err
    assert (tmp_path / "preds").read_text() == "keep me"


class _FullDisk:
    """A file opened for writing on a disk that fills after ``room`` bytes: writes raise ``OSError(ENOSPC)``."""

    def __init__(self, real, room: int):
        self._real, self._room = real, room

    def write(self, data) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._real.write(data)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._real.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Files that ``brats_ugrip.atomic`` opens for writing hold 4 KiB at most."""
    def fake_open(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        return _FullDisk(handle, 4096) if "w" in mode else handle

    monkeypatch.setattr(atomic, "open", fake_open, raising=False)


def _left_over(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_every_atomic_writer_reports_a_full_disk_and_leaves_nothing(tmp_path, full_disk):
    with pytest.raises(DiskFullError, match=f"no space left on device while writing {tmp_path / 'big.json'}"):
        atomic.atomic_write_json(tmp_path / "big.json", list(range(5000)))
    state = {"w": torch.zeros(10_000)}
    with pytest.raises(DiskFullError, match="no space left on device while writing .*model.ckpt"):
        save_model_checkpoint(tmp_path / "model.ckpt", state, {"model": {"name": "unet", "kwargs": {}}})
    atomic.atomic_write_text(tmp_path / "small.txt", "fits")  # what fits is written
    assert _left_over(tmp_path) == ["small.txt"]


def test_uniform_soup_onto_a_full_disk_is_one_line_exit_2(tmp_path, request, capsys):
    from brats_ugrip.souping.uniform import main

    folder = tmp_path / "models"
    for name in ("a.ckpt", "b.ckpt"):
        tiny_checkpoint(folder / name)
    request.getfixturevalue("full_disk")  # the disk fills now
    code, err = _run_main(main, ["--ckpts", folder, "--out", tmp_path / "out" / "soup.ckpt", "--no-score"], capsys)
    assert code == 2 and "no space left on device while writing" in err and "soup.ckpt" in err
    assert "unexpected pos" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or _left_over(tmp_path / "out") == []


def test_label_map_onto_a_full_disk(phantom_dir, tmp_path, monkeypatch):
    def no_space(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gzip.GzipFile, "write", no_space)
    reference = phantom_dir / CASE / f"{CASE}-t1c.nii.gz"
    with pytest.raises(DiskFullError, match=f"no space left on device while writing {tmp_path / 'pred.nii.gz'}"):
        write_label_map(tmp_path / "pred.nii.gz", np.zeros((48, 48, 48), np.uint8), reference)
    assert _left_over(tmp_path) == []


def test_infer_onto_a_full_disk_is_one_line_exit_2(phantom_dir, tmp_path, monkeypatch, capsys):
    from brats_ugrip.infer import main

    checkpoint = tiny_checkpoint(tmp_path / "m.ckpt")
    monkeypatch.setattr(gzip.GzipFile, "write", lambda self, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    code, err = _run_main(main, ["--ckpt", checkpoint, "--input", phantom_dir / CASE, "--out", tmp_path / "preds",
                                 "--device", "cpu"], capsys)
    assert code == 2 and "no space left on device while writing" in err and f"{CASE}.nii.gz" in err
    assert _left_over(tmp_path / "preds") == []


@pytest.mark.parametrize("content, expected", [("data: {datalist: [unclosed\n", "not valid YAML"),
                                               ("data: !!python/object/apply:os.system [echo pwned]\n",
                                                "python/object/apply")])
def test_grid_base_with_bad_yaml_or_a_python_tag_is_a_config_error(tmp_path, content, expected):
    from brats_ugrip.sweeps.grid import ParameterManager

    base = tmp_path / "base.yaml"
    base.write_text(content)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": str(base), "grid": {"optim.lr": [0.001]}}))
    with pytest.raises(ConfigError, match=expected) as info:
        ParameterManager.from_file(grid)
    assert info.value.key_path == "base" and str(base) in str(info.value) and str(grid) in str(info.value)
    launched = _cli("brats_ugrip.sweeps.launch", grid, "--dry-run", cwd=tmp_path)
    assert launched.returncode == 2 and "Traceback" not in launched.stderr and expected in launched.stderr


@pytest.mark.parametrize("reader", ["config", "ensemble", "grid"])
def test_python_tags_are_refused_by_every_yaml_reader(tmp_path, reader):
    from brats_ugrip.ensembling.spec import EnsembleSpec
    from brats_ugrip.sweeps.grid import ParameterManager

    path = tmp_path / "file.yaml"
    marker = tmp_path / "pwned"
    path.write_text(f"models: !!python/object/apply:os.system ['touch {marker}']\n")
    read = {"config": load_config, "ensemble": EnsembleSpec.load, "grid": ParameterManager.from_file}[reader]
    with pytest.raises(ConfigError, match=f"{path}: <file>: not valid YAML .*python/object/apply:os.system"):
        read(path)
    assert not marker.exists()
