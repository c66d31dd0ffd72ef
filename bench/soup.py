"""Greedy soup vs the seed's procedure, the held-out evaluation cache, and the uniform soup's memory, in one run.

    python bench/soup.py [--ingredients 6] [--cases 2] [--size 48] [--model unet --init-filters 4] [--roi 48]
                         [--device cpu] [--memory-ingredients 16]

Setup (not timed): phantoms and a datalist whose fold 0 is the held-out fold; N ingredients, one random
initialisation perturbed N ways, each checkpoint holding its fold-0 score as training stores ``val_metrics``.

Timed, each from the checkpoints on disk to the soup's weights:

* **seed** — a faithful re-implementation of the seed's greedy soup: every ingredient evaluated, then at every
  step the current soup evaluated again and the candidate evaluated (3N−2 evaluations); all N state dicts held and
  stacked for each mean; every evaluation reading and preprocessing the held-out NIfTI files again (a data loader
  over the datalist, as the seed's).
* **seed, cases in memory** — the same procedure with a :class:`~brats_ugrip.heldout.HeldOutSet`: the algorithm alone.
* **ours** — ``brats_ugrip.souping.soups.greedy_soup`` on a ``HeldOutSet`` with the ingredients' stored scores:
  N−1 evaluations.
* **ours, scores recomputed** — the same when the checkpoints hold no usable scores: 2N−1 evaluations.

Evaluation cache: N evaluations with the cases held in memory vs re-read and preprocessed for each evaluation, and
the reading and preprocessing alone (what the cache saves per evaluation; it grows with the volume size, while
on a GPU the inference shrinks).
Memory: growth of peak resident memory while making the uniform soup of M checkpoints, streaming (ours) vs
loading and stacking all of them (the seed's), in units of one state dict (``/proc/self/clear_refs`` resets the peak).

Prints a JSON line and a Markdown table. Selection must agree: the seed's procedure and ours keep the same ingredients.
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from brats_ugrip.checkpoints import load_checkpoint, model_state_dict, save_model_checkpoint
from brats_ugrip.cli import console, run
from brats_ugrip.config import config_from_dict
from brats_ugrip.data import Case, Datalist, make_datalist, save_datalist
from brats_ugrip.heldout import HeldOutSet, checkpoint_settings, stored_score
from brats_ugrip.models import create_model, resolve_kwargs
from brats_ugrip.souping.soups import StateDict, greedy_soup, rank, uniform_soup
from brats_ugrip.synthetic.phantom import write_phantoms

# --- the seed's procedure -----------------------------------------------------------------------------------


def stacked_mean(states: Sequence[StateDict]) -> StateDict:
    """The seed's average: ``torch.stack`` of every ingredient, per tensor."""
    return {key: torch.stack([s[key].float() for s in states]).mean(0).to(states[0][key].dtype)
            for key in states[0]}


def seed_greedy(paths: Sequence[Path], evaluate: Callable[[StateDict], float]) -> tuple[list[int], int]:
    """The seed's greedy soup: all ingredients evaluated and ranked; then, per step, the current soup evaluated
    again and the candidate soup evaluated, keeping the candidate if it is at least as good.

    Returns:
        (input positions kept, number of evaluations).
    """
    states = [model_state_dict(load_checkpoint(p)) for p in paths]
    scores = [evaluate(s) for s in states]
    evaluations = len(states)
    kept = [rank(scores)[0]]
    for index in rank(scores)[1:]:
        current = evaluate(stacked_mean([states[i] for i in kept]))
        candidate = evaluate(stacked_mean([states[i] for i in kept + [index]]))
        evaluations += 2
        if candidate >= current:
            kept.append(index)
    stacked_mean([states[i] for i in kept])
    return kept, evaluations


# --- setup --------------------------------------------------------------------------------------------------


def make_ingredients(folder: Path, n: int, model_name: str, kwargs: dict, config: dict, heldout: HeldOutSet,
                     scale: float = 0.05) -> list[Path]:
    """N perturbations of one initialisation, each with its held-out score in its metadata (as training writes)."""
    torch.manual_seed(0)
    base = create_model(model_name, **kwargs).state_dict()
    settings = checkpoint_settings({"config": config})
    network = create_model(model_name, **kwargs)
    paths = []
    for i in range(n):
        generator = torch.Generator().manual_seed(i + 1)
        state = {k: v + scale * v.std().nan_to_num() * torch.randn(v.shape, generator=generator)
                 if v.is_floating_point() else v for k, v in base.items()}
        meta = {"model": {"name": model_name, "kwargs": kwargs}, "config": config, "fold": 0, "init_id": "bench",
                "weights": "averaged", "epoch": 1, "val_epoch": 1}
        network.load_state_dict(state)
        meta["val_metrics"] = heldout.score(network, settings).dice
        paths.append(save_model_checkpoint(folder / f"ingredient{i:02d}.ckpt", state, meta))
    return paths


# --- measurements -------------------------------------------------------------------------------------------


class Evaluator:
    """Loads a state dict into one network and scores it on held-out cases, counting evaluations.

    ``from_files``: read and preprocess the cases again for every evaluation (no cache), as the seed's loader."""

    def __init__(self, network: torch.nn.Module, settings, cases: Sequence[Case], device: torch.device,
                 from_files: bool = False):
        self.network, self.settings, self.cases, self.device = network.to(device), settings, cases, device
        self.heldout = None if from_files else HeldOutSet(cases, cache_dir=None, device=device, progress=False)
        self.count = 0

    def __call__(self, state: StateDict) -> float:
        self.count += 1
        self.network.load_state_dict(state)
        heldout = self.heldout or HeldOutSet(self.cases, cache_dir=None, device=self.device, progress=False)
        return heldout.score(self.network, self.settings).mean


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run_it: Callable[[], object], device: torch.device) -> tuple[object, float, float]:
    """``(result, wall seconds, CPU seconds of this process)``; CPU time is the steadier figure on a shared CPU."""
    _synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = run_it()
    _synchronize(device)
    return result, time.perf_counter() - start, time.process_time() - cpu_start


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise KeyError(field)


def live_tensor_bytes() -> int:
    """Bytes of the CPU storages of every live tensor (each storage counted once)."""
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # isinstance() touches torch's deprecated lazy aliases
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and obj.device.type == "cpu"]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _peak_growth_child(paths: list[Path], stacking: bool, results: multiprocessing.Queue) -> None:
    """In a fresh process (no freed-but-resident heap from earlier work), while souping ``paths``: the peak of live
    tensor bytes (sampled after each checkpoint is loaded, when the most is held, and at the end) and the growth of
    peak resident memory (None where the peak cannot be reset), both above the starting point."""
    base_tensors, samples = live_tensor_bytes(), []

    def load(path: Path) -> StateDict:
        state = model_state_dict(load_checkpoint(path))
        samples.append(live_tensor_bytes())
        return state

    try:
        Path("/proc/self/clear_refs").write_text("5")
        base_rss = _status_kib("VmRSS")
    except OSError:
        base_rss = None
    soup = stacked_mean([load(p) for p in paths]) if stacking else uniform_soup(load(p) for p in paths)
    samples.append(live_tensor_bytes())
    rss = None if base_rss is None else 1024 * (_status_kib("VmHWM") - base_rss)
    results.put((max(samples) - base_tensors, rss))
    del soup


def peak_growth_bytes(paths: list[Path], stacking: bool) -> tuple[int, int | None]:
    """``(peak live tensor bytes, peak resident memory growth)`` of a uniform soup of ``paths``."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_peak_growth_child, args=(paths, stacking, results))
    process.start()
    growth = results.get()
    process.join()
    return growth


def memory_bench(folder: Path, m: int, model_name: str, kwargs: dict) -> dict:
    torch.manual_seed(0)
    base = create_model(model_name, **kwargs).state_dict()
    meta = {"model": {"name": model_name, "kwargs": kwargs}, "weights": "current"}
    paths = [save_model_checkpoint(folder / f"m{i:02d}.ckpt", {k: v + i for k, v in base.items()}, meta)
             for i in range(m)]
    one = sum(t.numel() * t.element_size() for t in base.values())
    result = {"state_dict_mb": round(one / 2**20, 1), "ingredients": m}
    for name, stacking in (("streaming", False), ("stacking", True)):
        tensors, rss = peak_growth_bytes(paths, stacking)
        result[f"{name}_tensors_x"] = round(tensors / one, 2)
        result[f"{name}_rss_x"] = None if rss is None else round(rss / one, 2)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ingredients", type=int, default=6)
    parser.add_argument("--cases", type=int, default=2, help="held-out cases (fold 0)")
    parser.add_argument("--size", default="48", help="phantom cube side, or 'full' for the BraTS grid 240×240×155")
    parser.add_argument("--model", default="unet")
    parser.add_argument("--init-filters", type=int, default=4)
    parser.add_argument("--roi", type=int, default=48)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-ingredients", type=int, default=16)
    parser.add_argument("--memory-model", default="segresnet", help="network of the memory measurement")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    n = args.ingredients
    size = (240, 240, 155) if args.size == "full" else int(args.size)
    kwargs = resolve_kwargs(args.model, init_filters=args.init_filters)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        console.print(f"setup: {2 * args.cases} phantoms, {n} ingredients", highlight=False)
        write_phantoms(tmp / "data", 2 * args.cases, size, seed=0)
        save_datalist(make_datalist(tmp / "data", n_folds=2, seed=0, relative_to=tmp), tmp / "datalist.json")
        cases = Datalist.load(tmp / "datalist.json").fold_cases(0)
        config = config_from_dict({"data": {"datalist": str(tmp / "datalist.json"), "roi_size": [args.roi] * 3},
                                   "model": {"name": args.model, "init_filters": args.init_filters},
                                   "inference": {"overlap": 0.25}}).to_dict()
        settings = checkpoint_settings({"config": config})
        network = create_model(args.model, **kwargs)
        cached = Evaluator(network, settings, cases, device)
        paths = make_ingredients(tmp / "models", n, args.model, kwargs, config, cached.heldout)

        def ours(rescore: bool) -> tuple[list[int], int]:
            evaluate = Evaluator(network, settings, cases, device)  # loading the cases once is part of our time
            fingerprint = evaluate.heldout.fingerprint(settings)
            scores = []
            for path in paths:
                found = None if rescore else stored_score(load_checkpoint(path)["brats_ugrip"], fingerprint)
                scores.append(found["mean"] if found else evaluate(model_state_dict(load_checkpoint(path))))
            soup = greedy_soup(lambda i: model_state_dict(load_checkpoint(paths[i])), scores, evaluate)
            return soup.kept, evaluate.count

        rows = {}
        for name, procedure in (
                ("seed", lambda: seed_greedy(paths, Evaluator(network, settings, cases, device, from_files=True))),
                ("seed, cases in memory", lambda: seed_greedy(paths, Evaluator(network, settings, cases, device))),
                ("ours", lambda: ours(rescore=False)),
                ("ours, scores recomputed", lambda: ours(rescore=True))):
            console.print(f"running: {name}", highlight=False)
            (kept, evaluations), seconds, cpu_seconds = timed(procedure, device)
            rows[name] = {"evaluations": evaluations, "seconds": seconds, "cpu_seconds": cpu_seconds, "kept": kept}

        console.print("running: evaluation cache", highlight=False)
        state = model_state_dict(load_checkpoint(paths[0]))
        from_files = Evaluator(network, settings, cases, device, from_files=True)
        cache = {"cases held in memory (HeldOutSet)": timed(lambda: [cached(state) for _ in range(n)], device)[1:],
                 "cases re-read and preprocessed each time": timed(lambda: [from_files(state) for _ in range(n)],
                                                                   device)[1:]}
        _, read_seconds, read_cpu = timed(lambda: HeldOutSet(cases, cache_dir=None, progress=False), device)
        cache["reading and preprocessing alone (what the cache saves)"] = (n * read_seconds, n * read_cpu)
        console.print("running: uniform soup memory", highlight=False)
        memory = memory_bench(tmp / "memory", args.memory_ingredients, args.memory_model,
                              resolve_kwargs(args.memory_model))

    seed = rows["seed"]
    slug = {"seed": "seed", "seed, cases in memory": "seed_in_memory", "ours": "ours",
            "ours, scores recomputed": "ours_rescored"}
    (cached_wall, cached_cpu), (files_wall, files_cpu), (read_wall, _) = cache.values()
    result = {
        "bench": "soup", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "model": args.model, "init_filters": args.init_filters, "size": args.size,
        "roi": args.roi, "ingredients": n, "heldout_cases": args.cases,
        **{f"{slug[name]}_{key}": round(value, 3) if isinstance(value, float) else value
           for name, row in rows.items() for key, value in row.items() if key != "kept"},
        "speedup_vs_seed": round(seed["seconds"] / rows["ours"]["seconds"], 2),
        "cpu_speedup_vs_seed": round(seed["cpu_seconds"] / rows["ours"]["cpu_seconds"], 2),
        "same_selection": len({tuple(sorted(r["kept"])) for r in rows.values()}) == 1,
        "eval_seconds_cached": round(cached_wall / n, 3), "eval_seconds_uncached": round(files_wall / n, 3),
        "eval_cache_speedup": round(files_wall / cached_wall, 2), "eval_cache_cpu_speedup": round(files_cpu / cached_cpu, 2),
        "eval_read_seconds": round(read_wall / n, 3),
        **{f"memory_{k}": v for k, v in memory.items()},
    }
    print(json.dumps(result))
    print(f"\n| greedy soup of {n} {args.model} ({args.cases} held-out cases, {result['device']}) | evaluations | "
          "seconds | CPU seconds | × faster than the seed (wall / CPU) |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['evaluations']} | {row['seconds']:.2f} | {row['cpu_seconds']:.2f} | "
              f"{seed['seconds'] / row['seconds']:.2f} / {seed['cpu_seconds'] / row['cpu_seconds']:.2f} |")
    print(f"\n| {n} evaluations of one model | seconds per evaluation | CPU seconds per evaluation |\n|---|---|---|")
    for name, (wall, cpu) in cache.items():
        print(f"| {name} | {wall / n:.3f} | {cpu / n:.3f} |")
    print(f"\n| uniform soup of {memory['ingredients']} {args.memory_model} ({memory['state_dict_mb']} MB each) | "
          "peak tensor memory, in state dicts | peak resident memory growth, in state dicts |\n|---|---|---|")
    for name in ("streaming", "stacking"):
        print(f"| {name} ({'ours' if name == 'streaming' else 'seed'}) | {memory[f'{name}_tensors_x']} | "
              f"{memory[f'{name}_rss_x']} |")
    print(f"\nsame ingredients selected by every procedure: {result['same_selection']}")
    return 0


if __name__ == "__main__":
    run(main)
