"""The model package as MedPerf runs it: the image built without network on the registry-free CPU base, run with
``docker run --network none -u <uid>:<gid>`` (container form) and ``mlcube run --platform=docker --network=none``
(MLCube form), for a single model, a uniform soup and a fitted ensemble. Each run's label maps must equal, voxel for
voxel, those of the in-process commands (``python -m brats_ugrip.infer`` for a checkpoint, ``ensembling/cli.py
--spec`` for the ensemble). Marked ``container``: they skip, with the reason, where no engine answers
(``mlcube/container_engine.sh`` starts one; ``run.sh test`` runs it).

CPU cost: the base image is built once per machine (~2 min, then kept), the three packages share every image layer
(only the weights differ, and they are mounted), cases are 40³.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_ugrip import infer
from brats_ugrip.checkpoints import save_model_checkpoint
from brats_ugrip.config import config_from_dict
from brats_ugrip.data import make_datalist, save_datalist
from brats_ugrip.ensembling import cli as ensemble_cli
from brats_ugrip.errors import ConfigError
from brats_ugrip.mlcube import check
from brats_ugrip.mlcube.base_image import build_base_image, engine_problem, run_tool
from brats_ugrip.mlcube.build import build_package
from brats_ugrip.mlcube.container import docker_run_argv, mlcube_run_argv, mlcube_runner, run_logged
from brats_ugrip.models import create_model, resolve_kwargs
from brats_ugrip.souping import uniform
from brats_ugrip.synthetic.phantom import write_phantoms

pytestmark = pytest.mark.container

BASE_IMAGE = os.environ.get("BRATS_UGRIP_BASE_IMAGE", "brats-ugrip-base:cpu")
MEDPERF_USER = (1234, 1234)
"""A uid with no entry in the image's /etc/passwd, as MedPerf's ``-u <uid>:<gid>`` of a site's user is."""
IMAGE_USER = (1000, 1000)
"""The image's own user, which MLCube's docker runner runs as (it passes no ``-u``)."""
RUN_TIMEOUT = 300
VARIANTS = ("single", "soup", "ensemble")


def tiny_checkpoint(path: Path, seed: int) -> Path:
    """An untrained SegResNet (init_filters 8) with a run config (one 48³ window covers a 40³ case)."""
    config = config_from_dict({"data": {"datalist": "unused.json", "roi_size": [48, 48, 48]},
                               "model": {"name": "segresnet", "init_filters": 8},
                               "inference": {"overlap": 0.25, "sw_batch_size": 1, "threshold": 0.45}}).to_dict()
    torch.manual_seed(seed)
    kwargs = resolve_kwargs("segresnet", init_filters=8)
    return save_model_checkpoint(path, create_model("segresnet", **kwargs).state_dict(),
                                 {"model": {"name": "segresnet", "kwargs": kwargs}, "config": config, "fold": 0,
                                  "weights": "averaged"})


def labels_of(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asanyarray(nib.load(p).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def owned_folder(path: Path, user: tuple[int, int]) -> Path:
    """An empty output folder owned by ``user`` (mode 0755): writable by that uid only, as a site prepares it."""
    path.mkdir(parents=True)
    os.chown(path, *user)
    return path


@pytest.fixture(scope="session")
def base_image():
    """The registry-free CPU base (``mlcube/base_image.py``), built once per machine and kept."""
    problem = engine_problem()
    if problem:
        pytest.skip(f"no container engine: {problem}")
    if os.geteuid() != 0:
        pytest.skip("the container tests run as root (debootstrap, and output folders owned by other uids)")
    build_base_image(BASE_IMAGE)
    return BASE_IMAGE


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Two BraTS-GLI-named 40³ phantoms without segmentations."""
    root = tmp_path_factory.mktemp("cases")
    write_phantoms(root, n_cases=2, size=40, seed=5, prefix="BraTS-GLI")
    for seg in root.glob("*/*-seg.nii.gz"):
        seg.unlink()
    root.chmod(0o755)  # read by the container's uid through a read-only mount
    return root


@pytest.fixture(scope="module")
def sources(phantom_dir, tmp_path_factory):
    """``{variant: (model for build.py, in-process command's argv without --input/--out)}``: one checkpoint, the
    uniform soup of two (souping/uniform.py), and the ensemble of the two fitted on fold 0 (ensembling/cli.py)."""
    root = tmp_path_factory.mktemp("models")
    single = tiny_checkpoint(root / "single.ckpt", 3)
    for seed in (1, 2):
        tiny_checkpoint(root / "ingredients" / f"m{seed}.ckpt", seed)
    assert uniform.main(["--ckpts", str(root / "ingredients"), "--out", str(root / "soup.ckpt"), "--no-score"]) == 0
    datalist = save_datalist(make_datalist(phantom_dir, 3, 0), root / "datalist.json")
    members = [str(p) for p in sorted((root / "ingredients").glob("*.ckpt"))]
    assert ensemble_cli.main(["--models", *members, "--fit", "--datalist", str(datalist), "--fold", "0",
                              "--no-test-split", "--allow-seen-test-cases", "--device", "cpu",
                              "--out", str(root / "fit")]) == 0
    spec = root / "fit" / "ensemble.yaml"
    return {"single": (single, ["infer", "--ckpt", str(single)]),
            "soup": (root / "soup.ckpt", ["infer", "--ckpt", str(root / "soup.ckpt")]),
            "ensemble": (spec, ["ensemble", "--spec", str(spec)])}


@pytest.fixture(scope="module")
def packages(base_image, sources, tmp_path_factory):
    """``{variant: (layout, image)}``: each package built and its image built with ``docker build --network none``."""
    root = tmp_path_factory.mktemp("packages")
    built = {}
    for variant, (model, _) in sources.items():
        image = f"brats-ugrip-test/{variant}:1"
        layout = build_package(model, "brats2023-gli", root / variant, image=image, base_image=base_image,
                               accelerator_count=0)
        run_tool(["docker", "build", "--network", "none", "-q", "-t", image, str(layout.project)],
                 f"docker build of the {variant} package")
        built[variant] = layout, image
    return built


def in_process(argv: list[str], cases: Path, out: Path) -> dict[str, np.ndarray]:
    command, *arguments = argv
    main = infer.main if command == "infer" else ensemble_cli.main
    assert main([*arguments, "--input", str(cases), "--out", str(out), "--device", "cpu"]) in (0, None)
    return labels_of(out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_image_runs_both_ways_medperf_does_with_the_in_process_labels(variant, packages, sources, cases, tmp_path):
    layout, image = packages[variant]
    expected = in_process(sources[variant][1], cases, tmp_path / "in-process")
    assert sorted(expected) == ["BraTS-GLI-00000-000.nii.gz", "BraTS-GLI-00001-000.nii.gz"]
    assert all(len(np.unique(labels)) > 1 for labels in expected.values())  # a comparison of empty maps proves little

    out = owned_folder(tmp_path / "docker-run", MEDPERF_USER)
    code, lines = run_logged(docker_run_argv(layout, cases, out, image, user=MEDPERF_USER), RUN_TIMEOUT)
    assert code == 0, "\n".join(lines)
    found = labels_of(out)
    assert sorted(found) == sorted(expected) and all(np.array_equal(found[n], expected[n]) for n in expected)
    assert {p.stat().st_uid for p in out.iterdir()} == {MEDPERF_USER[0]}

    try:
        runner = mlcube_runner()
    except ConfigError as error:
        pytest.skip(f"mlcube run not tested: {error}")
    out = owned_folder(tmp_path / "mlcube-run", IMAGE_USER)
    code, lines = run_logged(mlcube_run_argv(layout, cases, out, runner), RUN_TIMEOUT, cwd=tmp_path)
    assert code == 0, "\n".join(lines)
    found = labels_of(out)
    assert sorted(found) == sorted(expected) and all(np.array_equal(found[n], expected[n]) for n in expected)


def test_unreadable_weights_and_unwritable_output_are_one_line_errors(packages, cases, tmp_path):
    layout, image = packages["single"]
    copy = type(layout)(tmp_path / "package")
    shutil.copytree(layout.root, copy.root)
    weights = copy.additional_files / "model-0.safetensors"
    weights.chmod(0o600)  # what the atomic writer's temporary file had before build.py fixed the modes
    out = owned_folder(tmp_path / "out", MEDPERF_USER)
    code, lines = run_logged(docker_run_argv(copy, cases, out, image, user=MEDPERF_USER), RUN_TIMEOUT)
    assert code == 2 and not any("Traceback" in line for line in lines), "\n".join(lines)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "/mlcommons/volumes/additional_files/model-0.safetensors: not readable" in errors[0]
    assert "uid 1234" in errors[0] and "chmod -R a+rX" in errors[0]

    weights.chmod(0o644)
    root_owned = tmp_path / "root-owned"
    root_owned.mkdir(mode=0o755)
    code, lines = run_logged(docker_run_argv(copy, cases, root_owned, image, user=MEDPERF_USER), RUN_TIMEOUT)
    assert code == 2 and not any("Traceback" in line for line in lines), "\n".join(lines)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "/mlcommons/volumes/predictions: the output folder is not writable" in errors[0]
    assert "docker run -u $(id -u):$(id -g)" in errors[0] and not list(root_owned.iterdir())


def test_check_runs_the_image_and_compares_with_the_in_process_run(packages, cases):
    layout, image = packages["soup"]
    checks = check.check_package(layout.root, cases, in_container=True, image=image, timeout=RUN_TIMEOUT)
    results = {c.name: c for c in checks}
    assert all(c.passed for c in checks), [(c.name, c.detail) for c in checks if not c.passed]
    assert results["container = in-process"].detail == "2 label maps identical voxel for voxel"
    assert results["container run"].detail.startswith("docker run --network none -u 0:0 exited 0")


def test_engine_script_reports_a_running_engine_and_says_what_to_do_without_root(base_image):
    script = Path(__file__).resolve().parents[1] / "mlcube" / "container_engine.sh"
    code, lines = run_logged(["bash", str(script)], 120)
    assert code == 0 and lines[-1].startswith("[docker-dev] engine answers: "), lines
    if shutil.which("runuser") is None:
        pytest.skip("runuser (util-linux) is not installed")
    code, lines = run_logged(["runuser", "-u", "nobody", "--", "bash", str(script)], 120)
    assert code == 1 and len(lines) == 1, lines  # the socket is root's: nobody can neither reach nor start an engine
    assert lines[0].startswith("[docker-dev] ERROR: no Docker engine answers and starting one needs root")
    assert "sudo usermod -aG docker nobody" in lines[0]
