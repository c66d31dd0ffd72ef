"""What the soup commands (``greedy.py``, ``uniform.py``) share: their options as plain data, parsed here without
importing torch and used by ``souping/api.py``, and what they print (only command lines print).

:class:`SoupData` is what a soup is selected and tested on (the keyword arguments of
:func:`~brats_ugrip.souping.api.greedy_soup_from_checkpoints` and ``uniform_soup_from_checkpoints`` beyond their
own). Test cases, by default, are the datalist's test split (``test`` section) when it has one; ``test_fold`` or
``test_datalist`` choose others; ``test_split=False`` scores on the selection cases only.
"""
from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from brats_ugrip.cli import console

if TYPE_CHECKING:
    from brats_ugrip.souping.report import ScoreTable


@dataclass(frozen=True)
class SoupData:
    """Where a soup's held-out scores come from, and how they are computed.

    Attributes:
        datalist, data_root: the datalist (default: the one the ingredients were trained with, from their metadata).
        fold: the selection fold (default: the fold the ingredients were validated on).
        test_fold: score on this fold of the datalist (or of ``test_datalist``) instead of the test split.
        test_datalist: take test cases from this datalist: ``test_fold`` of it, else its test split, else all of its
            labelled cases.
        test_split: use the datalist's test split when it has one and no other test cases are named.
        allow_seen_test_cases: score test cases that an ingredient trained or validated on (refused otherwise);
            the report's first line then says so.
        cache_dir: preprocessed-case cache (default: the runs' cache when there is one).
        device: ``"cuda"``, ``"cpu"``, ...; None picks CUDA when available.
        sw_batch_size: sliding-window batch (speed only).
        recalibrate_bn, bn_batches: recompute BatchNorm statistics of each soup on that many training batches.
    """

    datalist: str | None = None
    data_root: str | None = None
    fold: int | None = None
    test_fold: int | None = None
    test_datalist: str | None = None
    test_split: bool = True
    allow_seen_test_cases: bool = False
    cache_dir: str | None = None
    device: str | None = None
    sw_batch_size: int | None = None
    recalibrate_bn: bool = False
    bn_batches: int = 16

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SoupData:
        """The fields of a :func:`soup_parser` namespace."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def soup_parser(description: str | None) -> argparse.ArgumentParser:
    """The options both soup commands take: ``--ckpts``, ``--out``, the report, and :class:`SoupData`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpts", required=True, type=Path, help="folder of checkpoints (*.ckpt, *.pt, *.pth)")
    parser.add_argument("--out", required=True, type=Path, help="soup checkpoint to write")
    parser.add_argument("--report-dir", type=Path, help="where report.md/.csv/.png go (default: next to --out, "
                        "<name>_report)")
    group = parser.add_argument_group("held-out data")
    group.add_argument("--datalist", help="datalist JSON (default: the one the ingredients were trained with)")
    group.add_argument("--data-root", help="folder the datalist's paths are relative to (default: the datalist's)")
    group.add_argument("--fold", type=int, help="selection fold (default: the fold the ingredients were validated on)")
    group.add_argument("--test-fold", type=int, help="test on this fold instead of the datalist's test split")
    group.add_argument("--test-datalist", help="take the test cases from this datalist (its --test-fold, else its "
                       "test split, else all of its labelled cases)")
    group.add_argument("--no-test-split", dest="test_split", action="store_false",
                       help="do not score on the datalist's test split (selection scores only)")
    group.add_argument("--allow-seen-test-cases", action="store_true", help="score test cases that an ingredient "
                       "trained or validated on (refused otherwise); the report's first line says so")
    group.add_argument("--cache-dir", help="preprocessed-case cache (default: the runs' cache when there is one)")
    group.add_argument("--device", help="device for inference (default: cuda when available, else cpu)")
    group.add_argument("--sw-batch-size", type=int, help="sliding-window batch (changes speed only)")
    group.add_argument("--rescore", action="store_true", help="recompute the ingredients' scores even when their "
                       "checkpoints hold scores measured on the same cases with the same settings")
    group.add_argument("--no-hd95", dest="hd95", action="store_false",
                       help="skip HD95 in the report (saves the report-only evaluations)")
    group.add_argument("--recalibrate-bn", action="store_true", help="recompute BatchNorm running statistics of each "
                       "soup on training patches (BatchNorm models only; GroupNorm models need none)")
    group.add_argument("--bn-batches", type=int, default=16, help="training batches for --recalibrate-bn")
    return parser


def check_soup_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Argument errors found without reading anything (exit 2 through ``parser.error``)."""
    if args.sw_batch_size is not None and args.sw_batch_size < 1:
        parser.error(f"--sw-batch-size must be ≥ 1, got {args.sw_batch_size}")
    if args.bn_batches < 1:
        parser.error(f"--bn-batches must be ≥ 1, got {args.bn_batches}")
    if args.fold is not None and args.test_fold is not None and args.fold == args.test_fold \
            and args.test_datalist is None:
        parser.error(f"--test-fold must differ from --fold ({args.fold}): test cases are never selection cases")
    if not args.ckpts.is_dir():
        parser.error(f"--ckpts {args.ckpts}: not a directory; pass the folder holding the checkpoints to soup")


def report_dir(out: Path, report: Path | None = None) -> Path:
    """Where a soup's report goes: ``report`` when given, else ``<out stem>_report`` next to the soup."""
    return Path(report) if report else Path(out).with_name(f"{Path(out).stem}_report")


def print_warnings_on_console() -> None:
    """Show :class:`SoupWarning` messages as one readable line each (no file and line of the library)."""
    from brats_ugrip.souping.ingredients import SoupWarning  # imports torch: only once a command runs

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        console.print(f"[yellow]warning:[/] {message}", highlight=False)

    warnings.showwarning = show
    warnings.simplefilter("always", SoupWarning)


def print_summary(tables: Sequence[ScoreTable], soup: Path, report: Path) -> None:
    """The tables (test first, under the report's headings) and where the soup and the report are, on the console."""
    from brats_ugrip.souping.report import markdown_table

    notice = next((t.notice for t in tables if t.notice), None)
    if notice:
        console.print(f"[bold yellow]{notice}[/]", highlight=False)
    for table in sorted(tables, key=lambda t: t.kind != "test"):
        console.print(f"\n{table.heading}\n{markdown_table(table)}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"soup: {soup}   report: {report}", highlight=False)
