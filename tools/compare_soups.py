"""One table of test scores: the best single ingredient, the uniform soup, the greedy soup and the fitted ensemble.

    python tools/compare_soups.py --greedy soup.ckpt --uniform uniform.ckpt --ensemble ensemble.fit.json [--out T.md]

Reads the scores the soup commands stored in their checkpoints (``soup.test``) and the ensemble fit report
(``ensembling/cli.py --fit``'s ``<spec>.fit.json``): nothing is recomputed. The best single ingredient is the one
selection ranked first (on the validation fold), scored on the test cases by the greedy soup command. All of them
must have been scored on the same test cases, none of which any model trained or validated on; otherwise the
command refuses to put them in one table.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from brats_ugrip.atomic import atomic_write_text
from brats_ugrip.cli import run
from brats_ugrip.errors import DataError

REGIONS = ("ET", "TC", "WT", "mean")


def _soup_test(path: Path) -> dict[str, Any]:
    from brats_ugrip.checkpoints import checkpoint_meta, load_checkpoint

    meta = checkpoint_meta(load_checkpoint(path, mmap=True), path)
    test = (meta.get("soup") or {}).get("test")
    if not test or "models" not in test:
        raise DataError(f"{path}: holds no test scores; soup on a datalist with a test split (or pass --test-fold)")
    return test


def _check_same_cases(where: dict[str, str], notices: dict[str, str | None]) -> None:
    seen = {name: notice for name, notice in notices.items() if notice}
    if seen:
        name, notice = next(iter(seen.items()))
        raise DataError(f"{name}: its test scores are not held out ({notice}); no table of test scores from them")
    if len(set(where.values())) > 1:
        raise DataError(f"the models were tested on different cases: {where}")


def comparison_rows(greedy: dict[str, Any], uniform: dict[str, Any],
                    fit: dict[str, Any]) -> list[tuple[str, dict, dict]]:
    """``(model, dice, hd95)`` per row: best single ingredient, uniform soup, greedy soup, ensemble."""
    record = fit.get("fit") or {}
    if not fit.get("test"):
        raise DataError("the ensemble fit report holds no test scores; fit on a datalist with a test split")
    greedy_models, uniform_models = greedy["models"], uniform["models"]
    best = next(name for name in greedy_models if name.startswith("best ingredient"))
    soup = next(name for name in greedy_models if name.startswith("greedy soup"))
    uniform_name = next(name for name in uniform_models if name.startswith("uniform soup"))
    _check_same_cases({"greedy": greedy["where"], "uniform": uniform["where"],
                       "ensemble": f"{record.get('test_cases_from')}, {record.get('test_cases')} cases"},
                      {"greedy": greedy.get("notice"), "uniform": uniform.get("notice"),
                       "ensemble": record.get("test_notice")})
    n = len(record.get("single_model_scores") or [])
    return [(f"best single ingredient ({best.split('(', 1)[1].rstrip(')')})", *_pair(greedy_models[best])),
            (uniform_name, *_pair(uniform_models[uniform_name])),
            (soup, *_pair(greedy_models[soup])),
            (f"ensemble (fitted per channel, {n} models)", fit["test"]["dice"], fit["test"].get("hd95") or {})]


def _pair(scores: dict[str, Any]) -> tuple[dict, dict]:
    return scores["dice"], scores.get("hd95") or {}


def markdown(rows: list[tuple[str, dict, dict]], label: str) -> str:
    header = ["model", *(f"Dice {r}" for r in REGIONS), *(f"HD95 {r} (mm)" for r in REGIONS)]
    lines = [f"{label}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, dice, hd95 in rows:
        cells = [f"{dice[r]:.4f}" for r in REGIONS] + [f"{hd95[r]:.2f}" if r in hd95 else "—" for r in REGIONS]
        lines.append("| " + " | ".join([model, *cells]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--greedy", required=True, type=Path, help="greedy soup checkpoint (souping/greedy.py --out)")
    parser.add_argument("--uniform", required=True, type=Path, help="uniform soup checkpoint (souping/uniform.py --out)")
    parser.add_argument("--ensemble", required=True, type=Path, help="the ensemble's fit report (<spec>.fit.json)")
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    args = parser.parse_args(argv)
    for path in (args.greedy, args.uniform, args.ensemble):
        if not path.is_file():
            parser.error(f"{path}: not found")
    greedy, uniform = _soup_test(args.greedy), _soup_test(args.uniform)
    fit = json.loads(args.ensemble.read_text())
    table = markdown(comparison_rows(greedy, uniform, fit), greedy["label"])
    print(table)
    if args.out:
        atomic_write_text(args.out, table)
    return 0


if __name__ == "__main__":
    run(main)
