"""Build a MedPerf model package from a single model, a soup or an ensemble spec.

    python mlcube/build.py --model soup.ckpt|ensemble.yaml --challenge brats2024-ssa --out build/mlcube \\
        [--image REGISTRY/NAME:TAG] [--base-image pytorch/pytorch:TAG] [--accelerator-count 1] [--force]

writes MedPerf's model layout, one build for both submission forms:

    OUT/mlcube/mlcube.yaml                   MLCube form: task `infer` (data_path, parameters_file,
                                             additional_files → output_path), platform, docker image and build
    OUT/mlcube/workspace/parameters.yaml     the inference: models and their weights per region, window, overlap,
                                             TTA, thresholds, post-processing, label scheme (editable, no rebuild)
    OUT/mlcube/workspace/additional_files/   model-<i>.safetensors (weights, no pickles) + model-<i>.json (metadata)
    OUT/container_config.yaml                MedPerf container form (2025+): the same task, volumes under
                                             /mlcommons/volumes
    OUT/project/                             Docker build context: Dockerfile (CUDA PyTorch base, non-root),
                                             requirements.txt (pinned), wheelhouse/ (every requirement but torch,
                                             as wheels: the build needs no network), mlcube.py (typer app),
                                             runtime.py and the brats_ugrip modules it imports

Every file of the package is readable by any user (files 0644, folders 0755): the container may run as any uid.

A checkpoint (a run's best.ckpt, a soup) is packaged as an ensemble of one with its own inference settings and
threshold; an ensemble spec (``ensembling/``) as it is. Check the result without Docker with
``python mlcube/check.py OUT --data CASES [--labels REFERENCES]``; mlcube/README.md says how to build and test the
image.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from brats_ugrip.atomic import atomic_write_text
from brats_ugrip.cli import console, run
from brats_ugrip.errors import BratsUgripError, ConfigError
from brats_ugrip.metrics.lesionwise import LESIONWISE_PRESETS
from brats_ugrip.mlcube.schema import (
    CONTAINER_MOUNTS,
    INFER_INPUTS,
    INFER_OUTPUTS,
    INFER_TASK,
    PARAMETERS_FILE,
    PackageLayout,
    validate_package,
)
from brats_ugrip.mlcube.wheelhouse import REQUIREMENTS as WHEELHOUSE_REQUIREMENTS
from brats_ugrip.mlcube.wheelhouse import WHEELHOUSE, write_wheelhouse
from brats_ugrip.sweeps.layout import RUNS_DIR

CHALLENGES: tuple[str, ...] = (*LESIONWISE_PRESETS, "brats2025")
"""Challenges a package can be built for; each is also the metric set ``mlcube/check.py`` scores with."""
OUTPUT_SCHEME = "brats2023"
"""Labels of BraTS 2023+ predictions: 1 NETC, 2 SNFH, 3 ET (models predict regions, so any training scheme fits)."""
if TYPE_CHECKING:  # torch is imported when a package is built, not for --help
    from brats_ugrip.ensembling.predict import Ensemble
    from brats_ugrip.ensembling.spec import EnsembleSpec

HERE = Path(__file__).resolve().parent
PROJECT_SOURCES = {"mlcube.py": HERE / "entrypoint.py", "runtime.py": HERE / "runtime.py"}
"""``project/`` files copied from this folder; the brats_ugrip modules they import are copied along."""
PACKAGED_META_KEYS = ("format", "model", "config", "fold", "epoch", "step", "val_metrics", "val_epoch", "git_commit",
                      "init_id", "weights", "created")
CONTAINER_PROJECT = "/mlcube_project"
MLCUBE_DEFAULTS = {"data_path": "data", "parameters_file": PARAMETERS_FILE, "additional_files": "additional_files",
                   "output_path": "predictions"}
"""Workspace paths of the task's parameters in ``mlcube.yaml`` (where MedPerf puts them)."""


# --- the models ---------------------------------------------------------------------------------------------------


def load_source(model: Path) -> Ensemble:
    from brats_ugrip.ensembling.predict import Ensemble
    from brats_ugrip.ensembling.spec import EnsembleMember, EnsembleSpec

    """The ensemble to package, loaded on the CPU and checked: an ensemble spec (``.yaml``) or one checkpoint (an
    ensemble of one with the checkpoint's threshold). Output labels are :data:`OUTPUT_SCHEME`."""
    if model.suffix in (".yaml", ".yml"):
        spec = dataclasses.replace(EnsembleSpec.load(model), label_scheme=OUTPUT_SCHEME)
        return Ensemble(spec)
    ensemble = Ensemble(EnsembleSpec([EnsembleMember(model.resolve())], label_scheme=OUTPUT_SCHEME))
    threshold = ensemble.members[0].settings.threshold
    return ensemble.with_spec(dataclasses.replace(ensemble.spec, thresholds=(threshold,) * 3))


PATH_KEYS = (("run_dir",), ("data", "datalist"), ("data", "data_root"), ("data", "cache_dir"),
             ("finetune", "init_from"))
"""Config values that are paths on the training machine (a user's home or project folder on a cluster)."""


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without the training machine's absolute paths: a run directory becomes ``runs/<run id>`` (its
    place in a sweep), every other path its file name. Hashes (weights, config) are kept elsewhere, unchanged."""
    config = {key: dict(value) if isinstance(value, dict) else value for key, value in config.items()}
    for keys in PATH_KEYS:
        holder = config
        for key in keys[:-1]:
            holder = holder.get(key) if isinstance(holder.get(key), dict) else {}
        value = holder.get(keys[-1])
        if isinstance(value, str) and value:
            path = Path(value)
            in_sweep = keys == ("run_dir",) and path.parent.name == RUNS_DIR
            holder[keys[-1]] = f"{RUNS_DIR}/{path.name}" if in_sweep else path.name
    return config


def package_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """What a package keeps of a checkpoint's metadata: architecture, config (without the training machine's paths),
    provenance and scores; of a soup's ``soup`` record, the method and sizes (not the ingredients' paths)."""
    packaged = {key: meta[key] for key in PACKAGED_META_KEYS if key in meta}
    if isinstance(packaged.get("config"), dict):
        packaged["config"] = portable_config(packaged["config"])
    if isinstance(meta.get("soup"), dict):
        packaged["soup"] = {key: meta["soup"].get(key) for key in ("method", "kept", "score")}
        packaged["soup"]["ingredients"] = len(meta["soup"].get("ingredients") or [])
    return packaged


def write_models(ensemble: Ensemble, additional_files: Path) -> EnsembleSpec:
    """Write each model's weights and metadata; returns the spec of the packaged models, with every inference
    setting written out (what ``parameters.yaml`` holds)."""
    from brats_ugrip.ensembling.spec import INFERENCE_KEYS, EnsembleMember
    from brats_ugrip.mlcube.runtime import save_packaged_model

    members = []
    for i, (loaded, member) in enumerate(zip(ensemble.members, ensemble.spec.members)):
        path = save_packaged_model(additional_files / f"model-{i}.safetensors", loaded.model,
                                   package_meta(loaded.meta), source=loaded.path.name)
        settings = {key: getattr(loaded.settings, key) for key in INFERENCE_KEYS}
        members.append(EnsembleMember(path, member.weights, settings))
    return dataclasses.replace(ensemble.spec, members=members)


def parameters_text(spec: EnsembleSpec, challenge: str, additional_files: Path) -> str:
    values = {"challenge": challenge, **spec.to_dict(additional_files)}
    return ("# brats-ugrip model package parameters (read by project/runtime.py; see mlcube/README.md).\n"
            "# An ensemble spec (ensembling/spec.py): models are the files in additional_files, each with its\n"
            "# weights per region (TC, WT, ET) and sliding-window settings; thresholds per region; post-processing.\n"
            "# A single model or a soup is an ensemble of one. Change values here without rebuilding the image.\n"
            + yaml.safe_dump(values, sort_keys=False))


# --- the project folder -------------------------------------------------------------------------------------------


def imported_names(path: Path) -> set[str]:
    """Every absolute import of a Python file, lazy ones included: ``a.b`` for ``import a.b`` and both ``a`` and
    ``a.b`` for ``from a import b`` (``b`` may be a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def module_file(name: str) -> tuple[Path, Path] | None:
    """``(path inside the package, source file)`` of the module or package ``name`` as Python imports it (a package
    gives its ``__init__.py``); None when ``name`` is not a module (``from a import b`` with ``b`` an attribute).

    Found by import (:func:`importlib.util.find_spec`), not by folder: ``brats_ugrip.ensembling.spec`` lives in the
    checkout's ``ensembling/`` folder, and in an installed wheel under ``brats_ugrip/``."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    inside = Path(*name.split("."))
    inside = inside / "__init__.py" if spec.submodule_search_locations is not None else inside.with_suffix(".py")
    return inside, Path(spec.origin)


def library_files(entries: Iterable[Path], package: str = "brats_ugrip") -> dict[Path, Path]:
    """The modules of ``package`` that ``entries`` import, directly or through each other, with their packages'
    ``__init__.py``: ``{path inside the built project: source}``."""
    found: dict[Path, Path] = {}
    todo = list(entries)
    while todo:
        for name in imported_names(todo.pop()):
            parts = name.split(".")
            if parts[0] != package:
                continue
            for depth in range(1, len(parts) + 1):  # the package, its subpackages, then the module itself
                located = module_file(".".join(parts[:depth]))
                if located is not None and located[0] not in found:
                    found[located[0]] = located[1]
                    todo.append(located[1])
    return found


def pinned_requirements(files: Iterable[Path]) -> list[str]:
    """``name==version`` of the installed distributions that ``files`` import (the versions this build was made and
    checked with; local version labels such as ``+cpu`` dropped)."""
    providers = importlib.metadata.packages_distributions()
    local = {"brats_ugrip", *(Path(name).stem for name in PROJECT_SOURCES)}
    pins: set[str] = set()
    for path in files:
        for top in {name.split(".")[0] for name in imported_names(path)}:
            if top in sys.stdlib_module_names or top in local:
                continue
            if top not in providers:
                raise ConfigError("requirements", f"{path} imports {top!r}, which no installed distribution provides")
            pins |= {f"{dist}=={importlib.metadata.version(dist).split('+')[0]}" for dist in providers[top]}
    return sorted(pins, key=str.lower)


def default_base_image() -> str:
    return f"pytorch/pytorch:{importlib.metadata.version('torch').split('+')[0]}-cuda12.8-cudnn9-runtime"


def dockerfile_text(base_image: str, challenge: str, torch_version: str) -> str:
    """The Dockerfile: nothing in it reaches the network (``docker build --network none`` works), so any base that
    holds torch ``torch_version`` will do; another torch fails the build with what to do."""
    mismatch = (f"the base image holds torch %s; this package was built and checked with torch {torch_version}: "
                "pick a base image holding it (mlcube/build.py --base-image)")
    check = (f"import sys, torch; v = torch.__version__; sys.exit(0 if v.split('+')[0] == '{torch_version}' "
             f"else '{mismatch}' % v)")
    return f"""\
# brats-ugrip model package ({challenge}), built by mlcube/build.py. See mlcube/README.md.
# The base holds torch (a CUDA PyTorch runtime, or the CPU base of mlcube/base_image.py); every other requirement
# is installed from wheelhouse/ without an index: the build needs no network.
FROM {base_image}

# Nothing is downloaded at run time (MedPerf runs models with --network none). Any cache a library wants goes to /tmp,
# writable for whatever user MedPerf runs the container as (it passes -u <uid>:<gid>). That uid has no entry in
# /etc/passwd: USER and LOGNAME answer getpass.getuser(), which MONAI calls on import (it raises KeyError without).
ENV LANG=C.UTF-8 \\
    USER=brats \\
    LOGNAME=brats \\
    PYTHONDONTWRITEBYTECODE=1 \\
    PYTHONUNBUFFERED=1 \\
    PIP_NO_CACHE_DIR=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    HOME=/tmp \\
    XDG_CACHE_HOME=/tmp/.cache \\
    HF_HUB_OFFLINE=1

COPY {WHEELHOUSE} /tmp/{WHEELHOUSE}
RUN python3 -c "{check}" \\
    && python3 -m pip install --no-cache-dir --no-index --no-deps --find-links /tmp/{WHEELHOUSE} \\
        -r /tmp/{WHEELHOUSE}/{WHEELHOUSE_REQUIREMENTS} \\
    && rm -rf /tmp/{WHEELHOUSE}

# The code only (the wheelhouse is not needed at run time).
COPY requirements.txt mlcube.py runtime.py {CONTAINER_PROJECT}/
COPY brats_ugrip {CONTAINER_PROJECT}/brats_ugrip
RUN python3 -m compileall -q {CONTAINER_PROJECT} \\
    && chmod -R a+rX {CONTAINER_PROJECT} \\
    && useradd --uid 1000 --no-create-home --shell /usr/sbin/nologin brats
USER 1000
WORKDIR {CONTAINER_PROJECT}

ENTRYPOINT ["python3", "{CONTAINER_PROJECT}/mlcube.py"]
"""


def write_project(project: Path, base_image: str, challenge: str) -> list[str]:
    """``project/``: the entry point, the runtime, the brats_ugrip modules they import, requirements, the
    wheelhouse of every requirement but torch (``mlcube/wheelhouse.py``) and the Dockerfile. Returns the pinned
    requirements."""
    project.mkdir(parents=True)
    for name, source in PROJECT_SOURCES.items():
        shutil.copy2(source, project / name)
    library = library_files(PROJECT_SOURCES.values())
    for relative, source in library.items():
        (project / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, project / relative)
    requirements = pinned_requirements([*PROJECT_SOURCES.values(), *library.values()])
    atomic_write_text(project / "requirements.txt", "\n".join(requirements) + "\n")
    write_wheelhouse(project, requirements)
    torch_version = next(pin.split("==")[1] for pin in requirements if pin.startswith("torch=="))
    atomic_write_text(project / "Dockerfile", dockerfile_text(base_image, challenge, torch_version))
    return requirements


def publish_modes(root: Path) -> None:
    """Make every folder 0755 and every file 0644 (0755 when executable): readable by whatever user runs the
    container (MedPerf passes ``-u <uid>:<gid>``, MLCube runs the image's uid 1000), whatever this machine's umask
    and the temporary files' 0600 were."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o755)
        else:
            path.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)


# --- the two descriptions of the task -----------------------------------------------------------------------------


def mlcube_config(challenge: str, image: str, accelerator_count: int, author: str) -> dict[str, Any]:
    """``mlcube.yaml`` (the layout of MedPerf's model MLCube template)."""
    parameter = lambda name, kind: {"type": kind, "default": MLCUBE_DEFAULTS[name]}  # noqa: E731
    return {
        "name": f"brats-ugrip-{challenge}",
        "description": f"brats-ugrip BraTS segmentation model for {challenge}: label maps of the four MR modalities",
        "authors": [{"name": author}],
        "platform": {"accelerator_count": accelerator_count},
        "docker": {"image": image, "build_context": "../project", "build_file": "Dockerfile"},
        "tasks": {INFER_TASK: {"parameters": {
            "inputs": {name: parameter(name, kind) for name, kind in INFER_INPUTS.items()},
            "outputs": {name: parameter(name, kind) for name, kind in INFER_OUTPUTS.items()},
        }}},
    }


def container_config(image: str, accelerator_count: int) -> dict[str, Any]:
    """``container_config.yaml`` (MedPerf's model container template; the entry point gets ``run_args.command``)."""
    command = " ".join([INFER_TASK, *(f"--{name}={CONTAINER_MOUNTS[name]}" for name in (*INFER_INPUTS, *INFER_OUTPUTS))])
    run_args: dict[str, Any] = {"command": command}
    if accelerator_count:
        run_args["gpus"] = accelerator_count
    volume = lambda name, kind: {"mount_path": CONTAINER_MOUNTS[name], "type": kind}  # noqa: E731
    return {"container_type": "DockerImage", "image": image, "tasks": {INFER_TASK: {
        "run_args": run_args,
        "input_volumes": {name: volume(name, kind) for name, kind in INFER_INPUTS.items()},
        "output_volumes": {name: volume(name, kind) for name, kind in INFER_OUTPUTS.items()},
    }}}


def yaml_text(header: str, values: dict[str, Any]) -> str:
    return "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(values, sort_keys=False)


# --- build --------------------------------------------------------------------------------------------------------


def build_package(model: str | os.PathLike[str], challenge: str, out: str | os.PathLike[str],
                  image: str | None = None, base_image: str | None = None, accelerator_count: int = 1,
                  author: str = "brats-ugrip", force: bool = False) -> PackageLayout:
    """Build the package (module docstring) into ``out``, atomically: it is assembled next to ``out``, validated,
    and only then moved into place (replacing an existing ``out`` when ``force``)."""
    from brats_ugrip.mlcube.runtime import load_package

    if challenge not in CHALLENGES:
        raise ConfigError("--challenge", f"unknown challenge {challenge!r}; choose one of {', '.join(CHALLENGES)}")
    if accelerator_count < 0:
        raise ConfigError("--accelerator-count", f"must be ≥ 0, got {accelerator_count}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError("--out", f"{out} exists and is not empty; choose another folder or pass --force to replace it")
    image = image or f"brats-ugrip/{challenge}:{importlib.metadata.version('brats-ugrip')}"
    ensemble = load_source(Path(model))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would otherwise become the package's mode
    try:
        layout = PackageLayout(staging)
        layout.additional_files.mkdir(parents=True)
        spec = write_models(ensemble, layout.additional_files)
        atomic_write_text(layout.parameters, parameters_text(spec, challenge, layout.additional_files))
        # The parameters must reproduce the source's inference exactly.
        reloaded, _ = load_package(layout.parameters, layout.additional_files, "cpu")
        for i, (before, after) in enumerate(zip(ensemble.members, reloaded.members)):
            if before.settings != after.settings:
                raise BratsUgripError(f"models[{i}]: packaged settings {after.settings} differ from {before.settings}")
        write_project(layout.project, base_image or default_base_image(), challenge)
        atomic_write_text(layout.mlcube_yaml, yaml_text(
            "MedPerf model MLCube (layout of MedPerf's model_mlcube template), built by brats-ugrip mlcube/build.py.",
            mlcube_config(challenge, image, accelerator_count, author)))
        atomic_write_text(layout.container_config, yaml_text(
            "MedPerf model container (2025+ form, MedPerf's model_container template), built by brats-ugrip "
            "mlcube/build.py.\nParameters: mlcube/workspace/parameters.yaml; additional files: "
            "mlcube/workspace/additional_files/.", container_config(image, accelerator_count)))
        publish_modes(staging)
        problems = validate_package(staging)
        if problems:
            raise BratsUgripError("the built package does not validate:\n" + "\n".join(problems))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PackageLayout(out)


def image_name(layout: PackageLayout) -> str:
    return yaml.safe_load(layout.mlcube_yaml.read_text())["docker"]["image"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python mlcube/build.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a checkpoint (best.ckpt, soup.ckpt) or an ensemble spec (.yaml)")
    parser.add_argument("--challenge", required=True, choices=CHALLENGES, metavar="CHALLENGE",
                        help=f"one of {', '.join(CHALLENGES)}")
    parser.add_argument("--out", required=True, help="package folder to write (e.g. build/mlcube)")
    parser.add_argument("--image", help="Docker image name (default brats-ugrip/<challenge>:<version>)")
    parser.add_argument("--base-image", help=f"base image holding the pinned torch (default {default_base_image()}, "
                        "CUDA; brats-ugrip-base:cpu from mlcube/base_image.py needs no registry)")
    parser.add_argument("--accelerator-count", type=int, default=1, help="GPUs the task asks for (0: CPU only)")
    parser.add_argument("--author", default="brats-ugrip", help="author name in mlcube.yaml")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    layout = build_package(args.model, args.challenge, args.out, args.image, args.base_image, args.accelerator_count,
                           args.author, args.force)
    models = sorted(p.name for p in layout.additional_files.glob("*.safetensors"))
    console.print(f"built {layout.root} ({len(models)} model(s): {', '.join(models)})\n"
                  f"  check:  python mlcube/check.py {layout.root} --data CASES [--labels REFERENCES]\n"
                  f"  image:  docker build --network none -t {image_name(layout)} "
                  f"{layout.project}", highlight=False)
    return 0


if __name__ == "__main__":
    run(main)
