"""Peak memory of ensemble inference for N = 2 vs 8 models: flat as N grows (streaming averaging).

    python bench/ensemble_memory.py [--models 2 8] [--size 96] [--roi 48] [--model unet] [--init-filters 2]
        [--device cpu|cuda]

One phantom case is predicted by an ensemble of N random tiny networks (the memory of ensembling does not depend on
the weights' values), each N in a fresh process. Measured during ``Ensemble.predict_preprocessed`` only (the models
are loaded and the case preprocessed before): the rise of peak resident memory (``VmHWM``, reset through
``/proc/self/clear_refs``; ``ru_maxrss`` where that is unavailable), tracemalloc's peak (NumPy arrays) and, on a GPU,
``torch.cuda.max_memory_allocated``. Children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed
buffers to the system and the resident peak reflects live memory. For scale: one model's output on the crop, and
the N outputs a non-streaming ensemble would stack. Prints a JSON line and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from brats_ugrip.cli import run

MIB = 2 ** 20
MMAP_THRESHOLD = 64 * 1024


def _peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(workdir: Path, n_models: int, device: str) -> dict[str, float]:
    """Child process: load N models, predict the case once, report the memory the prediction took."""
    from brats_ugrip.data import cases_from_dir
    from brats_ugrip.ensembling.predict import Ensemble
    from brats_ugrip.ensembling.spec import EnsembleSpec
    from brats_ugrip.preprocess import preprocess_case

    torch.set_num_threads(2)
    checkpoints = sorted(workdir.glob("m*.ckpt"))[:n_models]
    ensemble = Ensemble(EnsembleSpec.from_dict({"models": [str(p) for p in checkpoints]}), device)
    case = cases_from_dir(workdir / "data")[0]
    preprocessed = preprocess_case(case.images, None, "brats2023", case_id=case.case_id)
    weight_bytes = sum(p.numel() * p.element_size() for m in ensemble.members for p in m.model.parameters())

    resettable = _peak_rss_reset()
    before = _rss("VmRSS") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    ensemble.predict_preprocessed(preprocessed, probabilities=True, uncertainty="entropy")
    _, numpy_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = _rss("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    output_bytes = 3 * int(np.prod(preprocessed.image.shape[1:])) * 4
    result = {"n_models": n_models, "rss_peak_rise_mib": (peak - before) / MIB, "numpy_peak_mib": numpy_peak / MIB,
              "weights_mib": weight_bytes / MIB, "one_output_mib": output_bytes / MIB,
              "stacked_outputs_mib": n_models * output_bytes / MIB, "crop": list(preprocessed.image.shape[1:])}
    if device.startswith("cuda"):
        result["cuda_peak_rise_mib"] = (torch.cuda.max_memory_allocated() - cuda_before) / MIB
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, nargs="+", default=[2, 8], help="ensemble sizes to compare")
    parser.add_argument("--size", type=int, default=96, help="phantom cube side (voxels)")
    parser.add_argument("--roi", type=int, default=48, help="sliding-window size")
    parser.add_argument("--model", default="unet", help="registry network of the members")
    parser.add_argument("--init-filters", type=int, default=2, help="width of the members")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.workdir, args.child, args.device)))
        return 0

    from brats_ugrip.checkpoints import save_model_checkpoint
    from brats_ugrip.config import load_config
    from brats_ugrip.models import create_model, resolve_kwargs
    from brats_ugrip.synthetic.phantom import write_phantoms

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_phantoms(workdir / "data", 1, args.size, seed=0)
        config = load_config(base={"data": {"datalist": "unused.json", "roi_size": [args.roi] * 3},
                                   "model": {"name": args.model, "init_filters": args.init_filters},
                                   "inference": {"overlap": 0.25, "sw_batch_size": 1}})
        kwargs = resolve_kwargs(args.model, init_filters=args.init_filters)
        for i in range(max(args.models)):
            torch.manual_seed(i)
            save_model_checkpoint(workdir / f"m{i}.ckpt", create_model(args.model, **kwargs).state_dict(),
                                  {"config": config.to_dict(), "model": {"name": args.model, "kwargs": kwargs}, "fold": 0})
        rows = []
        for n in args.models:
            # Large blocks straight from mmap, so freed buffers leave the resident set: the peak then measures live
            # memory, not the heap layout glibc happened to keep from loading N models.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
            child = subprocess.run([sys.executable, __file__, "--child", str(n), "--workdir", str(workdir),
                                    "--device", args.device], capture_output=True, text=True, env=env)
            if child.returncode != 0:
                raise RuntimeError(f"measuring {n} models failed:\n{child.stderr}")
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    first, last = rows[0], rows[-1]
    summary = {"bench": "ensemble_memory", "size": args.size, "roi": args.roi, "model": args.model,
               "init_filters": args.init_filters, "device": args.device,
               "rss_rise_ratio": round(last["rss_peak_rise_mib"] / first["rss_peak_rise_mib"], 3),
               "numpy_peak_ratio": round(last["numpy_peak_mib"] / first["numpy_peak_mib"], 3),
               "rows": [{k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()} for row in rows]}
    print(json.dumps(summary))
    print(f"\ncrop {first['crop']}, one model's output {first['one_output_mib']:.1f} MiB\n")
    print("| models | peak RSS rise (MiB) | NumPy peak (MiB) | weights (MiB) | N stacked outputs (MiB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['n_models']} | {row['rss_peak_rise_mib']:.1f} | {row['numpy_peak_mib']:.1f} | "
              f"{row['weights_mib']:.2f} | {row['stacked_outputs_mib']:.1f} |")
    print(f"\npeak RSS rise, {last['n_models']} vs {first['n_models']} models: {summary['rss_rise_ratio']:.2f}×")
    return 0


if __name__ == "__main__":
    run(main)
