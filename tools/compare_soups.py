"""One table of test scores: the best single ingredient, the uniform soup, the greedy soup and the fitted ensemble,
ranked and compared as BraTS does (:mod:`brats_ugrip.comparison`).

    python tools/compare_soups.py --greedy soup.ckpt --uniform uniform.ckpt --ensemble ensemble.fit.json [--out T.md]
        [--baseline NAME] [--resamples N] [--seed S]

Reads the per-case test scores the soup commands stored in their checkpoints (``soup.test``) and the ensemble fit
report (``ensembling/cli.py --fit``'s ``<spec>.fit.json``): nothing is recomputed. The best single ingredient is the
one selection ranked first (on the validation fold), scored on the test cases by the greedy soup command. All of
them must have been scored on the same test cases, none of which any model trained or validated on; otherwise the
command refuses to put them in one table. The table gives each candidate's BraTS mean rank, mean (median) Dice and
HD95 per region, the difference to the best single ingredient with its bootstrap interval, a permutation p-value
and a verdict ("not distinguishable on N cases" when the interval spans 0). ``brats-ugrip compare`` does the same
for any candidates.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from brats_ugrip.cli import print_and_write, run
from brats_ugrip.comparison import DEFAULT_RESAMPLES, DEFAULT_SEED, Candidate, compare, markdown
from brats_ugrip.errors import DataError


def _check_same_cases(where: dict[str, str], notices: dict[str, str | None]) -> None:
    seen = {name: notice for name, notice in notices.items() if notice}
    if seen:
        name, notice = next(iter(seen.items()))
        raise DataError(f"{name}: its test scores are not held out ({notice}); no table of test scores from them")
    if len(set(where.values())) > 1:
        raise DataError(f"the models were tested on different cases: {where}")


def soup_candidates(greedy_ckpt: Path, uniform_ckpt: Path, fit_report: Path) -> tuple[list[Candidate], str]:
    """The four candidates (best single ingredient, uniform soup, greedy soup, ensemble) and the test table's label;
    refuses scores from different or seen test cases."""
    from brats_ugrip.candidates import from_fit_report, from_soup

    greedy_models, greedy = from_soup(greedy_ckpt)
    uniform_models, uniform = from_soup(uniform_ckpt)
    ensemble, record = from_fit_report(fit_report)
    _check_same_cases({"greedy": greedy["where"], "uniform": uniform["where"],
                       "ensemble": f"{record.get('test_cases_from')}, {record.get('test_cases')} cases"},
                      {"greedy": greedy.get("notice"), "uniform": uniform.get("notice"),
                       "ensemble": record.get("test_notice")})
    best = next(c for c in greedy_models if c.name.startswith("best ingredient"))
    soup = next(c for c in greedy_models if c.name.startswith("greedy soup"))
    uniform_soup = next(c for c in uniform_models if c.name.startswith("uniform soup"))
    best = Candidate(f"best single ingredient ({best.name.split('(', 1)[1].rstrip(')')})", best.scores, "single")
    return [best, uniform_soup, soup, ensemble], greedy["label"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--greedy", required=True, type=Path, help="greedy soup checkpoint (souping/greedy.py --out)")
    parser.add_argument("--uniform", required=True, type=Path, help="uniform soup checkpoint (souping/uniform.py --out)")
    parser.add_argument("--ensemble", required=True, type=Path, help="the ensemble's fit report (<spec>.fit.json)")
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    parser.add_argument("--baseline", help="candidate the differences are taken to (default: the best single ingredient)")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap and permutation resamples")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the resampling")
    args = parser.parse_args(argv)
    for path in (args.greedy, args.uniform, args.ensemble):
        if not path.is_file():
            parser.error(f"{path}: not found")
    candidates, label = soup_candidates(args.greedy, args.uniform, args.ensemble)
    comparison = compare(candidates, args.baseline, resamples=args.resamples, seed=args.seed)
    print_and_write(markdown(comparison, label), args.out)
    return 0


if __name__ == "__main__":
    run(main)
