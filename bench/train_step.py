"""The project's training step vs a bare PyTorch loop with the same MONAI network, precision and patch, in one run.

    python bench/train_step.py [--model mednext_b] [--kernel-size 3] [--init-filters F] [--roi 128 160 112]
                               [--batch-size 2] [--precision 32 bf16-mixed] [--compile] [--steps 20] [--warmup 3]

*project*: ``SegmentationModule`` under a Lightning ``Trainer`` as ``brats_ugrip.training.train`` builds it
(schedule-free AdamW, deep-supervision Dice + BCE, the run's precision, cuDNN benchmark, ``torch.compile`` when
asked), fed from memory; a step is timed from one ``on_train_batch_end`` to the next, so Lightning's hooks,
logging and the optimizer's bookkeeping are inside it. *bare*: the same network in a plain loop, ``autocast`` for
mixed precision, the same loss on the full-resolution output plus the deep-supervision levels, AdamW (fused on
CUDA), ``zero_grad(set_to_none=True)``. Both synchronise the GPU each step; the median step after ``--warmup``
steps is kept (the warm-up includes compilation, reported as ``first_step_seconds``).

Prints a JSON line and a Markdown table: ms per step, peak GPU memory, the project/bare ratio at each setting
(goal ≤ 1.10) and the project's fastest setting over the bare fp32 eager loop (goal ≤ 0.80 on a GPU: the reference
H100 figures for MedNeXt-B k3 at 128×160×112, batch 2 are fp32 260 ms, bf16 255 ms, bf16 + compile 201 ms).
On a CPU only ``32`` runs (mixed precision is a GPU setting); use small patches and widths there, the figures are
ratios only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins.environments import LightningEnvironment

from brats_ugrip.cli import console, run
from brats_ugrip.config import GPU_PRECISIONS, RunConfig, config_from_dict
from brats_ugrip.errors import ConfigError
from brats_ugrip.losses import mednext_ds_weights
from brats_ugrip.models import create_model, get_spec, resolve_kwargs
from brats_ugrip.training import SegmentationModule

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class RandomPatches(torch.utils.data.Dataset):
    """``length`` identical-sized random training items held in memory: the step, not the loader, is measured."""

    def __init__(self, roi: Sequence[int], length: int):
        generator = torch.Generator().manual_seed(0)
        self.image = torch.randn(4, *roi, generator=generator)
        # Nested regions, as real labels are: ET ⊂ TC ⊂ WT.
        noise = torch.rand(*roi, generator=generator)
        self.label = torch.stack([noise > 0.8, noise > 0.6, noise > 0.9]).float()
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.image, "label": self.label}


class StepTimer(Callback):
    """Seconds between consecutive ``on_train_batch_end`` calls (the first: from the first batch start)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: list[float] = []
        self._last: float | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._last is None:
            self._last = self._now()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = self._now()
        self.seconds.append(now - self._last)
        self._last = now


def run_config(args: argparse.Namespace, precision: str, compile_model: bool) -> RunConfig:
    return config_from_dict({
        "data": {"datalist": "unused.json", "roi_size": list(args.roi), "batch_size": args.batch_size},
        "model": {"name": args.model, **model_overrides(args)},
        "optim": {"name": "adamw_sf", "lr": 1e-3, "warmup_steps": 10},
        "trainer": {"precision": precision, "compile": compile_model,
                    "accelerator": "gpu" if args.device == "cuda" else "cpu"},
        "logging": {"mode": "disabled"},
    })


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The network settings given on the command line; deep supervision is on wherever the model has it."""
    overrides = {k: v for k, v in (("kernel_size", args.kernel_size), ("init_filters", args.init_filters)) if v is not None}
    if "deep_supervision" in get_spec(args.model).defaults:
        overrides["deep_supervision"] = args.deep_supervision
    return overrides


def project_steps(args: argparse.Namespace, precision: str, compile_model: bool) -> list[float]:
    """Step seconds of the project's Lightning training step."""
    config = run_config(args, precision, compile_model)
    pl.seed_everything(0, verbose=False)
    module = SegmentationModule(config)
    timer = StepTimer(torch.device(args.device))
    steps = args.warmup + args.steps
    loader = torch.utils.data.DataLoader(RandomPatches(args.roi, steps * args.batch_size), batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(default_root_dir=tmp, max_steps=steps, accelerator=config.trainer.accelerator, devices=1,
                             precision=precision, benchmark=config.trainer.cudnn_benchmark, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, plugins=[LightningEnvironment()], callbacks=[timer])
        trainer.fit(module, loader)
    return timer.seconds


def bare_steps(model_name: str, model_kwargs: dict[str, Any], roi: Sequence[int], batch_size: int, precision: str,
               compile_model: bool, steps: int, device: str | torch.device) -> list[float]:
    """Seconds of each of ``steps`` plain PyTorch training steps (forward, deep-supervision Dice + BCE, backward,
    AdamW) of a registry network on random ``batch_size × roi`` patches; the first ones include warm-up."""
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as the project's trainer
    device = torch.device(device)
    network = create_model(model_name, **model_kwargs).to(device).train()
    model = torch.compile(network) if compile_model else network
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, fused=device.type == "cuda" or None)
    dice, bce = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5, batch=True), torch.nn.BCEWithLogitsLoss()
    data = RandomPatches(roi, 1)
    image = data.image.expand(batch_size, *data.image.shape).contiguous().to(device)
    label = data.label.expand(batch_size, *data.label.shape).contiguous().to(device)
    autocast = (torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision]) if precision in AUTOCAST_DTYPES
                else contextlib.nullcontext())
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        with autocast:
            outputs = model(image)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        loss = sum(w * (dice(o.float(), t) + bce(o.float(), t)) for w, o, t in zip(
            mednext_ds_weights(len(outputs)), outputs,
            (label if o.shape[2:] == label.shape[2:] else F.interpolate(label, o.shape[2:], mode="nearest-exact")
             for o in outputs)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def measure(path: str, args: argparse.Namespace, precision: str, compile_model: bool) -> dict[str, Any]:
    torch._dynamo.reset()  # each compiled row pays its own compilation (first_step_seconds)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with console.status(f"{path}: precision {precision}{', compiled' if compile_model else ''}"):
        seconds = (project_steps(args, precision, compile_model) if path == "project" else
                   bare_steps(args.model, model_overrides(args), args.roi, args.batch_size, precision, compile_model,
                              args.warmup + args.steps, args.device))
    return {"path": path, "precision": precision, "compile": compile_model,
            "ms_per_step": round(1000 * statistics.median(seconds[args.warmup:]), 2),
            "first_step_seconds": round(seconds[0], 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mednext_b", help="registry name (default mednext_b)")
    parser.add_argument("--kernel-size", type=int, help="MedNeXt kernel (default: the registry's)")
    parser.add_argument("--init-filters", type=int, help="network width (default: the registry's; small on CPU)")
    parser.add_argument("--deep-supervision", action=argparse.BooleanOptionalAction, default=True,
                        help="deep-supervision outputs and loss, for models that have them (default on)")
    parser.add_argument("--roi", type=int, nargs=3, default=(128, 160, 112))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--precision", nargs="+", default=None,
                        help="settings to compare (default: 32 and bf16-mixed on a GPU, 32 on a CPU)")
    parser.add_argument("--compile", action="store_true", help="also run each precision with torch.compile")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotuning, compilation)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    precisions = args.precision or (["32", "bf16-mixed"] if args.device == "cuda" else ["32"])
    if args.device == "cpu" and set(precisions) & set(GPU_PRECISIONS):
        raise ConfigError("--precision", f"{', '.join(set(precisions) & set(GPU_PRECISIONS))} needs a GPU; use 32 on a CPU")
    kwargs = resolve_kwargs(args.model, **model_overrides(args))

    rows = []
    for precision in precisions:
        for compile_model in (False, True) if args.compile else (False,):
            bare = measure("bare", args, precision, compile_model)
            project = measure("project", args, precision, compile_model)
            project["ratio_to_bare"] = round(project["ms_per_step"] / bare["ms_per_step"], 3)
            rows += [bare, project]
    bare_fp32 = next(r for r in rows if r["path"] == "bare" and r["precision"] == "32" and not r["compile"]) \
        if "32" in precisions else None
    fastest = min((r for r in rows if r["path"] == "project"), key=lambda r: r["ms_per_step"])
    result = {
        "bench": "train_step", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "model": args.model, "model_kwargs": kwargs, "roi": list(args.roi),
        "batch_size": args.batch_size, "steps": args.steps, "rows": rows,
        "max_ratio_to_bare": max(r["ratio_to_bare"] for r in rows if r["path"] == "project"),
        "fastest_project": {k: fastest[k] for k in ("precision", "compile", "ms_per_step")},
        "fastest_project_over_bare_fp32_eager": round(fastest["ms_per_step"] / bare_fp32["ms_per_step"],
                                                      3) if bare_fp32 else None,
    }
    print(json.dumps(result))
    print("\n| path | precision | compile | ms / step | first step s | peak GiB | project / bare |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['precision']} | {r['compile']} | {r['ms_per_step']:.1f} | "
              f"{r['first_step_seconds']:.1f} | "
              f"{r['peak_gib'] if r['peak_gib'] is not None else '–'} | {r.get('ratio_to_bare', '')} |")
    print(f"\nproject step ≤ {result['max_ratio_to_bare']:.2f}× the bare loop (goal ≤ 1.10); fastest project setting "
          f"({fastest['precision']}{', compiled' if fastest['compile'] else ''}) "
          + (f"{result['fastest_project_over_bare_fp32_eager']:.2f}× the bare fp32 eager loop (goal ≤ 0.80 on a GPU)"
             if bare_fp32 else "(no fp32 baseline run)"))
    return 0


if __name__ == "__main__":
    run(main)
