"""Node check: is this machine ready for a sweep? Run it on a GPU node before launching (about 5–8 minutes on one
GPU at full size), or anywhere at tiny sizes (``--size tiny``: CI runs it on a CPU).

    python tools/doctor.py --out doctor.json                       # full size on a GPU node (the default there)
    python tools/doctor.py --size tiny --out doctor.json           # seconds on a CPU
    python tools/doctor.py --models mednext_b segresnet --cache-dir $SCRATCH/brats-cache

Writes one JSON file (and prints a summary) with:

- ``device``: name, CUDA and torch versions, bf16 support, memory;
- ``training``: one training-step time per model (eager, and compiled on a GPU or with ``--compile``), with the
  samples per second a step consumes;
- ``loader``: the project's training loader's samples/s with ``--workers`` workers against what the fastest step
  consumes (the margin should be ≥ 2×);
- ``inference``: seconds per case for a BraTS-size case (``--size full``), full volume against the brain box;
- ``cache``: the preprocessed-case cache path this node would use (``brats_ugrip.preprocess.case_cache_dir``'s
  rule), whether it is writable, and its write and read speed;
- ``wandb``: the W&B mode runs would use, and whether W&B can log in without a network.

Each part that fails is reported with its error and the check goes on; the exit code is 1 when any part failed.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, Any]] = {
    # tiny: CI on a CPU; full: a BraTS-size patch, batch and case on a GPU (bench/loader.py's and the GPU configs').
    "tiny": {"roi": (32, 32, 32), "batch": 1, "init_filters": 8, "volume": (64, 64, 64), "steps": 3, "batches": 4,
             "cases": 2},
    "full": {"roi": (128, 160, 112), "batch": 2, "init_filters": None, "volume": "brats", "steps": 10, "batches": 24,
             "cases": 4},
}


def device_report(device: str) -> dict[str, Any]:
    import torch

    report: dict[str, Any] = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
                              "cpu_count": os.cpu_count()}
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        report.update(name=properties.name, cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported(),
                      memory_gib=round(properties.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
    else:
        report.update(name=platform.processor() or "cpu", bf16=False,
                      note="bf16 is not used on CPUs (a bf16 3-D convolution ran 38x slower than fp32)")
    return report


def training_report(models: Sequence[str], size: dict[str, Any], device: str, compile_too: bool) -> dict[str, Any]:
    from brats_ugrip.bench.train_step import bare_steps
    from brats_ugrip.model_specs import get_spec, resolve_kwargs

    precision = "bf16-mixed" if device == "cuda" else "32"
    rows = {}
    for name in models:
        kwargs = {"init_filters": size["init_filters"]} if size["init_filters"] else {}
        if "deep_supervision" in get_spec(name).defaults:
            kwargs["deep_supervision"] = True
        kwargs = resolve_kwargs(name, **kwargs)
        row: dict[str, Any] = {"settings": kwargs, "precision": precision}
        for label, compiled in (("eager", False), ("compiled", True)):
            if compiled and not compile_too:
                continue
            seconds = bare_steps(name, kwargs, size["roi"], size["batch"], precision, compiled, size["steps"] + 2, device)
            step = statistics.median(seconds[2:])
            row[label] = {"step_seconds": round(step, 4), "first_step_seconds": round(seconds[0], 2),
                          "samples_per_second": round(size["batch"] / step, 2)}
        rows[name] = row
    return rows


def write_cases(folder: Path, size: dict[str, Any], count: int) -> Path:
    from brats_ugrip.synthetic.anatomy import BRATS_SHAPE
    from brats_ugrip.synthetic.phantom import write_phantoms

    shape = BRATS_SHAPE if size["volume"] == "brats" else size["volume"]
    write_phantoms(folder, count, shape, seed=0)
    return folder


def loader_report(cases_dir: Path, size: dict[str, Any], workers: int, cache_dir: Path,
                  consumed: float | None) -> dict[str, Any]:
    from brats_ugrip.bench.loader import measure_loader
    from brats_ugrip.data import Datalist, make_datalist

    datalist = Datalist.from_dict(make_datalist(cases_dir, n_folds=2))
    rate = measure_loader(datalist, size["roi"], size["batch"], cache_dir, workers, size["batches"])
    report = {"workers": workers, "samples_per_second": round(rate.samples_per_s, 2),
              "first_round_seconds": round(rate.first_round_s, 2)}
    if consumed:
        report.update(step_consumes_per_second=round(consumed, 2), margin=round(rate.samples_per_s / consumed, 2))
    return report


def inference_report(cases_dir: Path, model_name: str, size: dict[str, Any], device: str) -> dict[str, Any]:
    import torch

    from brats_ugrip.bench.infer import FULL_VOLUME_MARGIN
    from brats_ugrip.config import InferenceConfig
    from brats_ugrip.data import cases_from_dir
    from brats_ugrip.inference import predict_preprocessed
    from brats_ugrip.models import create_model
    from brats_ugrip.preprocess import preprocess_case

    kwargs = {"init_filters": size["init_filters"]} if size["init_filters"] else {}
    model = create_model(model_name, **kwargs).to(device).eval()
    settings = InferenceConfig(roi_size=size["roi"], overlap=0.5, sw_batch_size=2,
                               precision="bf16" if device == "cuda" else "32")
    case = cases_from_dir(cases_dir)[0]
    report: dict[str, Any] = {"model": model_name, "roi": list(size["roi"])}
    for label, margin in (("full_volume", FULL_VOLUME_MARGIN), ("brain_box", None)):
        pre = preprocess_case(case.images, None, "brats2023", **({"margin": margin} if margin else {}))
        predict_preprocessed(model, pre, settings)  # warm-up (allocator, cuDNN autotuning)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        predict_preprocessed(model, pre, settings)
        if device == "cuda":
            torch.cuda.synchronize()
        report[label] = {"volume": list(pre.image.shape[1:]), "seconds": round(time.perf_counter() - start, 3)}
    report["speedup"] = round(report["full_volume"]["seconds"] / report["brain_box"]["seconds"], 2)
    return report


def cache_report(cache_dir: Path, megabytes: int) -> dict[str, Any]:
    """Write and read ``megabytes`` in the cache folder (the way cached cases are read: one file, sequentially)."""
    report: dict[str, Any] = {"path": str(cache_dir)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    probe = cache_dir / f".doctor-{os.getpid()}.tmp"
    try:
        start = time.perf_counter()
        with open(probe, "wb") as handle:
            for _ in range(megabytes):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        written = time.perf_counter() - start
        start = time.perf_counter()
        with open(probe, "rb") as handle:
            while handle.read(1 << 24):
                pass
        read = time.perf_counter() - start  # may come from the page cache: an upper bound for a first read
        report.update(writable=True, write_mb_s=round(megabytes / written, 1), read_mb_s=round(megabytes / read, 1))
    finally:
        probe.unlink(missing_ok=True)
    return report


def wandb_report() -> dict[str, Any]:
    mode = os.environ.get("WANDB_MODE") or ("offline" if "SLURM_JOB_ID" in os.environ else "online")
    report: dict[str, Any] = {"mode": mode, "WANDB_MODE": os.environ.get("WANDB_MODE")}
    try:
        import wandb

        report["version"] = wandb.__version__
        report["api_key_configured"] = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
    except ImportError:
        report["version"] = None
    if mode == "online":
        report["note"] = "compute nodes are often offline: set WANDB_MODE=offline and sync afterwards"
    return report


def _part(results: dict[str, Any], name: str, work: Callable[[], Any]) -> Any:
    """Run one part; a failure is recorded (type, message, last frames) and the check goes on."""
    from brats_ugrip.cli import console

    started = time.perf_counter()
    with console.status(f"doctor: {name}"):
        try:
            results[name] = work()
        except Exception as error:  # a node check reports every part it can, whatever breaks one of them
            results[name] = {"error": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc(limit=-3).splitlines()[-6:]}
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
    return results[name]


def check_node(*, models: Sequence[str], size: str, device: str, workers: int, cache_dir: Path,
               compile_too: bool, cache_mb: int = 256) -> dict[str, Any]:
    """Every part of the node check (module docstring) as one dict; parts that failed hold an ``error``."""
    dims = SIZES[size]
    results: dict[str, Any] = {"check": "doctor", "size": size, "models": list(models)}
    _part(results, "device", lambda: device_report(device))
    training = _part(results, "training", lambda: training_report(models, dims, device, compile_too))
    rates = [r[k]["samples_per_second"] for r in training.values() if isinstance(r, dict)
             for k in ("eager", "compiled") if isinstance(r.get(k), dict)] if "error" not in training else []
    with tempfile.TemporaryDirectory(prefix="brats-ugrip-doctor-") as tmp:
        cases = _part(results, "cases", lambda: str(write_cases(Path(tmp) / "cases", dims, dims["cases"])))
        if isinstance(cases, str):
            _part(results, "loader", lambda: loader_report(Path(cases), dims, workers, Path(tmp) / "cache",
                                                           max(rates) if rates else None))
            _part(results, "inference", lambda: inference_report(Path(cases), models[0], dims, device))
    _part(results, "cache", lambda: cache_report(cache_dir, cache_mb if size == "full" else 16))
    _part(results, "wandb", wandb_report)
    results["ok"] = not any(isinstance(v, dict) and "error" in v for v in results.values())
    return results


def _one_line(part: dict[str, Any]) -> str:
    """``key=value`` pairs; a nested part (a model's eager/compiled rows) as ``key: step_seconds``s."""
    items = []
    for key, value in part.items():
        if isinstance(value, dict):
            steps = {k: v["step_seconds"] for k, v in value.items() if isinstance(v, dict) and "step_seconds" in v}
            items.append(f"{key}: " + (", ".join(f"{k} {v:.3f} s/step" for k, v in steps.items()) or
                                       ", ".join(f"{k}={v}" for k, v in value.items() if not isinstance(v, dict))))
        elif not isinstance(value, list) or len(value) <= 4:
            items.append(f"{key}={value}")
    return "; ".join(items)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/doctor.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("doctor.json"), help="JSON report (default doctor.json)")
    parser.add_argument("--size", choices=sorted(SIZES), help="full (default on a GPU) or tiny (default on a CPU)")
    parser.add_argument("--models", nargs="+", default=["mednext_b", "segresnet"], help="networks to time")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when there is a GPU")
    parser.add_argument("--workers", type=int, default=4, help="loader workers to measure (default 4, as the grids)")
    parser.add_argument("--cache-dir", type=Path, help="cache folder to test (default: the one runs would use here)")
    parser.add_argument("--compile", action="store_true", help="also time compiled steps on a CPU (GPUs always do)")
    args = parser.parse_args(argv)
    from brats_ugrip.model_specs import get_spec

    for name in args.models:
        get_spec(name)  # an unknown model is an error now, not after minutes of checks

    import torch

    from brats_ugrip.atomic import atomic_write_json
    from brats_ugrip.cli import console

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("full" if device == "cuda" else "tiny")
    cache_dir = args.cache_dir or Path(os.environ.get("BRATS_UGRIP_CACHE", Path.home() / ".cache" / "brats_ugrip")) / "cases"
    results = check_node(models=args.models, size=size, device=device, workers=args.workers, cache_dir=cache_dir,
                         compile_too=args.compile or device == "cuda")
    atomic_write_json(args.out, results)
    for name, part in results.items():
        if isinstance(part, dict) and name != "seconds":
            console.print(f"[bold]{name}[/]: " + ("[red]" + part["error"] + "[/]" if "error" in part else
                                                  _one_line(part)), highlight=False)
    console.print(f"doctor: {'ok' if results['ok'] else 'problems found'} → {args.out}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    from brats_ugrip.cli import run

    run(main)
