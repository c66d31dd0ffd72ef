"""MedPerf packaging: the schema of mlcube.yaml / container_config.yaml, the build, the packaged runtime and the local
compatibility check (the infer task in a sandboxed subprocess, outputs checked and scored)."""
import copy
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from brats_ugrip.checkpoints import save_model_checkpoint
from brats_ugrip.config import config_from_dict
from brats_ugrip.ensembling.predict import Ensemble
from brats_ugrip.ensembling.spec import EnsembleSpec
from brats_ugrip.errors import CheckpointError, ConfigError
from brats_ugrip.labels import get_scheme
from brats_ugrip.mlcube import build, check, runtime
from brats_ugrip.mlcube.build import build_package
from brats_ugrip.mlcube.schema import PackageLayout, container_config_problems, mlcube_yaml_problems, validate_package
from brats_ugrip.models import create_model, resolve_kwargs
from brats_ugrip.synthetic.phantom import write_phantoms

REPO = Path(__file__).resolve().parents[1]
MISSING_T2W = "BraTS-SSA-00000-000"


def tiny_checkpoint(path: Path, seed: int, **meta) -> Path:
    """An untrained SegResNet (init_filters 8) with a run config: 48³ windows, so one window covers a phantom's
    brain crop (CPU time)."""
    config = config_from_dict({"data": {"datalist": "unused.json", "roi_size": [48, 48, 48]},
                               "model": {"name": "segresnet", "init_filters": 8},
                               "inference": {"overlap": 0.25, "sw_batch_size": 2, "threshold": 0.4}}).to_dict()
    torch.manual_seed(seed)
    network = create_model("segresnet", init_filters=8)
    model = {"name": "segresnet", "kwargs": resolve_kwargs("segresnet", init_filters=8)}
    return save_model_checkpoint(path, network.state_dict(), {"model": model, "config": config, "fold": 0,
                                                              "init_id": "tiny", "weights": "averaged", **meta})


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """``(data, references)``: three BraTS-SSA-named 48³ phantoms; in ``data`` without segmentations and with the
    t2w of the first case missing."""
    root = tmp_path_factory.mktemp("ssa")
    write_phantoms(root / "references", n_cases=3, size=48, seed=1, prefix="BraTS-SSA")
    data = root / "data"
    for case in sorted((root / "references").iterdir()):
        (data / case.name).mkdir(parents=True)
        for image in case.glob(f"{case.name}-t*.nii.gz"):
            shutil.copy2(image, data / case.name / image.name)
    (data / MISSING_T2W / f"{MISSING_T2W}-t2w.nii.gz").unlink()
    return data, root / "references"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A package built from a soup-like checkpoint (model-only, with ``soup`` metadata)."""
    root = tmp_path_factory.mktemp("package")
    soup = tiny_checkpoint(root / "soup.ckpt", 0, soup={"method": "uniform", "kept": 2,
                                                        "ingredients": [{"path": "/cluster/a.ckpt"}] * 2})
    return build_package(soup, "brats2024-ssa", root / "build", accelerator_count=0)


@pytest.fixture(scope="module")
def checked(package, cases, tmp_path_factory):
    """The compatibility check of the package on the phantoms, its work folder kept."""
    data, references = cases
    work = tmp_path_factory.mktemp("check")
    return check.check_package(package.root, data, references, timeout=600, keep=work), work


def test_portable_config_keeps_run_paths_relative_to_the_sweep():
    config = {"run_dir": "/cluster/u/alice/sweeps/ssa/runs/fold=0-lr=0.001", "optim": {"lr": 0.001},
              "data": {"datalist": "/cluster/u/alice/data/ssa.json", "data_root": None, "cache_dir": "/scratch1/c"},
              "finetune": {"init_from": "/cluster/u/alice/base/best.ckpt"}}
    portable = build.portable_config(config)
    assert portable == {"run_dir": "runs/fold=0-lr=0.001", "optim": {"lr": 0.001},
                        "data": {"datalist": "ssa.json", "data_root": None, "cache_dir": "c"},
                        "finetune": {"init_from": "best.ckpt"}}
    assert config["data"]["datalist"] == "/cluster/u/alice/data/ssa.json"  # the checkpoint's own meta is untouched


# --- schema -------------------------------------------------------------------------------------------------------


def test_built_package_layout_and_descriptions_validate(package):
    assert validate_package(package.root) == []
    weights = sorted(p.name for p in package.additional_files.iterdir())
    assert weights == ["model-0.json", "model-0.safetensors"]
    sidecar = yaml.safe_load((package.additional_files / "model-0.json").read_text())
    assert sidecar["meta"]["soup"] == {"method": "uniform", "kept": 2, "score": None, "ingredients": 2}
    config = sidecar["meta"]["config"]  # no path of the training machine travels in a MedPerf upload
    assert config["data"]["datalist"] == "unused.json" and str(package.root.parent) not in json.dumps(sidecar)
    parameters = yaml.safe_load(package.parameters.read_text())
    assert parameters["challenge"] == "brats2024-ssa" and parameters["label_scheme"] == "brats2023"
    assert parameters["thresholds"] == {"TC": 0.4, "WT": 0.4, "ET": 0.4}  # the checkpoint's threshold
    assert parameters["models"][0]["inference"]["roi_size"] == [48, 48, 48]
    project = package.project
    assert {"Dockerfile", "requirements.txt", "mlcube.py", "runtime.py"} <= {p.name for p in project.iterdir()}
    copied = {p.name for p in (project / "brats_ugrip").iterdir()}
    assert {"postprocess.py", "inference.py", "preprocess.py", "models.py", "ensembling"} <= copied
    # the ensemble lives in the checkout's ensembling/ folder: found by import, copied under brats_ugrip/
    assert {"__init__.py", "spec.py", "predict.py"} <= {p.name for p in (project / "brats_ugrip" / "ensembling").iterdir()}
    assert not (project / "brats_ugrip" / "ensembling" / "fit.py").exists()
    assert not {"training.py", "train.py"} & copied and not (project / "brats_ugrip" / "metrics").exists()
    pins = (project / "requirements.txt").read_text().split()
    assert all("==" in pin for pin in pins) and {"monai", "torch", "safetensors", "typer"} <= {
        pin.split("==")[0] for pin in pins}
    dockerfile = (project / "Dockerfile").read_text()
    assert "USER 1000" in dockerfile and 'ENTRYPOINT ["python3", "/mlcube_project/mlcube.py"]' in dockerfile


def _mutated(document, change):
    document = copy.deepcopy(document)
    change(document)
    return document


MLCUBE_MUTATIONS = {
    "docker.imagee: unknown key": lambda d: d["docker"].update(imagee="x"),
    "platform.accelerator_count: expected an integer, got 'one'": lambda d: d["platform"].update(accelerator_count="one"),
    "platform.accelerator_count: expected an integer, got True": lambda d: d["platform"].update(accelerator_count=True),
    "tasks: has no `infer` task": lambda d: d["tasks"].update(run=d["tasks"].pop("infer")),
    "name: required key missing": lambda d: d.pop("name"),
    "docker.build_strategy: expected one of": lambda d: d["docker"].update(build_strategy="sometimes"),
    "inputs.data_path.type: expected one of 'file', 'directory', 'unknown', got 'folder'":
        lambda d: d["tasks"]["infer"]["parameters"]["inputs"]["data_path"].update(type="folder"),
    "inputs.data_path: must be a directory, got type 'file'":
        lambda d: d["tasks"]["infer"]["parameters"]["inputs"]["data_path"].update(type="file"),
    "inputs.parameters_file: must be 'parameters.yaml'":
        lambda d: d["tasks"]["infer"]["parameters"]["inputs"]["parameters_file"].update(default="params.yaml"),
    "outputs.output_path: required (directory)": lambda d: d["tasks"]["infer"]["parameters"].update(outputs={}),
    "inputs.weights: not a parameter of `project/mlcube.py infer`":
        lambda d: d["tasks"]["infer"]["parameters"]["inputs"].update(weights="additional_files/w.pt"),
}

CONTAINER_MUTATIONS = {
    "container_type: expected one of": lambda d: d.update(container_type="Docker"),
    "input_volumes.data_path.type: expected one of 'file', 'directory'":
        lambda d: d["tasks"]["infer"]["input_volumes"]["data_path"].update(type="folder"),
    "input_volumes.data_path.mount_path: required key missing":
        lambda d: d["tasks"]["infer"]["input_volumes"]["data_path"].pop("mount_path"),
    "mount_path: must be an absolute path":
        lambda d: d["tasks"]["infer"]["output_volumes"]["output_path"].update(mount_path="predictions"),
    "run_args.privileged: unknown key": lambda d: d["tasks"]["infer"]["run_args"].update(privileged=True),
    "run_args.command: must pass --output_path=/mlcommons/volumes/predictions":
        lambda d: d["tasks"]["infer"]["run_args"].update(command="infer --data_path=/mlcommons/volumes/data"),
    "tasks: has no `infer` task": lambda d: d.update(tasks={"prepare": {}}),
    "image: required key missing": lambda d: d.pop("image"),
}


@pytest.mark.parametrize("expected", MLCUBE_MUTATIONS)
def test_mlcube_yaml_schema_names_the_fault(package, expected):
    document = yaml.safe_load(package.mlcube_yaml.read_text())
    assert mlcube_yaml_problems(document) == []
    problems = mlcube_yaml_problems(_mutated(document, MLCUBE_MUTATIONS[expected]))
    assert any(expected in problem for problem in problems), problems


def test_mlcube_yaml_shorthand_of_medperf_templates_is_accepted(package):
    document = yaml.safe_load(package.mlcube_yaml.read_text())
    document["tasks"]["infer"]["parameters"] = {
        "inputs": {"data_path": "data/", "parameters_file": "parameters.yaml", "additional_files": "additional_files/"},
        "outputs": {"output_path": {"type": "directory", "default": "predictions"}}}
    assert mlcube_yaml_problems(document) == []
    document["tasks"]["infer"]["parameters"]["inputs"]["data_path"] = "data"
    assert mlcube_yaml_problems(document) == [
        "tasks.infer.parameters.inputs.data_path: must be a directory, got type 'unknown'"]


@pytest.mark.parametrize("expected", CONTAINER_MUTATIONS)
def test_container_config_schema_names_the_fault(package, expected):
    document = yaml.safe_load(package.container_config.read_text())
    assert container_config_problems(document) == []
    problems = container_config_problems(_mutated(document, CONTAINER_MUTATIONS[expected]))
    assert any(expected in problem for problem in problems), problems


def test_package_validation_cross_checks_the_two_forms(package, tmp_path):
    copy_root = tmp_path / "package"
    shutil.copytree(package.root, copy_root)
    layout = PackageLayout(copy_root)
    config = yaml.safe_load(layout.container_config.read_text())
    config["image"] = "someone/else:1"
    layout.container_config.write_text(yaml.safe_dump(config))
    (layout.project / "Dockerfile").unlink()
    problems = validate_package(copy_root)
    assert any("differs from mlcube.yaml's docker.image" in p for p in problems)
    assert any("Dockerfile, which does not exist" in p for p in problems)


# --- build and packaged runtime -----------------------------------------------------------------------------------


def test_package_files_are_readable_by_any_user_whatever_the_umask(tmp_path):
    soup = tiny_checkpoint(tmp_path / "soup.ckpt", 0)
    umask = os.umask(0o077)  # a user whose files nobody else may read: the package must still be readable by all
    try:
        layout = build_package(soup, "brats2024-ssa", tmp_path / "build", accelerator_count=0)
    finally:
        os.umask(umask)
    paths = [layout.root, *layout.root.rglob("*")]
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()} == {0o755}
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()} == {0o644}


def test_build_context_installs_without_network(package):
    project = package.project
    dockerfile = (project / "Dockerfile").read_text()
    assert "--no-index" in dockerfile and "pip install" in dockerfile and "http" not in dockerfile.replace(
        "https://", "")  # no URL to fetch from
    pins = (project / "wheelhouse" / "requirements.txt").read_text().split()
    names = {pin.split("==")[0] for pin in pins}
    # torch comes with the base image; typer's colorama is for Windows only (its marker), the image is Linux
    assert "torch" not in names and "colorama" not in names
    assert {"monai", "numpy", "typer", "rich", "safetensors", "nibabel", "pyyaml"} <= names
    wheels = {p.name.split("-")[0].lower().replace("_", "-") for p in (project / "wheelhouse").glob("*.whl")}
    assert wheels == names  # one wheel per pin, nothing to resolve
    assert all(p.name.endswith(("-none-any.whl", "manylinux_2_17_x86_64.whl", "x86_64.whl"))
               for p in (project / "wheelhouse").glob("*.whl"))


def test_unreadable_weights_and_unwritable_output_are_one_line_errors(package, cases, tmp_path, monkeypatch, capsys):
    data, _ = cases
    denied: set[str] = set()
    real_access = os.access
    # As root os.access grants everything: deny what a container's other uid could not read or write.
    monkeypatch.setattr(runtime.os, "access", lambda path, mode: str(path) not in denied and real_access(path, mode))
    weights = package.additional_files / "model-0.safetensors"
    denied.add(str(weights))
    (tmp_path / "out").mkdir()
    assert runtime.infer(str(data), str(package.parameters), str(tmp_path / "out"), str(package.additional_files)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {weights}: not readable by this container's user (uid ")
    denied = {str(tmp_path / "out")}
    assert runtime.infer(str(data), str(package.parameters), str(tmp_path / "out"), str(package.additional_files)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'out'}: the output folder is not writable")


def test_build_refuses_bad_arguments(package, tmp_path):
    with pytest.raises(ConfigError, match="unknown challenge"):
        build_package("any.ckpt", "brats2030-xyz", tmp_path / "out")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        build_package("any.ckpt", "brats2024-ssa", package.root)


def test_ensemble_package_predicts_as_the_ensemble_in_process(cases, tmp_path):
    data, _ = cases
    for seed in (1, 2):
        tiny_checkpoint(tmp_path / "models" / f"m{seed}.ckpt", seed)
    spec = {"thresholds": {"TC": 0.5, "WT": 0.45, "ET": 0.55},
            "models": [{"path": "models/m1.ckpt", "weights": {"TC": 1.0, "WT": 0.5, "ET": 0.0}},
                       {"path": "models/m2.ckpt", "weights": 1.0, "inference": {"mode": "constant"}}],
            "postprocessing": {"min_component_size": {"TC": 0, "WT": 20, "ET": 0}}}
    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump(spec))
    layout = build_package(tmp_path / "ensemble.yaml", "brats2023-ssa", tmp_path / "build")
    parameters = yaml.safe_load(layout.parameters.read_text())
    assert [m["path"] for m in parameters["models"]] == ["model-0.safetensors", "model-1.safetensors"]
    assert [m["inference"]["mode"] for m in parameters["models"]] == ["gaussian", "constant"]

    one_case = tmp_path / "one"
    shutil.copytree(data / "BraTS-SSA-00001-000", one_case / "BraTS-SSA-00001-000")
    (tmp_path / "predictions").mkdir()
    report = runtime.run_infer(one_case, layout.parameters, tmp_path / "predictions", layout.additional_files, "cpu")
    assert report.exit_code == 0 and [r.case_id for r in report.results] == ["BraTS-SSA-00001-000"]

    case = runtime.input_cases(one_case)[0]
    expected = Ensemble(EnsembleSpec.load(tmp_path / "ensemble.yaml")).predict_case(case.images, case_id=case.case_id)
    written = nib.load(report.results[0].written)
    assert np.array_equal(np.asanyarray(written.dataobj), expected.labels)


def test_unusable_package_exits_2_with_the_reason(package, cases, tmp_path, capsys):
    data, _ = cases
    additional = tmp_path / "additional_files"
    shutil.copytree(package.additional_files, additional)
    sidecar = additional / "model-0.json"
    sidecar.write_text(sidecar.read_text().replace('"sha256": "', '"sha256": "0'))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        runtime.load_package(package.parameters, additional, "cpu")
    parameters = tmp_path / "parameters.yaml"
    parameters.write_text(package.parameters.read_text() + "tresholds: 0.5\n")
    (tmp_path / "out").mkdir()
    assert runtime.infer(str(data), str(parameters), str(tmp_path / "out"), str(package.additional_files)) == 2
    assert "tresholds: unknown key" in capsys.readouterr().err


# --- the compatibility check --------------------------------------------------------------------------------------


def test_check_predicts_every_usable_case_and_reports_the_broken_one(checked, cases):
    checks, work = checked
    data, references = cases
    results = {c.name: c for c in checks}
    failed = sorted(name for name, c in results.items() if not c.passed)
    assert failed == ["all input cases usable"], [(c.name, c.detail) for c in checks if not c.passed]
    assert MISSING_T2W in results["all input cases usable"].detail and "t2w: missing file" in results[
        "all input cases usable"].detail
    assert results["exit code"].detail.startswith("1: some cases skipped")
    assert results["predictable cases predicted"].detail == "2 of 2"
    assert "dice_WT" in results["scores (brats2024-ssa)"].detail and "1 without prediction" in results[
        "scores (brats2024-ssa)"].detail
    assert check.report(checks) == 1

    predictions = work / "mlcommons" / "volumes" / "predictions"
    assert sorted(p.name for p in predictions.iterdir()) == ["BraTS-SSA-00001-000.nii.gz", "BraTS-SSA-00002-000.nii.gz"]
    for path in predictions.iterdir():
        case_id = path.name.removesuffix(".nii.gz")
        prediction, image = nib.load(path), nib.load(data / case_id / f"{case_id}-t1c.nii.gz")
        assert prediction.shape == image.shape and np.allclose(prediction.affine, image.affine)
        assert prediction.get_data_dtype() == np.uint8
        assert set(np.unique(np.asanyarray(prediction.dataobj)).tolist()) <= set(get_scheme("brats2023").labels)
    # The inputs were read-only copies at the container's mount paths.
    copied = work / "mlcommons" / "volumes" / "data" / "BraTS-SSA-00001-000" / "BraTS-SSA-00001-000-t1c.nii.gz"
    assert copied.stat().st_mode & 0o222 == 0


def test_output_check_rejects_stray_files_wrong_geometry_and_labels(cases, tmp_path):
    data, references = cases
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    seg = nib.load(references / "BraTS-SSA-00001-000" / "BraTS-SSA-00001-000-seg.nii.gz")
    labels = np.asanyarray(seg.dataobj).astype(np.uint8)
    nib.save(nib.Nifti1Image(labels[:-1], seg.affine), predictions / "BraTS-SSA-00001-000.nii.gz")
    labels[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(labels.astype(np.float32), seg.affine), predictions / "BraTS-SSA-00002-000.nii.gz")
    (predictions / "log.txt").write_text("not a prediction")
    results = {c.name: c for c in check.output_checks(data, predictions, "brats2023", exit_code=0)}
    assert not results["output names"].passed and "log.txt" in results["output names"].detail
    detail = results["geometry, dtype and labels"].detail
    assert "BraTS-SSA-00001-000: shape (47, 48, 48)" in detail
    assert "dtype float32 is not an integer type" in detail and "label values [7" in detail
    assert not results["exit code"].passed  # 0 although a case could not be predicted


def test_sandbox_refuses_network_and_code_outside_the_package(tmp_path):
    project = tmp_path / "project"
    (project / "brats_ugrip").mkdir(parents=True)
    (project / "brats_ugrip" / "__init__.py").write_text("")
    (project / "probe.py").write_text(
        "import socket\n"
        "try:\n    socket.create_connection(('192.0.2.1', 80), timeout=5)\n"
        "except OSError as error:\n    print('network:', error)\n"
        "try:\n    import brats_ugrip.labels\n"
        "except ModuleNotFoundError as error:\n    print('import:', error)\n")
    result = subprocess.run([sys.executable, "-s", str(REPO / "mlcube" / "sandbox.py"), str(project / "probe.py")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert "network: network access refused" in result.stdout, result.stdout + result.stderr
    assert "import: No module named 'brats_ugrip.labels'" in result.stdout, result.stdout + result.stderr


@pytest.mark.slow
def test_package_of_a_soup_of_a_trained_run_passes_the_check(phantom_dir, cases, tmp_path):
    """The whole chain: a tiny run trained on phantoms (Lightning checkpoints), their uniform soup (souping/),
    the package, and the check with scores."""
    from brats_ugrip.config import load_config
    from brats_ugrip.data import make_datalist, save_datalist
    from brats_ugrip.souping import uniform
    from brats_ugrip.training import train

    data, references = cases
    datalist = save_datalist(make_datalist(phantom_dir, 3, 0), tmp_path / "datalist.json")
    config = load_config(base={
        "data": {"datalist": str(datalist), "roi_size": [32, 32, 32], "batch_size": 2},
        "model": {"name": "segresnet", "init_filters": 8}, "optim": {"name": "adamw_sf", "lr": 0.01},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "log_every_n_steps": 1},
        "inference": {"roi_size": [48, 48, 48], "overlap": 0.25}, "logging": {"mode": "disabled"}})
    train(config, tmp_path / "run")
    assert uniform.main(["--ckpts", str(tmp_path / "run" / "checkpoints"), "--out", str(tmp_path / "soup.ckpt"),
                         "--no-score"]) == 0
    layout = build_package(tmp_path / "soup.ckpt", "brats2024-ssa", tmp_path / "build")
    checks = check.check_package(layout.root, data, references, timeout=600)
    failed = [c.name for c in checks if not c.passed]
    assert failed == ["all input cases usable"], [(c.name, c.detail) for c in checks]
    assert "dice_WT" in {c.name: c for c in checks}["scores (brats2024-ssa)"].detail
