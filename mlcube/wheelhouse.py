"""The wheelhouse of a package's build context: every runtime requirement but torch, as wheels for the image.

Contract: :func:`write_wheelhouse` fills ``project/wheelhouse/`` with one wheel per distribution of the closure of
the pinned requirements (their dependencies, and theirs, with the markers of the image's Python
:data:`TARGET_PYTHON` on Linux), torch and what only torch needs left out, and writes
``wheelhouse/requirements.txt`` (``name==version`` each, the versions installed here). The Dockerfile installs
exactly that list with ``pip install --no-index --no-deps``, so ``docker build --network none`` works on any base
image that holds the pinned torch (the local CPU base of ``mlcube/base_image.py``, the CUDA ``pytorch/pytorch``).

Wheels come from the host's pip (``pip download --only-binary=:all:`` with the image's platform tags, from its
usual sources); a distribution published only as a source archive is built into a wheel here (``pip wheel``),
which is right for the pure-Python ones such distributions are. The wheels are cached under
``$BRATS_UGRIP_CACHE/wheelhouse/<key>`` (key: the list and the tags), so a second build takes no download.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

from brats_ugrip.errors import BratsUgripError, ConfigError

TARGET_PYTHON = os.environ.get("BRATS_UGRIP_IMAGE_PYTHON", "3.11")
"""The images' Python: Debian 12's python3 (CPU base) and the pytorch/pytorch images' conda Python (set
$BRATS_UGRIP_IMAGE_PYTHON for a base image with another one)."""
PROVIDED_BY_BASE = frozenset({"torch"})
"""Distributions the base image holds: never in the wheelhouse."""
WHEELHOUSE = "wheelhouse"
REQUIREMENTS = "requirements.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_environment() -> dict[str, str]:
    """PEP 508 marker values of the image: CPython :data:`TARGET_PYTHON` on Linux, this machine's architecture."""
    return {"python_version": TARGET_PYTHON, "python_full_version": f"{TARGET_PYTHON}.0", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": platform.machine(),
            "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def target_pip_options() -> list[str]:
    """``pip download`` options for wheels that fit the image (glibc ≥ 2.28 covers Debian 12 and Ubuntu 22.04+;
    pip adds the older manylinux tags and pure-Python wheels itself)."""
    return ["--only-binary=:all:", "--python-version", TARGET_PYTHON, "--implementation", "cp",
            "--abi", f"cp{TARGET_PYTHON.replace('.', '')}", "--platform", f"manylinux_2_28_{platform.machine()}"]


def installed_version(name: str, needed_by: str) -> str:
    try:
        return importlib.metadata.version(name).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("requirements", f"{name} (needed by {needed_by}) is not installed here, so its version "
                          "cannot be pinned; install the runtime requirements first (bash run.sh setup)") from None


def closure(requirements: Iterable[str]) -> dict[str, str]:
    """``{distribution: installed version}`` of ``requirements`` (``name==version``) and everything they depend on
    in the image, torch's own branch left out (:data:`PROVIDED_BY_BASE`)."""
    environment = target_environment()
    todo = [(Requirement(line).name, frozenset(Requirement(line).extras), "requirements.txt") for line in requirements]
    found: dict[str, str] = {}
    extras_seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras, needed_by = todo.pop()
        key = canonical(name)
        if key in PROVIDED_BY_BASE or (key, extras) in extras_seen:
            continue
        extras_seen.add((key, extras))
        found.setdefault(key, installed_version(name, needed_by))
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            marker: Marker | None = requirement.marker
            if marker is not None and not any(marker.evaluate({**environment, "extra": extra})
                                              for extra in (extras or {""})):
                continue
            todo.append((requirement.name, frozenset(requirement.extras), name))
    return dict(sorted(found.items()))


def cache_root() -> Path:
    return Path(os.environ.get("BRATS_UGRIP_CACHE", Path.home() / ".cache" / "brats_ugrip")) / WHEELHOUSE


def pip(arguments: list[str], what: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pip", *arguments, "-q", "--disable-pip-version-check"],
                            capture_output=True, text=True, errors="replace")
    if result.returncode != 0 and what:
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        raise BratsUgripError(f"{what} failed: {tail}\n(the wheelhouse is made with this machine's pip and its "
                              "sources: check that pip can reach them, e.g. pip download numpy)")
    return result


def fill(folder: Path, pins: list[str]) -> None:
    """Download (or build) one wheel per pin into ``folder``: one ``pip download`` for all, then, when that fails,
    each pin alone, building the ones without a fitting wheel."""
    options = ["--no-deps", "-d", str(folder)]
    if pip(["download", *options, *target_pip_options(), *pins], "").returncode == 0:
        return
    for pin in pins:
        if pip(["download", *options, *target_pip_options(), pin], "").returncode != 0:
            pip(["wheel", "--no-deps", "-w", str(folder), pin], f"pip wheel {pin}")


def write_wheelhouse(project: Path, requirements: Iterable[str]) -> list[str]:
    """Fill ``project/wheelhouse`` (module docstring) from the cache, making the cache entry first when missing.
    Returns the pins installed from it."""
    pins = [f"{name}=={version}" for name, version in closure(requirements).items()]
    key = hashlib.sha256("\n".join([*pins, *target_pip_options()]).encode()).hexdigest()[:16]
    cached = cache_root() / key
    if not (cached / REQUIREMENTS).is_file():
        partial = cached.with_name(f".{key}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        fill(partial, pins)
        (partial / REQUIREMENTS).write_text("\n".join(pins) + "\n")
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(partial, cached)  # complete entries only: a build killed half-way leaves a .partial folder
    shutil.copytree(cached, project / WHEELHOUSE, copy_function=link_or_copy)
    return pins


def link_or_copy(source: str, target: str) -> None:
    """A hard link (no second copy of ~100 MB of wheels per build) where the cache is on the same file system."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
