"""Sample labelled cases of another datalist into a datalist's training-only fold −1.

    python tools/sample_cases.py --datalist OTHER --n 100 --seed 0 --into F [--stratify volume] [--bins 5]

E.g. adult-glioma cases (BraTS-GLI) added to a BraTS-Africa (SSA) datalist. The sample depends only on OTHER's
``original`` labelled training cases, ``--n``, ``--seed`` and the stratification, so the same command gives
the same cases. ``--stratify volume`` splits the candidates into ``--bins`` quantile bins of whole-tumour
volume and draws from each in proportion to its size, so small and large tumours are both represented.

The cases are not copied: their entries point at OTHER's files (paths relative to F's data root) and carry
``"source": "sampled:<name>"`` (name: OTHER's file stem unless ``--name``) and ``"origin"``. Cases already
sampled are skipped, so re-running adds nothing; folds ≥ 0 are never touched. Both datalists must use the
same label scheme; the sampled cases are checked with the case validator and bad ones are reported and skipped
(exit status 1).
"""
from __future__ import annotations

import argparse
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brats_ugrip.cli import console, map_with_progress, run, track
from brats_ugrip.data import Case, Datalist, check_case, save_datalist
from brats_ugrip.errors import DataError
from brats_ugrip.io import load_nifti
from brats_ugrip.tools.integrate_cases import print_rejected
from brats_ugrip.training_cases import ORIGINAL, append_training_only

STRATIFY_CHOICES = ("none", "volume")


def whole_tumour_ml(case: Case) -> float:
    """Whole-tumour volume (every non-zero label) in millilitres."""
    assert case.label is not None
    image = load_nifti(case.label)
    voxel_ml = abs(float(np.linalg.det(image.affine[:3, :3]))) / 1000
    return float(np.count_nonzero(np.asanyarray(image.dataobj))) * voxel_ml


def whole_tumour_volumes(cases: Sequence[Case], workers: int = 1) -> list[float]:
    return map_with_progress(whole_tumour_ml, cases, "measuring tumour volumes", workers, chunksize=4)


def stratified_sample(values: Sequence[float], n: int, bins: int, rng: random.Random) -> list[int]:
    """Indices of ``n`` items drawn across ``bins`` quantile bins of ``values``, in proportion to bin sizes
    (largest remainder), uniformly within each bin."""
    edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    members: list[list[int]] = [[] for _ in range(bins)]
    for index, value in enumerate(values):
        members[int(np.searchsorted(edges, value, side="right"))].append(index)
    shares = [n * len(m) / len(values) for m in members]
    counts = [int(s) for s in shares]
    for b in sorted(range(bins), key=lambda b: counts[b] - shares[b])[: n - sum(counts)]:
        counts[b] += 1
    return sorted(i for m, k in zip(members, counts) for i in rng.sample(m, k))


def sample_cases(other: Datalist, n: int, seed: int = 0, stratify: str = "none", bins: int = 5,
                 workers: int = 1) -> tuple[list[Case], dict[str, float]]:
    """``n`` labelled original training cases of ``other`` (all of them when it has ``n`` or fewer).

    Returns:
        (the cases in datalist order, whole-tumour volume in mL per case id — empty without stratification).
    """
    if n < 1:
        raise DataError(f"--n must be at least 1, got {n}")
    if stratify not in STRATIFY_CHOICES:
        raise DataError(f"--stratify {stratify!r}: choose one of {list(STRATIFY_CHOICES)}")
    if bins < 1:
        raise DataError(f"--bins must be at least 1, got {bins}")
    candidates = [c for c in other.training if c.label is not None and c.source == ORIGINAL]
    if not candidates:
        raise DataError(f"{other.path}: no labelled original training cases to sample from")
    rng = random.Random(seed)
    volumes: dict[str, float] = {}
    if n >= len(candidates):
        chosen = list(range(len(candidates)))
    elif stratify == "volume":
        measured = whole_tumour_volumes(candidates, workers)
        chosen = stratified_sample(measured, n, min(bins, n), rng)
        volumes = {candidates[i].case_id: measured[i] for i in chosen}
    else:
        chosen = sorted(rng.sample(range(len(candidates)), n))
    return [candidates[i] for i in chosen], volumes


def sampled_entries(cases: Sequence[Case], into_root: Path, source: str,
                    volumes: dict[str, float]) -> list[dict[str, Any]]:
    """Datalist entries pointing at the cases' files, relative to ``into_root``."""
    def relative(path: Path) -> str:
        return os.path.relpath(path, into_root)

    entries = []
    for case in cases:
        entry = {"case_id": case.case_id, "image": [relative(p) for p in case.images], "label": relative(case.label),
                 "source": source, "origin": case.case_id}
        if case.case_id in volumes:
            entry["wt_volume_ml"] = round(volumes[case.case_id], 3)
        entries.append(entry)
    return entries


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", type=Path, required=True, help="datalist to sample from (OTHER)")
    parser.add_argument("--into", type=Path, required=True, help="datalist to add the cases to (rewritten atomically)")
    parser.add_argument("--n", type=int, required=True, help="number of cases to sample")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--stratify", choices=STRATIFY_CHOICES, default="none", help="stratify by whole-tumour volume")
    parser.add_argument("--bins", type=int, default=5, help="volume bins for --stratify volume (default 5)")
    parser.add_argument("--name", default=None, help="name in the source tag sampled:<name> (default OTHER's stem)")
    parser.add_argument("--workers", type=int, default=1, help="processes measuring tumour volumes (default 1)")
    args = parser.parse_args(argv)
    other, into = Datalist.load(args.datalist), Datalist.load(args.into)
    if other.label_scheme != into.label_scheme:
        raise DataError(f"{args.datalist} uses label scheme {other.label_scheme} but {args.into} uses "
                        f"{into.label_scheme}; "
                        "convert the cases with `python tools/integrate_cases.py` (which rewrites labels) instead")
    source = f"sampled:{args.name or args.datalist.stem}"
    cases, volumes = sample_cases(other, args.n, args.seed, args.stratify, args.bins, args.workers)
    reports = [check_case(c, other.label_scheme) for c in track(cases, "checking sampled cases")]
    good = [c for c, r in zip(cases, reports) if r.ok]
    raw, added = append_training_only(into.raw, sampled_entries(good, into.data_root, source, volumes))
    if added:
        save_datalist(raw, args.into)
    rejected = [r for r in reports if not r.ok]
    if rejected:
        print_rejected(rejected)
    console.print(f"{args.into}: added {len(added)} of {len(cases)} sampled cases to fold -1 as source {source!r}")
    return 1 if rejected else 0


if __name__ == "__main__":
    run(main)
