import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from brats_ugrip.config import RunConfig, config_from_dict, load_config, parse_override
from brats_ugrip.data import Datalist, make_datalist, save_datalist
from brats_ugrip.errors import ConfigError
from brats_ugrip.training import check_runtime
from brats_ugrip.training_cases import check_run_data

REPO = Path(__file__).resolve().parents[1]
BASE = {"data": {"datalist": "datalist.json", "roi_size": [32, 32, 32]}, "model": {"name": "segresnet"}}


def _config(**overrides):
    return load_config(base=BASE, overrides=overrides)


def _error(**overrides) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _config(**overrides)
    return info.value


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("train_*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert Path(config.data.datalist).is_absolute()


def test_realistic_ssa_config_matches_the_seed_recipe():
    config = load_config(REPO / "experiments" / "train_ssa_mednext_b.yaml")
    assert (config.model.name, config.model.kernel_size, config.model.deep_supervision) == ("mednext_b", 3, True)
    assert config.data.roi_size == (128, 160, 112) and config.data.batch_size == 2
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay) == ("adamw_sf", 0.0027, 0.0)
    assert config.trainer.max_epochs == 150 and config.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("overrides, key_path", [
    ({"optim.lrr": 0.1}, "optim.lrr"),
    ({"trainer.max_epochs": "ten"}, "trainer.max_epochs"),
    ({"trainer.max_epochs": True}, "trainer.max_epochs"),
    ({"data.roi_size": [32, 32]}, "data.roi_size"),
    ({"data.roi_size": [32, 32, 30]}, "data.roi_size"),          # SegResNet needs multiples of 8
    ({"model.name": "mednext_b", "data.roi_size": [48, 48, 40]}, "data.roi_size"),  # MedNeXt: multiples of 16
    ({"optim.lr": -1.0}, "optim.lr"),
    ({"optim.name": "adam"}, "optim.name"),
    ({"optim.scheduler": "poly"}, "optim.scheduler"),          # schedule-free takes no scheduler
    ({"trainer.precision": "bf16"}, "trainer.precision"),
    ({"trainer.accelerator": "cpu", "trainer.precision": "bf16-mixed"}, "trainer.precision"),
    ({"model.name": "resnet"}, "model.name"),
    ({"model.kernel_size": 5}, "model.kernel_size"),            # SegResNet has no kernel size setting
    ({"model.name": "mednext_s", "model.kernel_size": 4}, "model.kernel_size"),
    ({"model.init_filters": 12}, "model.init_filters"),         # group norm with 8 groups
    ({"inference.overlap": 1.0}, "inference.overlap"),
    ({"finetune.freeze.all_but_last": 0}, "finetune.freeze.all_but_last"),
    ({"finetune.upkern": True}, "finetune.upkern"),
    ({"data.datalist": ""}, "data.datalist"),
    ({"data.fold": -1}, "data.fold"),
])
def test_errors_name_the_key_path(overrides, key_path):
    error = _error(**overrides)
    assert error.key_path == key_path
    assert str(error).startswith(f"{key_path}: ")


def test_a_value_where_a_section_is_expected():
    with pytest.raises(ConfigError, match=r"^data: expected a mapping"):
        config_from_dict({"data": 3})


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "trainer": {"max_epoch": 3}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key_path == "trainer.max_epoch" and str(path) in str(info.value)


def test_overrides_are_yaml_values_and_resolve_defaults(tmp_path):
    assert parse_override("optim.lr=0.0003") == ("optim.lr", 3e-4)
    assert parse_override("data.roi_size=[64, 64, 64]") == ("data.roi_size", [64, 64, 64])
    assert parse_override("finetune.init_from=null") == ("finetune.init_from", None)
    config = load_config(base=BASE, overrides=["optim.lr=3e-4", "trainer.precision=32", "data.roi_size=[64,64,48]",
                                               "run_dir=runs/a"])
    assert config.optim.lr == 3e-4 and config.trainer.precision == "32" and config.data.roi_size == (64, 64, 48)
    assert config.run_dir == str(Path("runs/a").resolve())
    resolved = config.to_dict()
    assert resolved["data"]["roi_size"] == [64, 64, 48] and resolved["optim"]["betas"] == [0.9, 0.999]
    assert config_from_dict(resolved) == config  # the resolved dict is a complete, valid config
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("optim.lr")


def test_hash_ignores_run_dir_and_logging_only():
    a = _config()
    assert _config(**{"run_dir": "/elsewhere", "logging.mode": "disabled"}).hash() == a.hash()
    assert _config(**{"optim.lr": 0.01}).hash() != a.hash()
    assert len(a.hash()) == 12


def test_data_checks_fold_and_patch_size(phantom_dir, tmp_path):
    path = save_datalist(make_datalist(phantom_dir, 3, 0), tmp_path / "datalist.json")
    datalist = Datalist.load(path)
    config = load_config(base={**BASE, "data": {"datalist": str(path), "roi_size": [32, 32, 32]}})
    assert check_run_data(config, datalist)
    for overrides, key in (({"data.fold": 7}, "data.fold"), ({"data.roi_size": [64, 32, 32]}, "data.roi_size"),
                           ({"data.train_sources": ["synthetic"]}, "data.train_sources")):
        bad = load_config(base=config.to_dict(), overrides=overrides)
        with pytest.raises(ConfigError) as info:
            check_run_data(bad, datalist)
        assert info.value.key_path == key


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_gpu_precision_on_a_cpu_machine_is_a_config_error():
    with pytest.raises(ConfigError, match="trainer.precision: bf16-mixed needs a GPU"):
        check_runtime(_config(**{"trainer.precision": "bf16-mixed"}))


def test_train_cli_reports_bad_config_with_exit_code_2(tmp_path, phantom_dir):
    save_datalist(make_datalist(phantom_dir, 2, 0), tmp_path / "datalist.json")  # --check reads it
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "optim": {"name": "adamw_sf", "scheduler": "cosine"}}))
    result = subprocess.run([sys.executable, "-m", "brats_ugrip.train", str(path), "--set", "optim.lr=0.01"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "optim.scheduler" in result.stderr and "Traceback" not in result.stderr
    check = subprocess.run([sys.executable, "-m", "brats_ugrip.train", str(path), "--check", "--set", "optim.scheduler=none",
                            "--set", "optim.lr=0.01"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert yaml.safe_load(check.stdout)["optim"]["lr"] == 0.01 and "# config hash" in check.stdout
