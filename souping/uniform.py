"""Uniform soup: the element-wise mean of the weights of every checkpoint in a folder (Wortsman et al. 2022).

    python souping/uniform.py --ckpts DIR --out soup.ckpt [--datalist F --fold K] [--test-fold K2] [--no-score]

The mean is streamed: one checkpoint in memory besides the running sum, however many there are. Floating tensors
are averaged in float64 and cast back; integer buffers are the first checkpoint's. Then, unless ``--no-score``,
the soup and the best ingredient are scored on the held-out cases (default: the fold the ingredients were
validated on) and a report is written next to the soup (``<out>_report/``) — test scores with ``--test-fold``,
otherwise selection scores, labelled as such.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from brats_ugrip.checkpoints import save_model_checkpoint
from brats_ugrip.cli import console, progress_bar, run
from brats_ugrip.souping.ingredients import load_ingredients
from brats_ugrip.souping.report import print_summary, test_scores, write_report
from brats_ugrip.souping.session import Scores, SoupSession, print_warnings_on_console, report_dir, soup_meta, soup_parser
from brats_ugrip.souping.soups import uniform_soup


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = soup_parser(__doc__)
    parser.add_argument("--no-score", dest="score", action="store_false",
                        help="only average the weights: no held-out scores, no report")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print_warnings_on_console()
    ingredients = load_ingredients(args.ckpts)
    everything = list(range(len(ingredients)))
    state = uniform_soup(i.state_dict() for i in ingredients)
    if not args.score:
        save_model_checkpoint(args.out, state, soup_meta(ingredients, "uniform", 0, everything))
        console.print(f"uniform soup of {len(ingredients)} checkpoints (not scored): {args.out}", highlight=False)
        return 0

    session = SoupSession(ingredients, args)
    state = session.prepare(state)
    stored = session.stored_scores(args.rescore)
    with progress_bar() as bar:
        task = bar.add_task("held-out evaluations", total=sum(s is None for s in stored) + 1)
        session.on_evaluation = lambda: bar.advance(task)
        scores = session.ingredient_scores(stored)
        soup_score = Scores.of(session.score(state, with_hd95=args.hd95 and session.test is None))
        best = max(everything, key=lambda i: scores[i].dice["mean"])
        models = [(f"best ingredient ({ingredients[best].name})", ingredients[best].state_dict, scores[best]),
                  (f"uniform soup ({len(ingredients)})", lambda: state, soup_score)]
        report_evaluations = session.report_evaluations(models, args.hd95)
        bar.update(task, total=bar.tasks[task].completed + report_evaluations)
        tables = session.compare(models, args.hd95)

    save_model_checkpoint(args.out, state, soup_meta(ingredients, "uniform", 0, everything, scores, soup_score, session,
                                                     test=test_scores(tables)))
    reused = sum(s is not None for s in stored)
    notes = [f"Held-out evaluations: {len(ingredients) - reused} ingredient scores computed ({reused} read from their "
             f"checkpoints), 1 uniform soup on the selection cases; {report_evaluations} for the report.",
             *session.notes, *(f"Skipped unreadable checkpoint {path.name}." for path, _ in ingredients.skipped)]
    paths = write_report(report_dir(args), f"Uniform soup of {args.ckpts}", tables, notes)
    print_summary(tables, args.out, paths["markdown"])
    return 0


if __name__ == "__main__":
    run(main)
