"""Greedy soup (Wortsman et al., *Model soups*, 2022, Recipe 1) of a folder of checkpoints.

    python souping/greedy.py --ckpts DIR --out soup.ckpt [--datalist F --fold K] [--test-fold K2] [--strict]

Ingredients are ranked by their held-out mean Dice on the selection fold (default: the fold they were validated
on) — read from their checkpoints when training measured it on the same cases with the same inference settings,
computed otherwise — and tried best first; each stays in the soup if the soup's score is ≥ the current soup's
(``--strict``: >). The current soup's score is carried over, never re-evaluated: N−1 evaluations for N ingredients
when their scores come from their checkpoints, plus one for the uniform soup the report compares with.

Writes the soup checkpoint (loadable by ``brats_ugrip.checkpoints.load_model``, metadata listing the ingredients
kept and their scores) and a report next to it (``<out>_report/``: Markdown, CSV, PNG): best ingredient vs uniform
soup vs greedy soup — on test cases with ``--test-fold``, otherwise on the selection cases, labelled as such.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from brats_ugrip.checkpoints import save_model_checkpoint
from brats_ugrip.cli import progress_bar, run
from brats_ugrip.heldout import HeldOutScore
from brats_ugrip.souping.ingredients import load_ingredients
from brats_ugrip.souping.report import print_summary, test_scores, write_report
from brats_ugrip.souping.session import Scores, SoupSession, print_warnings_on_console, report_dir, soup_meta, soup_parser
from brats_ugrip.souping.soups import StateDict, greedy_soup, uniform_soup


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = soup_parser(__doc__)
    parser.add_argument("--strict", action="store_true", help="keep an ingredient only if the score improves (>)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print_warnings_on_console()
    ingredients = load_ingredients(args.ckpts)
    session = SoupSession(ingredients, args)
    stored = session.stored_scores(args.rescore)
    n = len(ingredients)
    with progress_bar() as bar:
        task = bar.add_task("held-out evaluations", total=sum(s is None for s in stored) + n)
        session.on_evaluation = lambda: bar.advance(task)
        scores = session.ingredient_scores(stored)
        candidates: list[HeldOutScore] = []

        def evaluate(state: StateDict) -> float:
            candidates.append(session.score(session.prepare(state)))
            return candidates[-1].mean

        greedy = greedy_soup(lambda i: ingredients[i].state_dict(), [s.dice["mean"] for s in scores], evaluate,
                             strict=args.strict)
        best = greedy.steps[0].index
        kept_scores = [c for c, step in zip(candidates, greedy.steps[1:]) if step.kept]
        greedy_score = Scores.of(kept_scores[-1]) if kept_scores else scores[best]
        greedy_state = session.prepare(greedy.state_dict)
        uniform_state = session.prepare(uniform_soup(i.state_dict() for i in ingredients))
        uniform_score = Scores.of(session.score(uniform_state, with_hd95=args.hd95 and session.test is None))

        load_best = ingredients[best].state_dict
        same_as_best = len(greedy.kept) == 1 and session.recalibrate is None
        models = [(f"best ingredient ({ingredients[best].name})", load_best, scores[best]),
                  (f"uniform soup ({n})", lambda: uniform_state, uniform_score),
                  (f"greedy soup ({len(greedy.kept)} of {n})", load_best if same_as_best else lambda: greedy_state,
                   greedy_score)]
        report_evaluations = session.report_evaluations(models, args.hd95)
        bar.update(task, total=bar.tasks[task].completed + report_evaluations)
        tables = session.compare(models, args.hd95)

    meta = soup_meta(ingredients, "greedy", best, greedy.kept, scores, greedy_score, session, strict=args.strict,
                     order=[step.index for step in greedy.steps], test=test_scores(tables))
    save_model_checkpoint(args.out, greedy_state, meta)
    reused = sum(s is not None for s in stored)
    notes = [f"Greedy soup kept {len(greedy.kept)} of {n} ingredients "
             f"({', '.join(ingredients[i].name for i in greedy.kept)}); rule: {'>' if args.strict else '≥'} the current soup.",
             f"Held-out evaluations: {n - reused} ingredient scores computed ({reused} read from their checkpoints), "
             f"{greedy.evaluations} greedy candidates, 1 uniform soup on the selection cases; {report_evaluations} "
             f"for the report ({'test cases' if session.test is not None else 'HD95 on the selection cases'}).",
             *session.notes, *(f"Skipped unreadable checkpoint {path.name}." for path, _ in ingredients.skipped)]
    paths = write_report(report_dir(args), f"Greedy soup of {args.ckpts}", tables, notes, greedy.steps,
                         [i.name for i in ingredients], uniform_score.dice["mean"])
    print_summary(tables, args.out, paths["markdown"])
    return 0


if __name__ == "__main__":
    run(main)
