"""Uniform soup: the element-wise mean of the weights of every checkpoint in a folder (Wortsman et al. 2022).

    python souping/uniform.py --ckpts DIR --out soup.ckpt [--datalist F --fold K] [--test-fold K2] [--no-score]

The mean is streamed: one checkpoint in memory besides the running sum, however many there are. Floating tensors
are averaged in float64 and cast back; integer buffers are the first checkpoint's. Then, unless ``--no-score``,
the soup and the best ingredient are scored on the held-out cases (default: the fold the ingredients were
validated on) and a report is written next to the soup (``<out>_report/``) — test scores on the datalist's test
split by default (or ``--test-fold``), otherwise selection scores, labelled as such. A test case that an ingredient
trained or validated on is refused unless ``--allow-seen-test-cases`` (then the report's first line says so).

The work is :func:`brats_ugrip.souping.api.uniform_soup_from_checkpoints`; this command parses and calls it.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from brats_ugrip.cli import console, run
from brats_ugrip.souping.soup_cli import SoupData, check_soup_args, soup_parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = soup_parser(__doc__)
    parser.add_argument("--no-score", dest="score", action="store_false",
                        help="only average the weights: no held-out scores, no report")
    args = parser.parse_args(argv)
    check_soup_args(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from brats_ugrip.souping.api import uniform_soup_from_checkpoints
    from brats_ugrip.souping.soup_cli import print_summary, print_warnings_on_console

    print_warnings_on_console()
    result = uniform_soup_from_checkpoints(args.ckpts, out=args.out, report=args.report_dir, score=args.score,
                                           rescore=args.rescore, hd95=args.hd95, **vars(SoupData.from_args(args)))
    if not args.score:
        console.print(f"uniform soup of {len(result.kept)} checkpoints (not scored): {args.out}", highlight=False)
        return 0
    print_summary(result.tables, args.out, result.report["markdown"])
    return 0


if __name__ == "__main__":
    run(main)
