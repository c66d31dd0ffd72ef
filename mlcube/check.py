"""Check a built model package the way ``medperf test run`` would, without Docker.

    python mlcube/check.py build/mlcube --data CASES [--labels REFERENCES] [--metrics SET] [--timeout S] [--keep DIR]

1. Validates ``mlcube/mlcube.yaml`` and ``container_config.yaml`` against MedPerf's formats and the model task
   (``mlcube/schema.py``).
2. Lays the container's volumes out in a temporary folder, at their mount paths: the data (a copy of CASES), the
   parameters file and the additional files, all read-only, and an empty predictions folder. Runs
   ``project/mlcube.py`` with the container's ``infer`` command in a fresh Python process (``mlcube/sandbox.py``):
   no network, no code from this checkout, offline settings and a private HOME and TMPDIR.
3. Checks the result: the inputs are untouched; the predictions folder holds only ``<ID>.nii.gz`` files named by
   MedPerf's pattern ``(\\d{5}-\\d{3})\\.nii\\.gz``, one per case that can be predicted (and none for a case that
   cannot: missing or unreadable modality, geometry mismatch); each has its case's shape and affine, an integer
   dtype and labels of the scheme; the exit code says whether every case was written.
4. With ``--labels`` (``<ID>/<ID>-seg.nii.gz`` or ``<ID>-seg.nii.gz``), scores the predictions with the package's
   challenge metrics (``brats_ugrip.metrics.evaluate_dirs``); a case without prediction scores as the worst case.

With ``--container [IMAGE]`` (default: the package's image, built with ``docker build --network none -t IMAGE
OUT/project``), it also runs the image as MedPerf does (``docker run --rm --network none -u <uid>:<gid>``, the
volumes of ``container_config.yaml``, inputs read-only; ``mlcube/container.py``) on the same read-only copies, and
checks that the container's predictions are the same files with the same labels, voxel for voxel, as the
in-process run's, with the same exit code.

Prints a summary table; exit code 0 when every check passed, 1 otherwise, 2 when the arguments are unusable.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table

from brats_ugrip.cli import console, run
from brats_ugrip.data import brats_case_number
from brats_ugrip.errors import BratsUgripError, DataError
from brats_ugrip.io import load_nifti
from brats_ugrip.labels import get_scheme
from brats_ugrip.mlcube.schema import (
    INFER_INPUTS,
    INFER_OUTPUTS,
    PackageLayout,
    container_volumes,
    infer_command,
    load_yaml,
    validate_package,
)

MEDPERF_PREDICTION = re.compile(r".*(\d{5}-\d{3})\.nii\.gz$")
"""How MedPerf's BraTS evaluator reads a predictions folder (examples/BraTS2023/segmentation_metrics): any other
entry fails the evaluation."""
SANDBOX = Path(__file__).resolve().parent / "sandbox.py"
PASSED_THROUGH_ENV = ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                      "CUDA_VISIBLE_DEVICES")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "PIP_NO_INDEX": "1",
               "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
               # A proxy nobody listens on: an HTTP client that ignores the sandbox still fails fast.
               "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


# --- the run ------------------------------------------------------------------------------------------------------


def make_read_only(path: Path) -> None:
    """``chmod -R a-w``: what a read-only mount looks like to the process (root ignores it, see :func:`snapshot`)."""
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        item.chmod(stat.S_IMODE(item.stat().st_mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def snapshot(paths: Sequence[Path]) -> dict[str, tuple[int, int]]:
    """``{file: (size, mtime)}`` under ``paths``, to prove afterwards that nothing was written there."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in files}


def prepare_volumes(layout: PackageLayout, container: dict, data: Path, root: Path) -> dict[str, Path]:
    """Create the ``infer`` task's volumes under ``root`` at their mount paths: copies of the inputs, made read-only,
    and empty output folders. Returns ``{volume name: host path}``."""
    sources = {"data_path": data, "parameters_file": layout.parameters, "additional_files": layout.additional_files}
    volumes: dict[str, Path] = {}
    for name, volume in container_volumes(container).items():
        host = root / volume["mount_path"].lstrip("/")
        if volume["direction"] == "output":
            host.mkdir(parents=True)
        elif volume["type"] == "directory":
            shutil.copytree(sources[name], host)
        else:
            host.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(sources[name], host)
        volumes[name] = host
    for name, volume in container_volumes(container).items():
        if volume["direction"] == "input":
            make_read_only(volumes[name])
    return volumes


def host_arguments(arguments: list[str], container: dict, volumes: dict[str, Path]) -> list[str]:
    """The container's command with each mount path replaced by its host folder."""
    mounts = {v["mount_path"]: volumes[name] for name, v in container_volumes(container).items()}

    def host(value: str) -> str:
        for mount, path in sorted(mounts.items(), key=lambda item: -len(item[0])):
            if value == mount or value.startswith(mount + "/"):
                return str(path) + value[len(mount):]
        return value

    return [f"{t.partition('=')[0]}={host(t.partition('=')[2])}" if t.startswith("--") and "=" in t else host(t)
            for t in arguments]


def sandbox_env(root: Path) -> dict[str, str]:
    """A minimal offline environment with a private HOME and TMPDIR (MedPerf mounts its own /tmp)."""
    env = {key: os.environ[key] for key in PASSED_THROUGH_ENV if key in os.environ}
    for name in ("home", "tmp"):
        (root / name).mkdir(exist_ok=True)
    return {**env, **OFFLINE_ENV, "HOME": str(root / "home"), "TMPDIR": str(root / "tmp")}


def run_entrypoint(layout: PackageLayout, arguments: list[str], root: Path, timeout: float) -> tuple[int, list[str]]:
    """Run ``project/mlcube.py ARGUMENTS`` in the sandbox; its output is shown as it comes. Returns
    ``(exit code, output lines)``; a run past ``timeout`` seconds is killed (exit code -9)."""
    command = [sys.executable, "-s", str(SANDBOX), str(layout.entrypoint), *arguments]
    console.print(f"[bold]running[/] {' '.join(command[3:])}", highlight=False, soft_wrap=True)
    process = subprocess.Popen(command, cwd=root / "tmp", env=sandbox_env(root), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace")
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    lines = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            console.print(f"  │ {lines[-1]}", highlight=False, markup=False, soft_wrap=True)
        return process.wait(), lines
    finally:
        timer.cancel()


def container_checks(layout: PackageLayout, data: Path, expected: Path, expected_code: int, image: str | None,
                     root: Path, timeout: float) -> list[Check]:
    """Run the image on ``data`` as MedPerf does and compare its predictions with ``expected`` (the in-process
    run's, which exited ``expected_code``) file by file and voxel by voxel."""
    from brats_ugrip.mlcube.base_image import engine_problem, image_exists
    from brats_ugrip.mlcube.container import docker_run_argv, package_image, run_logged

    image = image or package_image(layout)
    problem = engine_problem()
    if problem is None and not image_exists(image):
        problem = f"image {image} not found; build it with docker build --network none -t {image} {layout.project}"
    if problem:
        return [Check("container run", False, problem)]
    predictions = root / "container-predictions"
    predictions.mkdir()
    argv = docker_run_argv(layout, data, predictions, image)
    console.print(f"[bold]running[/] {' '.join(argv)}", highlight=False, soft_wrap=True)
    code, lines = run_logged(argv, timeout)
    for line in lines:
        console.print(f"  │ {line}", highlight=False, markup=False, soft_wrap=True)
    run_check = Check("container run", code == expected_code, f"docker run --network none -u {os.getuid()}:"
                      f"{os.getgid()} exited {code}" + ("" if code == expected_code else
                                                         f", the in-process run {expected_code}"))
    return [run_check, compare_predictions(expected, predictions)]


def compare_predictions(expected: Path, found: Path) -> Check:
    """The same ``<ID>.nii.gz`` files in both folders, each with identical labels and affine."""
    names = sorted(p.name for p in expected.iterdir()), sorted(p.name for p in found.iterdir())
    if names[0] != names[1]:
        return Check("container = in-process", False, f"files differ: in-process {names[0]}, container {names[1]}")
    different = []
    for name in names[0]:
        a, b = load_nifti(expected / name), load_nifti(found / name)
        same = a.shape == b.shape and np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
        if not same or not np.allclose(a.affine, b.affine, atol=1e-6):
            different.append(name)
    return Check("container = in-process", not different and bool(names[0]),
                 f"{len(names[0])} label maps identical voxel for voxel" if not different and names[0] else
                 f"differ: {different}" if different else "no predictions to compare")


# --- the checks ---------------------------------------------------------------------------------------------------


def check_prediction(path: Path, reference: Path, labels: tuple[int, ...]) -> list[str]:
    """Problems of one prediction against its case's first image: shape, affine, integer dtype, label values."""
    try:
        prediction, image = load_nifti(path), load_nifti(reference)
        data = np.asanyarray(prediction.dataobj)
    except (BratsUgripError, OSError, ValueError) as error:
        return [f"unreadable ({error})"]
    problems = []
    if prediction.shape != image.shape[:3]:
        problems.append(f"shape {prediction.shape} differs from the input's {image.shape[:3]}")
    elif not np.allclose(prediction.affine, image.affine, atol=1e-4):
        problems.append("affine differs from the input's")
    if not np.issubdtype(prediction.get_data_dtype(), np.integer):
        problems.append(f"dtype {prediction.get_data_dtype()} is not an integer type")
    values = sorted(set(np.unique(data).tolist()) - set(labels))
    if values:
        problems.append(f"label values {values} outside the scheme's {list(labels)}")
    return problems


def output_checks(data: Path, predictions: Path, scheme: str, exit_code: int) -> list[Check]:
    """Compare the predictions folder with the cases of ``data`` (see the module docstring, point 3)."""
    # The package's own rules for which cases it can predict, and its exit codes (imports torch: only when checking).
    from brats_ugrip.mlcube.runtime import EXIT_BAD_PACKAGE, EXIT_CASES_FAILED, case_problems, input_cases

    meanings = {0: "every case written", EXIT_CASES_FAILED: "some cases skipped, reported by id",
                EXIT_BAD_PACKAGE: "the package or a folder is unusable"}
    numbers: set[str] = set()
    expected: dict[str, list[str]] = {}  # case id -> why it cannot be predicted (empty: it can)
    references = {}
    for case in input_cases(data):
        expected[case.case_id] = case_problems(case, scheme, numbers)
        if not expected[case.case_id]:
            numbers.add(brats_case_number(case.case_id) or "")
        references[case.case_id] = case.images[0]
    stray: list[str] = []
    written: dict[str, Path] = {}
    for entry in sorted(predictions.iterdir()):
        case_id = entry.name.removesuffix(".nii.gz")
        if entry.is_file() and MEDPERF_PREDICTION.match(entry.name) and case_id in expected:
            written[case_id] = entry
        else:
            stray.append(entry.name + ("/" if entry.is_dir() else ""))
    can = [case_id for case_id, problems in expected.items() if not problems]
    cannot = {case_id: problems for case_id, problems in expected.items() if problems}
    missed = [case_id for case_id in can if case_id not in written]
    wrongly = [case_id for case_id in cannot if case_id in written]
    bad = {case_id: check_prediction(path, references[case_id], get_scheme(scheme).labels)
           for case_id, path in written.items()}
    bad = {case_id: problems for case_id, problems in bad.items() if problems}
    complete = not cannot and not missed
    code_ok = (exit_code == 0) == complete and exit_code in (0, EXIT_CASES_FAILED)
    return [
        Check("output names", not stray, f"{len(written)} files named <ID>.nii.gz" if not stray else
              f"unexpected entries {stray[:5]}: MedPerf's evaluator accepts only files matching "
              f"{MEDPERF_PREDICTION.pattern} named after input cases"),
        Check("predictable cases predicted", not missed and not wrongly,
              f"{len(can) - len(missed)} of {len(can)}" + (f"; missing {missed[:5]}" if missed else "")
              + (f"; predicted unusable cases {wrongly}" if wrongly else "")),
        Check("all input cases usable", not cannot, f"{len(expected)} cases" if not cannot else
              "; ".join(f"{case_id}: {', '.join(problems)}" for case_id, problems in cannot.items())),
        Check("geometry, dtype and labels", not bad, f"{len(written)} predictions in the input geometry, integer "
              f"labels of {scheme}" if not bad else "; ".join(f"{k}: {', '.join(v)}" for k, v in bad.items())),
        Check("exit code", code_ok, f"{exit_code}: " + (meanings.get(exit_code, "killed or crashed") if code_ok else
              f"expected {0 if complete else EXIT_CASES_FAILED} ({meanings[0]} / {meanings[EXIT_CASES_FAILED]})")),
    ]


def score_check(predictions: Path, labels: Path, scheme: str, metrics: str) -> Check:
    """Score the predictions; the check fails only when scoring cannot be done."""
    from brats_ugrip.metrics import evaluate_dirs, summary

    try:
        table = evaluate_dirs(predictions, labels, scheme, metrics)
    except BratsUgripError as error:
        return Check(f"scores ({metrics})", False, str(error))
    means = summary(table)["mean"]
    shown = [c for c in means.index if c.startswith(("dice_", "lw_dice_"))] or list(means.index[:6])
    missing = table.attrs["missing"]
    return Check(f"scores ({metrics})", True, ", ".join(f"{c} {means[c]:.3f}" for c in shown)
                 + f" over {len(table)} cases" + (f" ({len(missing)} without prediction scored worst)" if missing else ""))


def check_package(package: str | os.PathLike[str], data: str | os.PathLike[str],
                  labels: str | os.PathLike[str] | None = None, metrics: str | None = None, timeout: float = 3600,
                  keep: str | os.PathLike[str] | None = None, in_container: bool = False,
                  image: str | None = None) -> list[Check]:
    """Every check of the module docstring, in order (the container's with ``in_container``, running ``image`` or the
    package's). The work folder is removed unless ``keep`` names one."""
    # Absolute paths: the task runs with its working directory inside the sandbox.
    layout, data = PackageLayout(Path(package).resolve()), Path(data).resolve()
    if not data.is_dir():
        raise DataError(f"{data}: data folder not found")
    if not layout.root.is_dir():
        raise DataError(f"{layout.root}: package folder not found; build one with mlcube/build.py")
    problems = validate_package(layout.root)
    checks = [Check("mlcube.yaml, container_config.yaml", not problems, "valid" if not problems else "\n".join(problems))]
    container = load_yaml(layout.container_config)[0]
    usable = (isinstance(container, dict) and infer_command(container) and layout.parameters.is_file()
              and INFER_INPUTS.keys() | INFER_OUTPUTS.keys() <= container_volumes(container).keys())
    if not usable:
        return checks + [Check("infer task", False, "not run: container_config.yaml has no usable infer command and "
                               "volumes, or parameters.yaml is missing")]
    parameters = load_yaml(layout.parameters)[0]
    parameters = parameters if isinstance(parameters, dict) else {}
    scheme = parameters.get("label_scheme") or "brats2023"
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="mlcube-check-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        volumes = prepare_volumes(layout, container, data, root)
        inputs = [volumes[n] for n, v in container_volumes(container).items() if v["direction"] == "input"]
        before = snapshot(inputs)
        arguments = host_arguments(infer_command(container), container, volumes)
        exit_code, _ = run_entrypoint(layout, arguments, root, timeout)
        changed = sorted(set(before.items()) ^ set(snapshot(inputs).items()))
        checks.append(Check("inputs untouched", not changed, "read-only volumes unchanged" if not changed else
                            f"the task wrote into its inputs: {sorted({path for path, _ in changed})[:5]}"))
        predictions = volumes["output_path"]
        checks += output_checks(volumes["data_path"], predictions, scheme, exit_code)
        if in_container:
            checks += container_checks(layout, volumes["data_path"], predictions, exit_code, image, root, timeout)
        if labels is not None:
            checks.append(score_check(predictions, Path(labels), scheme, metrics or parameters.get("challenge")
                                      or "regions"))
    finally:
        if not keep:
            for path in [root, *root.rglob("*")]:  # the read-only copies must be writable to be removed
                if not path.is_symlink():
                    path.chmod(stat.S_IMODE(path.stat().st_mode) | stat.S_IWUSR)
            shutil.rmtree(root, ignore_errors=True)
    return checks


def summary_table(checks: list[Check]) -> Table:
    table = Table(title="MedPerf compatibility check")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for check in checks:
        table.add_row(check.name, "[green]pass[/]" if check.passed else "[bold red]FAIL[/]", check.detail)
    return table


def report(checks: list[Check]) -> int:
    """Print the summary; the exit code: 0 when every check passed, 1 otherwise."""
    console.print(summary_table(checks))
    failed = [c.name for c in checks if not c.passed]
    console.print(f"[bold red]{len(failed)} check(s) failed:[/] {', '.join(failed)}" if failed else
                  "[bold green]all checks passed[/]", highlight=False)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python mlcube/check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", help="package folder written by mlcube/build.py")
    parser.add_argument("--data", required=True, help="folder of cases <ID>/<ID>-{t1c,t1n,t2f,t2w}.nii.gz")
    parser.add_argument("--labels", help="folder of reference segmentations: score the predictions")
    parser.add_argument("--metrics", help="metric set for --labels (default: the package's challenge)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds the infer task may run (default 3600)")
    parser.add_argument("--keep", help="work folder to keep (volumes, predictions) instead of a temporary one")
    parser.add_argument("--container", nargs="?", const="", metavar="IMAGE", help="also run the built image as "
                        "MedPerf does and compare its labels with the in-process run's (default: the package's image)")
    args = parser.parse_args(argv)

    return report(check_package(args.package, args.data, args.labels, args.metrics, args.timeout, args.keep,
                                in_container=args.container is not None, image=args.container or None))


if __name__ == "__main__":
    run(main)
