"""Compare candidates on one labelled case set, as BraTS ranks them, with intervals and significance.

    brats-ugrip compare --cases DATALIST_OR_FOLDER [--section test] --metrics brats2023-gli \\
        [--ckpt NAME=best.ckpt] [--spec NAME=ensemble.yaml] [--pred NAME=PRED_DIR] [--scores NAME=metrics.csv] \\
        [--soup soup.ckpt] [--ensemble-fit ensemble.fit.json] [--baseline NAME] [--out table.md] [--work DIR]

Cases: a folder of labelled cases, or a datalist's ``--section``: ``test`` (the held-out test split, the default),
``training`` or ``all`` (both). Candidates: checkpoints and soups (``--ckpt``) and ensemble specs (``--spec``; the
flag says which a file is, not its name) are predicted on the cases into ``--work/<NAME>/`` and scored; prediction
folders (``--pred``) are scored as ``brats-ugrip evaluate`` scores them (``--metrics``: the challenge's metric set;
lesion-wise sets rank on lesion-wise Dice and HD95); ``--scores`` reads per-case scores (``evaluate --out``'s CSV);
``--soup`` and ``--ensemble-fit`` take the per-case test scores a soup or an ensemble fit stored (those must have
been scored on the same cases). Every NAME must be distinct. For each candidate: the BraTS mean rank, mean and
median of each metric, the difference to ``--baseline`` (default: the best single model) with a paired bootstrap
95 % interval, a paired sign-flip permutation p-value, and a verdict. See :mod:`brats_ugrip.comparison` for the
method; the table states it, with the resamples and the seed.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from brats_ugrip.candidates import SECTIONS
from brats_ugrip.cli import print_and_write, run
from brats_ugrip.comparison import DEFAULT_RESAMPLES, DEFAULT_SEED, Candidate, compare, markdown
from brats_ugrip.errors import DataError


def _named(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=PATH")
    return name, Path(path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=Path, help="the labelled cases: a datalist JSON or a folder of case folders")
    parser.add_argument("--section", choices=SECTIONS, default="test",
                        help="datalist section of the cases (default test: the held-out test split)")
    parser.add_argument("--scheme", default="brats2023", help="label scheme of predictions and references")
    parser.add_argument("--metrics", default="regions", help="metric set predictions are scored with (evaluate's)")
    for flag, text in (("--ckpt", "checkpoint or soup, predicted on the cases"),
                       ("--spec", "ensemble spec, predicted on the cases"),
                       ("--pred", "folder of <ID>.nii.gz predictions"), ("--scores", "per-case scores CSV")):
        parser.add_argument(flag, type=_named, action="append", default=[], metavar="NAME=PATH", help=text)
    parser.add_argument("--soup", type=Path, action="append", default=[], help="soup checkpoint with stored test scores")
    parser.add_argument("--ensemble-fit", type=Path, help="the ensemble's fit report (<spec>.fit.json)")
    parser.add_argument("--baseline", help="candidate the differences are taken to (default: the best single model)")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap and permutation resamples")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the resampling")
    parser.add_argument("--work", type=Path, default=Path("compare_predictions"), help="where --ckpt/--spec predict")
    parser.add_argument("--device", help="cuda or cpu for --ckpt/--spec (default: cuda when there is a GPU)")
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    args = parser.parse_args(argv)
    if (args.ckpt or args.spec or args.pred) and args.cases is None:
        parser.error("--ckpt, --spec and --pred need --cases (the labelled cases to score on)")
    return args


def candidates(args: argparse.Namespace) -> list[Candidate]:
    """Every candidate the arguments name, in the order given by kind (see the module docstring)."""
    from brats_ugrip import candidates as sources

    names = [name for name, _ in [*args.ckpt, *args.spec, *args.pred, *args.scores]]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:  # before predicting: two candidates of one name would also share --work/<NAME>/
        raise DataError(f"candidate name(s) {', '.join(duplicates)} given twice; every NAME= must be distinct")
    found: list[Candidate] = []
    cases = sources.labelled_cases(args.cases, args.section) if args.cases is not None else []
    for name, path in args.ckpt:
        found.append(sources.from_checkpoint(name, path, cases, args.work, args.scheme, args.metrics, args.device))
    for name, path in args.spec:
        found.append(sources.from_spec(name, path, cases, args.work, args.scheme, args.metrics, args.device))
    found += [sources.from_predictions(name, path, cases, args.scheme, args.metrics) for name, path in args.pred]
    found += [sources.from_csv(name, path) for name, path in args.scores]
    for path in args.soup:
        found += [c for c in sources.from_soup(path)[0] if c.name not in {f.name for f in found}]
    if args.ensemble_fit:
        found.append(sources.from_fit_report(args.ensemble_fit)[0])
    if len(found) < 2:
        raise DataError(f"{len(found)} candidate(s) given; a comparison needs at least two")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    comparison = compare(candidates(args), args.baseline, resamples=args.resamples, seed=args.seed)
    print_and_write(markdown(comparison, f"Comparison on {comparison.n_cases} cases"), args.out)
    return 0


if __name__ == "__main__":
    run(main)
