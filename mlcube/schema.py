"""The formats of a MedPerf model package, as code: ``mlcube.yaml`` (MLCube form) and ``container_config.yaml``
(MedPerf container form, 2025+), and the contract of the model task ``infer`` both must declare.

Neither format is validated by its own tooling at submission time: the PyPI ``mlcube`` package accepts unknown keys
and wrong types, and MedPerf's container parser checks only a few fields. Mistakes then surface on the organisers'
machines. :func:`validate_package` finds them locally; every problem is one line ``key.path: what is wrong``.

Where the formats come from (mlcommons/mlcube and mlcommons/medperf on GitHub):

* ``mlcube.yaml`` top level, ``platform`` and task parameters (``type`` file | directory, ``default``, ``opts``
  ro | rw; a bare string is a default path, a trailing ``/`` marks a directory): mlcube
  ``docs/getting-started/mlcube-configuration.md`` and ``mlcube/mlcube/config.py`` (``MLCubeConfig.check_parameters``).
* ``docker`` keys: mlcube ``runners/mlcube_docker/mlcube_docker/docker_run.py`` (``Config.DEFAULT``; the runner
  rejects other keys when it runs, ``build_strategy`` is pull | auto | always).
* The model task ``infer`` (inputs ``data_path`` a directory, ``parameters_file`` which MUST be ``parameters.yaml``,
  model files under ``additional_files``; output ``output_path`` a directory): medperf
  ``cli/medperf/templates/model_mlcube`` (removed in "Support bare docker (#642)") and ``examples/BraTS*/``.
* ``container_config.yaml``: medperf ``cli/medperf/templates/model_container/.../container_config.yaml`` (volumes
  under ``/mlcommons/volumes``), ``cli/medperf/containers/parsers/simple_container.py`` (``image``, ``tasks``, volume
  ``type`` file | directory and ``mount_path``), ``cli/medperf/containers/runners/utils.py`` (allowed ``run_args``)
  and ``cli/medperf/enums.py`` (``container_type``).
"""
from __future__ import annotations

import math
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from brats_ugrip.errors import ConfigError
from brats_ugrip.files import read_yaml

# --- the model task contract ------------------------------------------------------------------------------------

INFER_TASK = "infer"
INFER_INPUTS: dict[str, str] = {"data_path": "directory", "parameters_file": "file", "additional_files": "directory"}
INFER_OUTPUTS: dict[str, str] = {"output_path": "directory"}
"""Parameters of the ``infer`` task and their types; ``project/mlcube.py infer`` takes one ``--<name>`` option each."""
PARAMETERS_FILE = "parameters.yaml"
CONTAINER_MOUNTS: dict[str, str] = {
    "data_path": "/mlcommons/volumes/data",
    "parameters_file": "/mlcommons/volumes/parameters/parameters_file.yaml",
    "additional_files": "/mlcommons/volumes/additional_files",
    "output_path": "/mlcommons/volumes/predictions",
}
"""Mount points of MedPerf's model container template."""
CONTAINER_TYPES = ("DockerImage", "DockerArchive", "EncryptedDockerArchive", "SingularityFile",
                   "EncryptedSingularityFile")


# --- a small schema language --------------------------------------------------------------------------------------


class Schema(Protocol):
    def problems(self, value: Any, path: str) -> list[str]:
        """One line per problem of ``value`` found at ``path``; empty when it conforms."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Scalar:
    """A value of one of ``types`` (``bool`` is not an ``int`` here), optionally among ``choices`` and passing ``rule``
    (which returns a problem or None)."""

    types: tuple[type, ...]
    name: str
    choices: tuple[Any, ...] = ()
    rule: Callable[[Any], str | None] | None = None

    def problems(self, value: Any, path: str) -> list[str]:
        if isinstance(value, bool) and bool not in self.types or not isinstance(value, self.types):
            return [f"{path}: expected {self.name}, got {_show(value)}"]
        if self.choices and value not in self.choices:
            return [f"{path}: expected one of {', '.join(map(repr, self.choices))}, got {_show(value)}"]
        problem = self.rule(value) if self.rule else None
        return [f"{path}: {problem}"] if problem else []


@dataclass(frozen=True)
class Mapping:
    """A mapping with ``required`` and ``optional`` keys; any other key is an error unless ``values`` gives the
    schema of free-named entries (task names, volume names)."""

    required: dict[str, Schema] = field(default_factory=dict)
    optional: dict[str, Schema] = field(default_factory=dict)
    values: Schema | None = None

    def problems(self, value: Any, path: str) -> list[str]:
        if not isinstance(value, dict):
            return [f"{path or '<root>'}: expected a mapping, got {_show(value)}"]
        known = {**self.required, **self.optional}
        found = [f"{_join(path, key)}: required key missing" for key in self.required if key not in value]
        for key, item in value.items():
            schema = known.get(key, self.values)
            if schema is None:
                found.append(f"{_join(path, key)}: unknown key; valid keys here are {', '.join(known)}")
            else:
                found += schema.problems(item, _join(path, key))
        return found


@dataclass(frozen=True)
class ListOf:
    item: Schema

    def problems(self, value: Any, path: str) -> list[str]:
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {_show(value)}"]
        return [p for i, item in enumerate(value) for p in self.item.problems(item, f"{path}[{i}]")]


@dataclass(frozen=True)
class AnyOf:
    """The first option that accepts the value wins; otherwise the problems of the option named by ``pick``
    (the one the value was most likely meant to be) are reported."""

    options: tuple[Schema, ...]
    pick: Callable[[Any], int] = lambda value: 0

    def problems(self, value: Any, path: str) -> list[str]:
        results = [option.problems(value, path) for option in self.options]
        return [] if any(not r for r in results) else results[self.pick(value)]


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


STRING = Scalar((str,), "a string")
TEXT = Scalar((str,), "a non-empty string", rule=lambda v: None if v.strip() else "must not be empty")
NUMBER = Scalar((int, float), "a number", rule=lambda v: None if math.isfinite(v) and v >= 0 else "must be ≥ 0")
BOOL = Scalar((bool,), "true or false")
COUNT = Scalar((int,), "an integer", rule=lambda v: None if v >= 0 else "must be ≥ 0")
NULL_OR_STRING = Scalar((str, type(None)), "a string or null")
ANY_MAPPING = Mapping(values=Scalar((str, int, float, bool), "a string, number or boolean"))


def _absolute(value: str) -> str | None:
    return None if PurePosixPath(value).is_absolute() else "must be an absolute path inside the container"


# mlcube.yaml -----------------------------------------------------------------------------------------------------

PARAMETER_DEFINITION = Mapping(optional={"type": Scalar((str,), "a string", ("file", "directory", "unknown")),
                                         "default": TEXT, "opts": Scalar((str,), "a string", ("ro", "rw"))})
PARAMETER = AnyOf((TEXT, PARAMETER_DEFINITION), pick=lambda value: 1 if isinstance(value, dict) else 0)
MLCUBE_TASK = Mapping(optional={
    "entrypoint": TEXT,
    "parameters": Mapping(optional={"inputs": Mapping(values=PARAMETER), "outputs": Mapping(values=PARAMETER)}),
})
MLCUBE_YAML = Mapping(
    required={
        "name": TEXT,
        "docker": Mapping(required={"image": TEXT}, optional={
            "docker": TEXT, "env_args": AnyOf((ANY_MAPPING, STRING)), "gpu_args": STRING, "cpu_args": STRING,
            "build_args": AnyOf((ANY_MAPPING, STRING)), "build_context": TEXT, "build_file": TEXT,
            "build_strategy": Scalar((str,), "a string", ("pull", "auto", "always")),
            "--network": NULL_OR_STRING, "--security-opt": NULL_OR_STRING, "--gpus": NULL_OR_STRING,
            "--memory": NULL_OR_STRING, "--cpuset-cpus": NULL_OR_STRING, "--mount_opts": STRING}),
        "tasks": Mapping(values=MLCUBE_TASK),
    },
    optional={
        "description": STRING,
        "authors": ListOf(Mapping(required={"name": TEXT}, optional={"email": STRING, "org": STRING})),
        "platform": Mapping(optional={"accelerator_count": COUNT, "accelerator_maker": STRING,
                                      "accelerator_model": STRING, "host_memory_gb": NUMBER,
                                      "need_internet_access": BOOL, "host_disk_space_gb": NUMBER}),
        "singularity": Mapping(required={"image": TEXT}, optional={"singularity": TEXT, "build_args": STRING,
                                                                   "build_file": TEXT, "build_context": TEXT}),
    },
)

# container_config.yaml --------------------------------------------------------------------------------------------

VOLUME = Mapping(required={"mount_path": Scalar((str,), "a string", rule=_absolute),
                           "type": Scalar((str,), "a string", ("file", "directory"))})
CONTAINER_TASK = Mapping(optional={
    "input_volumes": Mapping(values=VOLUME),
    "output_volumes": Mapping(values=VOLUME),
    "run_args": Mapping(optional={"command": AnyOf((TEXT, ListOf(STRING)), pick=lambda v: int(isinstance(v, list))),
                                  "entrypoint": TEXT, "shm_size": TEXT,
                                  "gpus": AnyOf((COUNT, TEXT), pick=lambda v: int(isinstance(v, str))),
                                  "environment": ANY_MAPPING}),
})
CONTAINER_CONFIG = Mapping(required={"container_type": Scalar((str,), "a string", CONTAINER_TYPES), "image": TEXT,
                                     "tasks": Mapping(values=CONTAINER_TASK)})


# --- the model task ------------------------------------------------------------------------------------------------


def parameter_type(definition: Any) -> str:
    """The type MLCube gives a task parameter: declared, else ``directory`` for a path ending in ``/``."""
    if isinstance(definition, dict):
        declared = definition.get("type", "unknown")
        default = str(definition.get("default", ""))
    else:
        declared, default = "unknown", str(definition)
    return "directory" if declared == "unknown" and default.endswith(("/", "\\")) else declared


def parameter_default(name: str, definition: Any) -> str:
    """The path of a task parameter relative to the workspace (MLCube uses the parameter's name when none is given)."""
    return str(definition.get("default", name)) if isinstance(definition, dict) else str(definition)


def _infer_task_problems(tasks: dict[str, Any], where: str) -> list[str]:
    if INFER_TASK not in tasks:
        return [f"{where}: has no `{INFER_TASK}` task; a MedPerf model runs `{INFER_TASK}` (tasks found: "
                f"{', '.join(map(str, tasks)) or 'none'})"]
    return []


def _names_problems(path: str, found: dict[str, Any], expected: dict[str, str], type_of: Callable[[Any], str]) -> list[str]:
    problems = [f"{path}.{name}: required ({kind}) for the MedPerf model task" for name, kind in expected.items()
                if name not in found]
    problems += [f"{path}.{name}: not a parameter of `project/mlcube.py {INFER_TASK}` (it takes "
                 f"{', '.join(INFER_INPUTS | INFER_OUTPUTS)})" for name in found if name not in expected]
    problems += [f"{path}.{name}: must be a {kind}, got type {type_of(found[name])!r}"
                 for name, kind in expected.items() if name in found and not _type_fits(type_of(found[name]), kind)]
    return problems


def _type_fits(found: str, expected: str) -> bool:
    # MedPerf's templates write `parameters_file: parameters.yaml`: MLCube types such a path "unknown" and mounts it
    # as a file. A directory must say so (declared, or a trailing `/`).
    return found == expected or (expected == "file" and found == "unknown")


def mlcube_yaml_problems(config: Any) -> list[str]:
    """Problems of a loaded ``mlcube.yaml`` as a MedPerf model MLCube."""
    problems = MLCUBE_YAML.problems(config, "")
    tasks = config.get("tasks") if isinstance(config, dict) else None
    if not isinstance(tasks, dict):
        return problems
    problems += _infer_task_problems(tasks, "tasks")
    task = tasks.get(INFER_TASK)
    if not isinstance(task, dict) or MLCUBE_TASK.problems(task, ""):
        return problems  # already reported by the schema
    parameters = task.get("parameters") or {}
    inputs, outputs = parameters.get("inputs") or {}, parameters.get("outputs") or {}
    base = f"tasks.{INFER_TASK}.parameters"
    problems += _names_problems(f"{base}.inputs", inputs, INFER_INPUTS, parameter_type)
    problems += _names_problems(f"{base}.outputs", outputs, INFER_OUTPUTS, parameter_type)
    if "parameters_file" in inputs and parameter_default("parameters_file", inputs["parameters_file"]) != PARAMETERS_FILE:
        problems.append(f"{base}.inputs.parameters_file: must be {PARAMETERS_FILE!r} (MedPerf writes the parameters "
                        "there)")
    return problems


def infer_command(config: dict[str, Any]) -> list[str]:
    """The arguments the container's entry point receives for ``infer`` in the container form."""
    command = (((config.get("tasks") or {}).get(INFER_TASK) or {}).get("run_args") or {}).get("command") or []
    return shlex.split(command) if isinstance(command, str) else list(command)


def container_volumes(config: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``{name: {"mount_path", "type", "direction" ("input" | "output")}}`` of the ``infer`` task."""
    task = (config.get("tasks") or {}).get(INFER_TASK) or {}
    return {name: {**volume, "direction": direction}
            for direction in ("input", "output") for name, volume in (task.get(f"{direction}_volumes") or {}).items()}


def command_options(arguments: list[str]) -> dict[str, str]:
    """``--name value`` and ``--name=value`` options of a command line, by name."""
    options: dict[str, str] = {}
    position = 0
    while position < len(arguments):
        token = arguments[position]
        if token.startswith("--"):
            name, equals, value = token[2:].partition("=")
            if not equals and position + 1 < len(arguments):
                position += 1
                value = arguments[position]
            options[name] = value
        position += 1
    return options


def container_config_problems(config: Any) -> list[str]:
    """Problems of a loaded ``container_config.yaml`` as a MedPerf model container."""
    problems = CONTAINER_CONFIG.problems(config, "")
    if not isinstance(config, dict) or not isinstance(config.get("tasks"), dict):
        return problems
    problems += _infer_task_problems(config["tasks"], "tasks")
    task = config["tasks"].get(INFER_TASK)
    if not isinstance(task, dict) or CONTAINER_TASK.problems(task, ""):
        return problems
    base = f"tasks.{INFER_TASK}"
    type_of = lambda volume: volume.get("type")  # noqa: E731
    problems += _names_problems(f"{base}.input_volumes", task.get("input_volumes") or {}, INFER_INPUTS, type_of)
    problems += _names_problems(f"{base}.output_volumes", task.get("output_volumes") or {}, INFER_OUTPUTS, type_of)
    volumes = container_volumes(config)
    mounts = [v["mount_path"] for v in volumes.values()]
    problems += [f"{base}: mount path {m!r} is used by more than one volume" for m in sorted(set(mounts))
                 if mounts.count(m) > 1]
    # The entry point gets no arguments but this command: it must hand every volume to `infer`.
    arguments = infer_command(config)
    if not arguments or arguments[0] != INFER_TASK:
        problems.append(f"{base}.run_args.command: must start with `{INFER_TASK}` and pass each volume as "
                        f"--<name>=<mount_path>, got {_show(arguments)}")
        return problems
    options = command_options(arguments[1:])
    for name, volume in volumes.items():
        if options.get(name) != volume["mount_path"]:
            problems.append(f"{base}.run_args.command: must pass --{name}={volume['mount_path']} (the volume's mount "
                            f"path), got {'--' + name + '=' + options[name] if name in options else 'nothing'}")
    return problems


# --- files ---------------------------------------------------------------------------------------------------------


def load_yaml(path: Path) -> tuple[Any, list[str]]:
    """``(content, problems)`` of a YAML file; content is None when it cannot be read."""
    try:
        return read_yaml(path), []
    except ConfigError as error:
        return None, [str(error)]


@dataclass(frozen=True)
class PackageLayout:
    """Where the parts of a package built by ``mlcube/build.py`` are."""

    root: Path

    @property
    def mlcube_yaml(self) -> Path:
        return self.root / "mlcube" / "mlcube.yaml"

    @property
    def workspace(self) -> Path:
        return self.root / "mlcube" / "workspace"

    @property
    def parameters(self) -> Path:
        return self.workspace / PARAMETERS_FILE

    @property
    def additional_files(self) -> Path:
        return self.workspace / "additional_files"

    @property
    def container_config(self) -> Path:
        return self.root / "container_config.yaml"

    @property
    def project(self) -> Path:
        return self.root / "project"

    @property
    def entrypoint(self) -> Path:
        return self.project / "mlcube.py"


def validate_package(root: str | os.PathLike[str]) -> list[str]:
    """Every problem of a built package: both YAML files against their schema and the model task, the files they
    point to, and the two forms declaring the same task. Each line starts with the file at fault."""
    layout = PackageLayout(Path(root))
    problems: list[str] = []
    mlcube, found = load_yaml(layout.mlcube_yaml)
    problems += found + [f"{layout.mlcube_yaml}: {p}" for p in (mlcube_yaml_problems(mlcube) if not found else [])]
    container, found = load_yaml(layout.container_config)
    problems += found + [f"{layout.container_config}: {p}" for p in
                         (container_config_problems(container) if not found else [])]
    for path in (layout.parameters, layout.additional_files, layout.entrypoint):
        if not path.exists():
            problems.append(f"{path}: missing from the package")
    if isinstance(mlcube, dict) and isinstance(mlcube.get("docker"), dict):
        docker = mlcube["docker"]
        recipe = layout.mlcube_yaml.parent / docker.get("build_context", ".") / docker.get("build_file", "Dockerfile")
        if not recipe.is_file():
            problems.append(f"{layout.mlcube_yaml}: docker.build_context/build_file point to {recipe}, which does not exist")
        if isinstance(container, dict) and container.get("image") != docker.get("image"):
            problems.append(f"{layout.container_config}: image {container.get('image')!r} differs from mlcube.yaml's "
                            f"docker.image {docker.get('image')!r}; one build serves both forms")
    return problems
