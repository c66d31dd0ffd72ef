"""Build a registry-free CPU base image for model packages: Debian 12 + a venv holding the pinned CPU torch.

    python mlcube/base_image.py [--name brats-ugrip-base:cpu] [--mirror URL] [--torch-wheels DIR] [--force]

Contract: when it returns, the Docker image ``--name`` exists locally and holds ``/opt/venv`` (on ``PATH``) with
torch at the version installed here (the project's pin); ``python3`` is Debian's 3.11. Nothing is pulled from an
image registry, so it works where none is reachable (CI, air-gapped sites); only Debian's mirror (for
``debootstrap``) and the host's pip sources (for the torch wheel) are used. An image of that name that exists
already is kept as it is (``--force`` rebuilds it). Needs root (``debootstrap``) and a running engine
(``mlcube/container_engine.sh``); ``debootstrap`` is installed with apt when missing.

1. ``debootstrap --variant=minbase --include=python3,python3-venv bookworm ROOTFS`` (Debian's packages, ~1 min);
2. ``tar -C ROOTFS -c . | docker import - brats-ugrip-rootfs:bookworm``;
3. ``pip download torch==<pin>`` on the host into a build context, and ``docker build --network none`` of a
   Dockerfile that makes ``/opt/venv`` and installs torch from it with ``pip install --no-index``.

It is the base for tests and CPU-only sites: ``mlcube/build.py --base-image brats-ugrip-base:cpu``. Real
submissions keep the CUDA ``pytorch/pytorch`` base (build.py's default).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from brats_ugrip.errors import BratsUgripError, ConfigError

DEFAULT_NAME = "brats-ugrip-base:cpu"
ROOTFS_IMAGE = "brats-ugrip-rootfs:bookworm"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
IMAGE_PYTHON = "3.11"
"""Debian 12's python3: the wheels downloaded for the image must fit it."""
VENV = "/opt/venv"


class EngineError(BratsUgripError):
    """The container engine or a build tool is missing or failed; the message says what to do."""


def torch_pin() -> str:
    """The torch version installed here without its local label (``2.13.0`` of ``2.13.0+cpu``): the project's pin."""
    return importlib.metadata.version("torch").split("+")[0]


def run_tool(command: Sequence[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``command``; a missing tool or a failure is an :class:`EngineError` naming ``what`` with the output's tail."""
    try:
        result = subprocess.run(list(command), capture_output=True, text=True, errors="replace", **kwargs)
    except FileNotFoundError:
        raise EngineError(f"{what}: {command[0]} is not installed") from None
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise EngineError(f"{what} failed (exit {result.returncode}): {' '.join(command[:6])} ...\n{tail}")
    return result


def engine_problem() -> str | None:
    """Why no container can be built or run here (None when ``docker info`` answers)."""
    if shutil.which("docker") is None:
        return "no docker command; start an engine with mlcube/container_engine.sh (root, Debian) or install Docker"
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer in 30 s; check the engine (mlcube/container_engine.sh starts one)"
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no answer"])[-1]
        return f"`docker info` fails ({reason}); start the engine with mlcube/container_engine.sh (root)"
    return None


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def ensure_debootstrap() -> str:
    """The path of ``debootstrap``, installed with apt when missing (root only)."""
    found = shutil.which("debootstrap") or (os.path.exists("/usr/sbin/debootstrap") and "/usr/sbin/debootstrap")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise EngineError("debootstrap is not installed; install it (sudo apt-get install debootstrap) and run "
                          "this as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_tool(["apt-get", "update", "-qq"], "apt-get update", env=env)
    run_tool(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"],
             "apt-get install debootstrap", env=env)
    return shutil.which("debootstrap") or "/usr/sbin/debootstrap"


def import_rootfs(mirror: str, work: Path) -> None:
    """Steps 1-2 of the module docstring: a minimal Debian root file system, imported as :data:`ROOTFS_IMAGE`."""
    if os.geteuid() != 0:
        raise EngineError("debootstrap needs root; run mlcube/base_image.py as root (or sudo)")
    rootfs = work / "rootfs"
    run_tool([ensure_debootstrap(), "--variant=minbase", "--include=python3,python3-venv", SUITE, str(rootfs),
              mirror], f"debootstrap {SUITE} from {mirror}")
    # apt's downloaded .debs and lists are not needed in the image: 50+ MB less.
    for cache in (rootfs / "var/cache/apt/archives", rootfs / "var/lib/apt/lists"):
        for entry in cache.glob("*"):
            if entry.is_file():
                entry.unlink()
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        imported = subprocess.run(["docker", "import", "--change", "ENV LANG=C.UTF-8", "-", ROOTFS_IMAGE],
                                  stdin=tar.stdout, capture_output=True, text=True)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
    if imported.returncode != 0 or tar.returncode != 0:
        raise EngineError(f"docker import of the root file system failed: {imported.stderr.strip()}")


def base_dockerfile(torch_version: str) -> str:
    return f"""\
# brats-ugrip CPU base (mlcube/base_image.py): Debian {SUITE} + {VENV} with torch {torch_version}, built offline.
FROM {ROOTFS_IMAGE}
COPY wheels /tmp/wheels
RUN python3 -m venv {VENV} \\
    && {VENV}/bin/python -m pip install --no-cache-dir --no-index --find-links /tmp/wheels torch=={torch_version} \\
    && rm -rf /tmp/wheels
ENV PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8
LABEL org.brats-ugrip.base="cpu" org.brats-ugrip.torch="{torch_version}"
"""


def download_torch(wheels: Path, version: str) -> None:
    """``pip download torch==version`` (and its dependencies) for the image's Python, with the host's pip sources."""
    from brats_ugrip.mlcube.wheelhouse import target_pip_options

    run_tool([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", f"torch=={version}",
              "-d", str(wheels), *target_pip_options()], f"pip download torch=={version}")


def build_base_image(name: str = DEFAULT_NAME, mirror: str = DEFAULT_MIRROR, torch_wheels: Path | None = None,
                     force: bool = False) -> bool:
    """Build the base image (module docstring); False when ``name`` exists already and ``force`` is not set."""
    problem = engine_problem()
    if problem:
        raise EngineError(problem)
    if image_exists(name) and not force:
        return False
    version = torch_pin()
    with tempfile.TemporaryDirectory(prefix="brats-ugrip-base-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        if force or not image_exists(ROOTFS_IMAGE):
            import_rootfs(mirror, work)
        context = work / "context"
        (context / "wheels").mkdir(parents=True)
        if torch_wheels is not None:
            if not Path(torch_wheels).is_dir():
                raise ConfigError("--torch-wheels", f"{torch_wheels} is not a folder of wheels")
            for wheel in Path(torch_wheels).glob("*.whl"):
                shutil.copy2(wheel, context / "wheels" / wheel.name)
        else:
            download_torch(context / "wheels", version)
        (context / "Dockerfile").write_text(base_dockerfile(version))
        run_tool(["docker", "build", "--network", "none", "-t", name, str(context)], f"docker build of {name}")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    from brats_ugrip.cli import console

    parser = argparse.ArgumentParser(prog="python mlcube/base_image.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"image to build (default {DEFAULT_NAME})")
    parser.add_argument("--mirror", default=os.environ.get("BRATS_UGRIP_DEBIAN_MIRROR", DEFAULT_MIRROR),
                        help="Debian mirror for debootstrap (default $BRATS_UGRIP_DEBIAN_MIRROR or deb.debian.org)")
    parser.add_argument("--torch-wheels", type=Path, help="folder holding the torch wheel and its dependencies "
                        "(default: pip download them here)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the image exists")
    args = parser.parse_args(argv)
    built = build_base_image(args.name, args.mirror, args.torch_wheels, args.force)
    console.print(f"{'built' if built else 'kept the existing'} base image {args.name}; use it with "
                  f"python mlcube/build.py ... --base-image {args.name}", highlight=False)
    return 0


if __name__ == "__main__":
    from brats_ugrip.cli import run

    run(main)
