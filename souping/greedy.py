"""Greedy soup (Wortsman et al., *Model soups*, 2022, Recipe 1) of a folder of checkpoints.

    python souping/greedy.py --ckpts DIR --out soup.ckpt [--datalist F --fold K] [--test-fold K2]
        [--strict | --significant-gain]

Ingredients are ranked by their held-out mean Dice on the selection fold (default: the fold they were validated
on) — read from their checkpoints when training measured it on the same cases with the same inference settings,
computed otherwise — and tried best first; each stays in the soup if the soup's score is ≥ the current soup's
(``--strict``: >; ``--significant-gain``: only when the step's paired bootstrap 95 % interval of the gain, over the
selection cases, lies above 0 — off by default, Model soups' rule stays the default). The current soup's score is
carried over, never re-evaluated: N−1 evaluations for N ingredients when their scores come from their checkpoints,
plus one for the uniform soup the report compares with (and one for the best ingredient's per-case scores, which
the step gains need, when its checkpoint held only its mean). The report lists each step's gain with its interval.

Writes the soup checkpoint (loadable by ``brats_ugrip.checkpoints.load_model``, metadata listing the ingredients
kept and their scores) and a report next to it (``<out>_report/``: Markdown, CSV, PNG): best ingredient vs uniform
soup vs greedy soup — on the datalist's test split by default (``--test-fold`` or ``--test-datalist`` for other
cases), otherwise on the selection cases, labelled as such. A test case that an ingredient trained or validated on
is refused unless ``--allow-seen-test-cases`` (then the report's first line says so).

The work is :func:`brats_ugrip.souping.api.greedy_soup_from_checkpoints`; this command parses and calls it.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from brats_ugrip.cli import run
from brats_ugrip.souping.soup_cli import SoupData, check_soup_args, soup_parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = soup_parser(__doc__)
    parser.add_argument("--strict", action="store_true", help="keep an ingredient only if the score improves (>)")
    parser.add_argument("--significant-gain", action="store_true",
                        help="keep an ingredient only if the lower bound of its step's 95%% gain interval (paired "
                             "bootstrap over the selection cases) is above 0 (default: Model soups' rule)")
    args = parser.parse_args(argv)
    check_soup_args(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from brats_ugrip.souping.api import greedy_soup_from_checkpoints
    from brats_ugrip.souping.soup_cli import print_summary, print_warnings_on_console

    print_warnings_on_console()
    result = greedy_soup_from_checkpoints(args.ckpts, out=args.out, report=args.report_dir, strict=args.strict,
                                          significant=args.significant_gain, rescore=args.rescore, hd95=args.hd95,
                                          **vars(SoupData.from_args(args)))
    print_summary(result.tables, args.out, result.report["markdown"])
    return 0


if __name__ == "__main__":
    run(main)
