"""Score a folder of predicted label maps against BraTS references and print the mean table.

    python tools/evaluate.py --pred PRED --ref REF --scheme brats2023 --metrics brats2024-ssa --out metrics.csv \\
        [--workers N]

References: REF/<ID>/<ID>-seg.nii.gz (BraTS case folders), REF/<ID>-seg.nii.gz or REF/<ID>.nii.gz; predictions:
PRED/<ID>.nii.gz. One CSV row per reference case. A case without a prediction is listed in a warning and scored
as the worst case (Dice 0, HD95 at the challenge's maximum), not skipped. Each metric set reproduces one
challenge's official code (legacy and lesion-wise scores; rules in brats_ugrip/metrics/rules.py):
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from rich.table import Table

from brats_ugrip.atomic import atomic_write_text
from brats_ugrip.cli import console, run
from brats_ugrip.labels import SCHEMES
from brats_ugrip.metrics import METRIC_SETS, evaluate_dirs, summary

__all__ = ["evaluate_dirs", "main", "mean_table", "metric_sets_help"]


def metric_sets_help() -> str:
    """One line per metric set: its name and the official code and year it reproduces."""
    return "\n".join(f"  {name:14s} {metric_set.official}" for name, metric_set in METRIC_SETS.items())


def mean_table(table: pd.DataFrame, title: str) -> Table:
    """A rich table of the per-case scores: one row per metric, one column per region, cells ``mean ± std``."""
    stats = summary(table)
    metrics: dict[str, dict[str, str]] = {}
    regions: list[str] = []
    for column, (mean, std, _median) in stats.iterrows():
        metric, region = column.rsplit("_", 1)
        metrics.setdefault(metric, {})[region] = f"{mean:.4g} ± {std:.3g}" if len(table) > 1 else f"{mean:.4g}"
        if region not in regions:
            regions.append(region)
    grid = Table(title=title)
    grid.add_column("metric")
    for region in regions:
        grid.add_column(region, justify="right")
    for metric, cells in metrics.items():
        grid.add_row(metric, *(cells.get(region, "") for region in regions))
    return grid


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"{__doc__}\n{metric_sets_help()}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", type=Path, required=True, help="folder of predictions <ID>.nii.gz")
    parser.add_argument("--ref", type=Path, required=True, help="folder of reference segmentations")
    parser.add_argument("--scheme", default="brats2023", choices=sorted(SCHEMES), help="label scheme of both folders")
    parser.add_argument("--metrics", default="regions", choices=list(METRIC_SETS), help="metric set")
    parser.add_argument("--out", type=Path, required=True, help="CSV written with one row per case")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    args = parser.parse_args(argv)

    table = evaluate_dirs(args.pred, args.ref, args.scheme, args.metrics, args.workers)
    atomic_write_text(args.out, table.to_csv(index=False))
    missing = table.attrs["missing"]
    if missing:
        console.print(f"[yellow]warning:[/] {len(missing)} case(s) have no prediction in {args.pred} and are scored "
                      f"as the worst case: {', '.join(missing)}", highlight=False)
    unmatched = table.attrs["unmatched_predictions"]
    if unmatched:
        console.print(f"[yellow]warning:[/] {len(unmatched)} prediction(s) have no reference and are ignored: "
                      f"{', '.join(unmatched)}", highlight=False)
    console.print(mean_table(table, f"{args.metrics}: mean ± std over {len(table)} cases"))
    console.print(f"{args.metrics} reproduces: {METRIC_SETS[args.metrics].official}", highlight=False)
    if args.metrics == "brats2025":
        console.print("BraTS 2025 scores computed by panoptica; please cite "
                      "https://github.com/BrainLesion/panoptica#citation")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run(main)
