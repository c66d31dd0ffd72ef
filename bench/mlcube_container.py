"""The model package's image against the same task run on the host, on the CPU, measured in one run.

    python bench/mlcube_container.py [--cases 2] [--size 240 240 155] [--init-filters 8] [--roi 128 128 128]
                                     [--overlap 0.5] [--base-image brats-ugrip-base:cpu]

Builds the registry-free CPU base when missing (``mlcube/base_image.py``; its build time is reported only when it
was built here), a package of an untrained SegResNet (the time does not depend on the weights) and its image
(``docker build --network none``), then runs the ``infer`` task on BraTS-named phantoms twice, each in a fresh
process, the output read as it comes:

* container: ``docker run --rm --network none -u <uid>:<gid>`` with the ``container_config.yaml`` volumes
  (``mlcube/container.py``), as MedPerf runs it;
* host: ``project/mlcube.py infer`` in ``mlcube/sandbox.py`` with this Python (what ``mlcube/check.py`` runs).

Reported: image size, image build time (``--no-cache``), cold start to the first case (from launching the process
to the first prediction written: container start, imports, model load and that case), the start-up alone (the same
less the first case's own time), and seconds per case (the runtime's own per-case times: read, preprocess, sliding
window, write). A JSON line and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from brats_ugrip.checkpoints import save_model_checkpoint
from brats_ugrip.cli import run
from brats_ugrip.config import config_from_dict
from brats_ugrip.mlcube.base_image import DEFAULT_NAME, build_base_image, engine_problem, run_tool
from brats_ugrip.mlcube.build import build_package
from brats_ugrip.mlcube.check import SANDBOX, host_arguments, prepare_volumes, sandbox_env
from brats_ugrip.mlcube.container import docker_run_argv
from brats_ugrip.mlcube.schema import PackageLayout, infer_command, load_yaml
from brats_ugrip.models import create_model, resolve_kwargs
from brats_ugrip.synthetic.anatomy import BRATS_SHAPE
from brats_ugrip.synthetic.phantom import write_phantoms

CASE_LINE = re.compile(r"^ok (\S+) ([0-9.]+) s")
IMAGE = "brats-ugrip-bench/mlcube:1"


def package(root: Path, init_filters: int, roi: Sequence[int], overlap: float, base_image: str) -> PackageLayout:
    config = config_from_dict({"data": {"datalist": "unused.json", "roi_size": list(roi)},
                               "model": {"name": "segresnet", "init_filters": init_filters},
                               "inference": {"overlap": overlap, "sw_batch_size": 1}}).to_dict()
    kwargs = resolve_kwargs("segresnet", init_filters=init_filters)
    checkpoint = save_model_checkpoint(root / "model.ckpt", create_model("segresnet", **kwargs).state_dict(),
                                       {"model": {"name": "segresnet", "kwargs": kwargs}, "config": config})
    return build_package(checkpoint, "brats2024-ssa", root / "package", image=IMAGE, base_image=base_image,
                         accelerator_count=0)


def timed_run(argv: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> dict:
    """Run ``argv``; ``{"first_case_s": seconds from launch to the first "ok" line, "case_s": [per case]}``."""
    start = time.perf_counter()
    process = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=cwd)
    first, cases, lines = None, [], []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line.rstrip())
        match = CASE_LINE.match(line)
        if match:
            first = first if first is not None else time.perf_counter() - start
            cases.append(float(match.group(2)))
    if process.wait() != 0 or not cases:
        raise SystemExit(f"{argv[0]} exited {process.returncode}:\n" + "\n".join(lines[-20:]))
    return {"first_case_s": round(first, 2), "startup_s": round(first - cases[0], 2), "case_s": cases,
            "case_s_mean": round(statistics.mean(cases), 2), "wall_s": round(time.perf_counter() - start, 2)}


def host_run(layout: PackageLayout, data: Path, root: Path) -> dict:
    """The task with this Python, in the sandbox, on read-only copies at the mount paths (as mlcube/check.py)."""
    container = load_yaml(layout.container_config)[0]
    volumes = prepare_volumes(layout, container, data, root / "host")
    arguments = host_arguments(infer_command(container), container, volumes)
    env = {**sandbox_env(root / "host"), "PYTHONPATH": ""}
    return timed_run([sys.executable, "-s", str(SANDBOX), str(layout.entrypoint), *arguments], env=env, cwd=root)


def alternating_runs(layout: PackageLayout, root: Path, repeat: int) -> tuple[dict, dict]:
    """Both runs ``repeat`` times, in alternating order (container first, then host first ...), so that a change of
    the machine's load between runs weighs on both; per run kind, the medians of the figures over the repeats."""
    runs: dict[str, list[dict]] = {"container": [], "host": []}
    for i in range(repeat):
        for kind in ("container", "host") if i % 2 == 0 else ("host", "container"):
            work = root / f"{kind}-{i}"
            (work / "out").mkdir(parents=True)
            runs[kind].append(timed_run(docker_run_argv(layout, root / "data", work / "out")) if kind == "container"
                              else host_run(layout, root / "data", work))
    return tuple({key: round(statistics.median(r[key] for r in runs[kind]), 2)
                  for key in ("first_case_s", "startup_s", "case_s_mean")}
                 | {"case_s": [s for r in runs[kind] for s in r["case_s"]], "repeats": repeat}
                 for kind in ("container", "host"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=3, default=BRATS_SHAPE, help="phantom shape (default BraTS')")
    parser.add_argument("--init-filters", type=int, default=8, help="SegResNet width (multiple of 8)")
    parser.add_argument("--roi", type=int, nargs=3, default=(128, 128, 128))
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--base-image", default=DEFAULT_NAME)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each kind, alternating (medians reported)")
    args = parser.parse_args(argv)
    problem = engine_problem()
    if problem:
        raise SystemExit(f"no container engine: {problem}")
    start = time.perf_counter()
    base_built = build_base_image(args.base_image)
    base_s = round(time.perf_counter() - start, 1) if base_built else None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_phantoms(root / "data", args.cases, tuple(args.size), seed=0, prefix="BraTS-SSA")
        for seg in (root / "data").glob("*/*-seg.nii.gz"):
            seg.unlink()  # MedPerf's data has no labels
        layout = package(root, args.init_filters, args.roi, args.overlap, args.base_image)
        start = time.perf_counter()
        # --no-cache: the build time of a first build on this base, not of a cached rebuild (the tests' images
        # share every layer with this one, comments aside).
        run_tool(["docker", "build", "--no-cache", "--network", "none", "-q", "-t", IMAGE, str(layout.project)],
                 "docker build")
        build_s = round(time.perf_counter() - start, 1)
        size = int(run_tool(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE], "docker inspect").stdout)
        container, host = alternating_runs(layout, root, args.repeat)
    result = {"bench": "mlcube_container", "base_image": args.base_image, "base_build_s": base_s,
              "image_build_s": build_s, "image_gb": round(size / 1e9, 2), "shape": list(args.size),
              "model": f"segresnet init_filters={args.init_filters}", "roi": list(args.roi), "overlap": args.overlap,
              "cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 1), "container": container, "host": host}
    print(json.dumps(result))
    print("\n| run | cold start to first case (s) | start-up (s) | s / case (mean) | cases |\n|---|---|---|---|---|")
    for name, figures in (("container (docker run -u, --network none)", container), ("host (sandbox)", host)):
        print(f"| {name} | {figures['first_case_s']} | {figures['startup_s']} | {figures['case_s_mean']} | "
              f"{len(figures['case_s'])} |")
    print(f"\nimage {IMAGE}: {result['image_gb']} GB, built in {build_s} s on {args.base_image}"
          + (f" (base built in {base_s} s)" if base_s is not None else " (base existed)"))
    return 0


if __name__ == "__main__":
    run(main)
