"""What a brats-ugrip model package runs: the packaged weights format and the ``infer`` task.

``mlcube/build.py`` copies this file to ``project/runtime.py`` (with the ``brats_ugrip`` modules it imports), where
``project/mlcube.py infer`` calls :func:`infer`. It imports nothing from the repository but ``brats_ugrip``.

Packaged weights (``additional_files/``), no pickles: per model ``model-<i>.safetensors`` (the network's
``state_dict``) and ``model-<i>.json``::

    {"format": 1, "sha256": <of the .safetensors>, "source": <checkpoint file name>, "meta": <checkpoint metadata:
     model name and settings, run config, fold, scores, init id, soup summary ...>}

``parameters.yaml`` is an ensemble spec (``brats_ugrip.ensembling.spec``) whose model paths are those files, relative to
``additional_files``, with every inference setting written out (window, overlap, TTA, precision), plus
``challenge``. A single model or a soup is an ensemble of one. Editing it changes the inference without rebuilding
the image.

The task: every folder ``data_path/<ID>/`` is a case ``<ID>-{t1c,t1n,t2f,t2w}.nii.gz``; each gives
``output_path/<ID>.nii.gz``, a uint8 label map of the challenge's scheme with the shape and affine of the case's
images (MedPerf's evaluators match predictions by the ``NNNNN-NNN`` number in the name). A case with a missing or
unreadable modality, modalities of different geometry, or an id without that number is reported and skipped; the
others are still written. Runs on the GPU when there is one, else on the CPU; needs no network and writes nothing
but the predictions. It runs as whatever user the container is given (MedPerf: ``-u <uid>:<gid>``; MLCube: the
image's uid 1000): a package file that user cannot read, or an output folder it cannot write, stops the task
with one line naming the path and what to do (exit 2), never a traceback.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from brats_ugrip.atomic import atomic_path, atomic_write_json
from brats_ugrip.checkpoints import build_model
from brats_ugrip.config import apply_overrides, config_from_dict
from brats_ugrip.data import NAMINGS, Case, brats_case_number, check_case
from brats_ugrip.ensembling.predict import Ensemble, LoadedMember, write_prediction
from brats_ugrip.ensembling.spec import EnsembleSpec
from brats_ugrip.errors import BratsUgripError, CheckpointError, ConfigError, DataError
from brats_ugrip.files import read_yaml, sha256_file
from brats_ugrip.inference import CaseResult, inference_settings, predict_cases, prepare_model

PACKAGE_FORMAT = 1
RUNTIME_KEYS = ("challenge",)
"""Keys of ``parameters.yaml`` besides the ensemble spec's."""
INPUT_NAMING = NAMINGS["brats2023"]
"""BraTS 2023+ file names, which MedPerf's BraTS data preparation writes."""
EXIT_CASES_FAILED = 1
EXIT_BAD_PACKAGE = 2

log = logging.getLogger(__name__)


# --- packaged weights ----------------------------------------------------------------------------------------------


def save_packaged_model(path: str | os.PathLike[str], model: nn.Module, meta: dict[str, Any], source: str) -> Path:
    """Write ``path`` (``.safetensors``: the network's weights) and its ``.json`` sidecar (metadata)."""
    path = Path(path)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "brats-ugrip", "model": meta["model"]["name"]})
    atomic_write_json(path.with_suffix(".json"),
                      {"format": PACKAGE_FORMAT, "sha256": sha256_file(path), "source": source, "meta": meta})
    return path


def who() -> str:
    """The user this process runs as, as ``docker run -u`` names it."""
    return f"uid {os.getuid()}, gid {os.getgid()}"


def require_readable(path: Path) -> None:
    """A file the package needs but this user cannot read is a one-line error saying what to do (the container may
    run as any uid: MedPerf passes ``-u <uid>:<gid>``, MLCube runs the image's uid 1000)."""
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: not readable by this container's user ({who()}); make the package's files "
                              "readable by any user (chmod -R a+rX on the additional files and parameters.yaml), "
                              "or rebuild it with mlcube/build.py, which does")


def require_writable(folder: Path) -> None:
    """The output folder must take new files from this user: a one-line error saying what to do otherwise."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"{folder}: the output folder is not writable by this container's user ({who()}); make it "
                        "writable for that user (chown it, or chmod a+rwx), or run the container as its owner "
                        "(docker run -u $(id -u):$(id -g); with mlcube run: -Pdocker.cpu_args=\"-u $(id -u):$(id -g)\")")


def load_packaged_member(path: Path, inference: dict[str, Any], key: str, device: torch.device) -> LoadedMember:
    """Load a packaged model (see the module docstring) with the spec's inference settings, checking its hash."""
    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        raise CheckpointError(f"{key}: {path.name} or {sidecar.name} is missing from additional_files ({path.parent}); "
                              "the weights ship as the additional files of the package, rebuild it with mlcube/build.py")
    require_readable(sidecar)
    require_readable(path)
    try:
        record = json.loads(sidecar.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{sidecar}: not valid JSON ({error})") from error
    meta = record.get("meta") if isinstance(record, dict) else None
    if not isinstance(meta, dict) or not {"model", "config"} <= meta.keys():
        raise CheckpointError(f"{sidecar}: not a brats-ugrip model description (expected meta.model and meta.config)")
    if sha256_file(path) != record.get("sha256"):
        raise CheckpointError(f"{path}: its sha256 differs from the one recorded in {sidecar.name}; the weights are "
                              "corrupt or belong to another package")
    model = build_model(meta)
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit {meta['model']['name']} {meta['model']['kwargs']} "
                              f"({error})") from error
    try:
        config = config_from_dict(apply_overrides(meta["config"], {f"inference.{k}": v for k, v in inference.items()}))
    except ConfigError as error:
        raise ConfigError(f"{key}.{error.key_path}", str(error).split(": ", 1)[1]) from None
    settings = inference_settings(config)
    return LoadedMember(path, prepare_model(model.to(device), settings), meta, settings, config.data.scheme)


@dataclass
class Parameters:
    """``parameters.yaml``: the ensemble spec (model paths resolved in ``additional_files``) and the challenge."""

    spec: EnsembleSpec
    challenge: str | None

    @classmethod
    def load(cls, parameters_file: str | os.PathLike[str], additional_files: str | os.PathLike[str]) -> Parameters:
        path = Path(parameters_file)
        if path.is_file():
            require_readable(path)
        values = read_yaml(path, what="parameters file")
        if not isinstance(values, dict):
            raise ConfigError("<root>", "expected a mapping: an ensemble spec (models, thresholds ...) and challenge",
                              str(path))
        runtime = {key: values.pop(key) for key in RUNTIME_KEYS if key in values}
        challenge = runtime.get("challenge")
        if challenge is not None and not isinstance(challenge, str):
            raise ConfigError("challenge", f"expected a challenge name such as brats2024-ssa, got {challenge!r}", str(path))
        return cls(EnsembleSpec.from_dict(values, additional_files, str(path)), challenge)


def load_package(parameters_file: str | os.PathLike[str], additional_files: str | os.PathLike[str],
                 device: str | torch.device) -> tuple[Ensemble, Parameters]:
    """The packaged ensemble, loaded on ``device``, and the parameters it was loaded with."""
    parameters = Parameters.load(parameters_file, additional_files)
    device = torch.device(device)
    members = [load_packaged_member(Path(m.path), m.inference, f"models[{i}]", device)
               for i, m in enumerate(parameters.spec.members)]
    return Ensemble(parameters.spec, device, members), parameters


# --- the infer task ------------------------------------------------------------------------------------------------


def input_cases(data_path: str | os.PathLike[str]) -> list[Case]:
    """Every case folder of ``data_path`` (hidden folders aside), complete or not, sorted by id."""
    data_path = Path(data_path)
    if not data_path.is_dir():
        raise DataError(f"{data_path}: data folder not found")
    folders = sorted(p for p in data_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [Case(p.name, tuple(data_path / name for name in INPUT_NAMING.image_names(p.name))) for p in folders]


def case_problems(case: Case, scheme: str, numbers_seen: set[str]) -> list[str]:
    """Why ``case`` cannot be predicted (empty when it can): its id has no ``NNNNN-NNN`` number or repeats one, or
    its images are missing, unreadable, empty or of different geometry (``brats_ugrip.data.check_case``)."""
    number = brats_case_number(case.case_id)
    if number is None:
        return ["its id has no NNNNN-NNN number, which MedPerf's evaluators match predictions by"]
    if number in numbers_seen:
        return [f"another case has the number {number}; predictions are matched by it"]
    return check_case(case, scheme).problems


@dataclass
class InferReport:
    device: str
    results: list[CaseResult]

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.written is None]

    @property
    def exit_code(self) -> int:
        return EXIT_CASES_FAILED if self.failed else 0


def case_check(scheme: str) -> Callable[[Case], list[str]]:
    """:func:`case_problems` for one pass over a folder: it remembers the case numbers already taken."""
    numbers_seen: set[str] = set()

    def check(case: Case) -> list[str]:
        problems = case_problems(case, scheme, numbers_seen)
        if not problems:
            numbers_seen.add(brats_case_number(case.case_id) or "")
        return problems

    return check


def case_line(case: Case, result: CaseResult, prediction: object) -> None:
    """One log line per case (MedPerf shows the container's output): written in how long, or skipped and why."""
    if result.traceback:
        log.error("%s", result.traceback.rstrip())
    if result.written is not None:
        log.info("ok %s %.1f s → %s", case.case_id, result.seconds, result.written.name)
    else:
        log.warning("skipped %s: %s", case.case_id, "; ".join(result.problems))


def run_infer(data_path: str | os.PathLike[str], parameters_file: str | os.PathLike[str],
              output_path: str | os.PathLike[str], additional_files: str | os.PathLike[str],
              device: str | None = None) -> InferReport:
    """The ``infer`` task (module docstring). Raises :class:`BratsUgripError` when the package or the folders are
    unusable; case problems are in the report."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    output_path = Path(output_path)
    if not output_path.is_dir():
        raise DataError(f"{output_path}: output folder not found")
    require_writable(output_path)
    cases = input_cases(data_path)
    if not cases:
        raise DataError(f"{data_path}: no case folders; expected <ID>/<ID>-t1c.nii.gz, -t1n, -t2f, -t2w")
    ensemble, parameters = load_package(parameters_file, additional_files, device)
    log.info("brats-ugrip model package: challenge %s, %d model(s), labels %s, device %s, %d case folder(s) in %s",
             parameters.challenge or "not set", len(ensemble.members), ensemble.scheme, device, len(cases), data_path)
    results = predict_cases(ensemble, cases, output_path, write=write_prediction, check=case_check(ensemble.scheme),
                            keep_going=True, on_case=case_line)
    report = InferReport(device, results)
    log.info("wrote %d of %d predictions to %s%s", len(results) - len(report.failed), len(cases), output_path,
             f"; skipped {', '.join(r.case_id for r in report.failed)}" if report.failed else "")
    return report


def infer(data_path: str, parameters_file: str, output_path: str, additional_files: str) -> int:
    """:func:`run_infer` as a command: its log lines on stderr, exit code 0 when every case was written, 1 when some
    were not, 2 when the package or a folder is unusable (the reason on stderr, one line)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return run_infer(data_path, parameters_file, output_path, additional_files).exit_code
    except BratsUgripError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_PACKAGE
    except PermissionError as error:  # one the checks above did not foresee: still one line, never a traceback
        print(f"error: {error.filename or error}: permission denied for this container's user ({who()}); make the "
              "package readable and the output folder writable for that user", file=sys.stderr)
        return EXIT_BAD_PACKAGE
    finally:
        log.removeHandler(handler)
