"""Check every case of a datalist: missing or unreadable files, modalities whose shape or affine disagree, NaN or
infinite voxels (counted per case and modality), labels outside the scheme, empty images, and fold numbers that
contradict the datalist (outside its ``n_folds``, or a fold with no case). Reports all problems of all cases;
exits 1 when any case is bad.

    python tools/check_data.py datalist.json [--scheme brats2023] [--workers 2]
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from rich.table import Table

from brats_ugrip.cli import console, map_with_progress, run
from brats_ugrip.data import CaseReport, Datalist, check_case, iter_cases


def check_datalist(datalist: Datalist, scheme: str, workers: int = 1) -> list[CaseReport]:
    """Reports for every training and testing case, in datalist order."""
    cases = iter_cases(datalist)
    return map_with_progress(partial(check_case, scheme=scheme), cases, "checking cases", workers, chunksize=4)


def print_case_problems(reports: Sequence[CaseReport], title: str) -> None:
    """A table of every problem of every case in ``reports``."""
    table = Table(title=title)
    table.add_column("case")
    table.add_column("problem")
    for report in reports:
        for problem in report.problems:
            table.add_row(report.case_id, problem)
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datalist", type=Path)
    parser.add_argument("--scheme", default=None, help="label scheme (default: the datalist's label_scheme)")
    parser.add_argument("--data-root", type=Path, default=None, help="override the datalist's data_root")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    datalist = Datalist.load(args.datalist, args.data_root)
    reports = check_datalist(datalist, args.scheme or datalist.label_scheme, args.workers)
    bad = [r for r in reports if not r.ok]
    folds = datalist.fold_problems()
    if bad or folds:
        title = f"{len(bad)} of {len(reports)} cases have problems" + (", and the folds" if folds else "")
        print_case_problems([*bad, *([CaseReport("folds", folds)] if folds else [])], title)
        return 1
    console.print(f"[green]all {len(reports)} cases OK[/]")
    return 0


if __name__ == "__main__":
    run(main)
