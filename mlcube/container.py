"""Run a built package's image the two ways MedPerf does, with no network.

* Container form (MedPerf 2025+): ``docker run --rm --network none -u <uid>:<gid>`` with one volume per entry of
  ``container_config.yaml``'s ``infer`` task at its ``mount_path`` (inputs read-only) and the task's
  ``run_args.command`` as the entry point's arguments (:func:`docker_run_argv`).
* MLCube form: ``mlcube run --mlcube=OUT/mlcube --task=infer --platform=docker --network=none data_path=...
  output_path=...`` (PyPI ``mlcube`` + ``mlcube-docker``), which mounts the workspace's parameters and additional
  files itself and passes no ``-u``: the image's user, uid 1000, runs the task (:func:`mlcube_run_argv`).

Contract: the functions build command lines and run them; they never build images (``mlcube/build.py`` writes the
context, ``docker build --network none OUT/project`` builds it) and never pull one: MLCube's docker runner pulls
only when the image is missing, so :func:`mlcube_run_argv` is for an image present locally. :func:`run_logged`
returns the exit code and output lines; nothing is printed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from brats_ugrip.errors import ConfigError
from brats_ugrip.mlcube.schema import PackageLayout, container_volumes, infer_command, load_yaml

MLCUBE_RUNNER = "mlcube"
"""The PyPI ``mlcube`` command (0.0.9 with ``mlcube-docker`` 0.0.9 is what was tested)."""


def package_image(layout: PackageLayout) -> str:
    """The image name the package's ``container_config.yaml`` names (the same as ``mlcube.yaml``'s docker.image)."""
    config, problems = load_yaml(layout.container_config)
    if problems or not isinstance(config, dict) or not isinstance(config.get("image"), str):
        raise ConfigError("image", "container_config.yaml names no image; rebuild the package with mlcube/build.py",
                          str(layout.container_config))
    return config["image"]


def medperf_mounts(layout: PackageLayout, data: Path, output: Path) -> list[tuple[Path, str, bool]]:
    """``(host path, mount path, read-only)`` per volume of the ``infer`` task, as MedPerf mounts them."""
    config = load_yaml(layout.container_config)[0]
    sources = {"data_path": data, "parameters_file": layout.parameters, "additional_files": layout.additional_files,
               "output_path": output}
    mounts = []
    for name, volume in container_volumes(config).items():
        if name not in sources:
            raise ConfigError(f"tasks.infer.{volume['direction']}_volumes.{name}", "not a volume of the infer task",
                              str(layout.container_config))
        mounts.append((Path(sources[name]).resolve(), volume["mount_path"], volume["direction"] == "input"))
    return mounts


def docker_run_argv(layout: PackageLayout, data: Path, output: Path, image: str | None = None,
                    user: tuple[int, int] | None = None, gpus: int = 0, docker: str = "docker") -> list[str]:
    """``docker run`` of the container form (module docstring); ``user`` defaults to this process's uid and gid."""
    uid, gid = user if user is not None else (os.getuid(), os.getgid())
    argv = [docker, "run", "--rm", "--network", "none", "-u", f"{uid}:{gid}"]
    if gpus:
        argv += ["--gpus", "all" if gpus < 0 else str(gpus)]
    for host, mount, read_only in medperf_mounts(layout, data, output):
        argv += ["--volume", f"{host}:{mount}:{'ro' if read_only else 'rw'}"]
    config = load_yaml(layout.container_config)[0]
    return [*argv, image or package_image(layout), *infer_command(config)]


def mlcube_runner() -> str:
    """The ``mlcube`` command: ``$BRATS_UGRIP_MLCUBE`` (``run.sh test`` installs one in its own venv, since
    mlcube's pins are not the project's), else next to this Python, else on PATH."""
    beside = Path(sys.executable).with_name(MLCUBE_RUNNER)
    found = os.environ.get("BRATS_UGRIP_MLCUBE") or (str(beside) if beside.is_file() else shutil.which(MLCUBE_RUNNER))
    if found is None:
        raise ConfigError("mlcube", "the mlcube command is not installed; pip install mlcube==0.0.9 "
                          "mlcube-docker==0.0.9 (a separate venv is fine: put its bin/ on PATH)")
    return found


def mlcube_run_argv(layout: PackageLayout, data: Path, output: Path, runner: str | None = None,
                    extra: Sequence[str] = ()) -> list[str]:
    """``mlcube run`` of the MLCube form (module docstring); ``extra`` adds options such as
    ``-Pdocker.cpu_args=-u 1001:1001``."""
    return [runner or mlcube_runner(), "run", f"--mlcube={layout.mlcube_yaml.parent}", "--task=infer",
            "--platform=docker", "--network=none", *extra,
            f"data_path={Path(data).resolve()}", f"output_path={Path(output).resolve()}"]


def run_logged(argv: Sequence[str], timeout: float, cwd: Path | None = None) -> tuple[int, list[str]]:
    """Run ``argv`` with stdout and stderr together; ``(exit code, output lines)``, exit code -9 after ``timeout``."""
    # Without PYTHONPATH: a checkout on it would shadow the PyPI `mlcube` package with this repository's mlcube/.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    try:
        result = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", timeout=timeout, cwd=cwd, env=env)
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout if isinstance(expired.stdout, str) else (expired.stdout or b"").decode(errors="replace")
        return -9, output.splitlines()
    return result.returncode, result.stdout.splitlines()
