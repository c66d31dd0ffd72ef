"""Soups from Python: a folder of checkpoints in, the soup's weights, metadata, scores and report out.

    from brats_ugrip.souping.api import greedy_soup_from_checkpoints
    result = greedy_soup_from_checkpoints("sweep/models", out="soup.ckpt", strict=False, fold=0)
    result.state_dict, result.kept, result.tables   # weights, ingredient names kept, score tables

Both functions take the soup's own options and, as further keyword arguments, the fields of
:class:`~brats_ugrip.souping.soup_cli.SoupData` (``datalist``, ``fold``, ``test_fold``, ``test_split``,
``allow_seen_test_cases``, ``device``, ...). Test scores come from the datalist's test split by default; test
cases an ingredient trained or validated on are refused unless ``allow_seen_test_cases=True``. The command lines
(``souping/greedy.py``, ``souping/uniform.py``) only parse their arguments and call these.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brats_ugrip.checkpoints import save_model_checkpoint
from brats_ugrip.heldout import HeldOutScore
from brats_ugrip.progress import progress_task
from brats_ugrip.souping.gains import GainTracker, gain_record
from brats_ugrip.souping.ingredients import Ingredients, load_ingredients, shared_base_note
from brats_ugrip.souping.report import ScoreTable, test_scores, write_report
from brats_ugrip.souping.scoring import Scores, SoupSession, soup_meta
from brats_ugrip.souping.soup_cli import SoupData, report_dir
from brats_ugrip.souping.soups import GreedySoup, StateDict, greedy_soup, rank, uniform_soup


@dataclass
class SoupResult:
    """A soup and what was measured of it.

    Attributes:
        state_dict: the soup's weights.
        meta: the metadata written into its checkpoint.
        kept: names of the ingredients in the soup.
        tables: score tables (selection, and test when there are test cases); empty when not scored.
        notes: the report's notes.
        report: paths of the report's files (``markdown``, ``csv``, ``plot``), when written.
        greedy: the greedy soup's steps (greedy soups only).
    """

    state_dict: StateDict
    meta: dict[str, Any]
    kept: list[str]
    tables: list[ScoreTable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report: dict[str, Path] = field(default_factory=dict)
    greedy: GreedySoup | None = None


def _session(ingredients: Ingredients, options: dict[str, Any]) -> SoupSession:
    return SoupSession(ingredients, SoupData(**options))


def _evaluation_note(n: int, reused: int, extra: str) -> str:
    return (f"Held-out evaluations: {n - reused} ingredient scores computed ({reused} read from their checkpoints), "
            f"{extra}")


def _finish(result: SoupResult, out: str | os.PathLike[str] | None, report: str | os.PathLike[str] | None,
            title: str, **plot: Any) -> SoupResult:
    if out is not None:
        save_model_checkpoint(out, result.state_dict, result.meta)
    if result.tables and (out is not None or report is not None):
        directory = report_dir(Path(out), report) if out is not None else Path(report)
        result.report = write_report(directory, title, result.tables, result.notes, **plot)
    return result


def _run_greedy(session: SoupSession, ingredients: Ingredients, scores: list[Scores], strict: bool,
                significant: bool) -> tuple[GreedySoup, list[HeldOutScore], GainTracker]:
    """The greedy soup, its candidates' selection scores, and each step's gain with its interval. The first
    ingredient is scored case by case when its checkpoint held only its mean (one evaluation more)."""
    first = rank([s.dice["mean"] for s in scores])[0]
    per_case = scores[first].per_case or Scores.of(session.score(ingredients[first].state_dict())).per_case
    tracker = GainTracker(per_case)
    candidates: list[HeldOutScore] = []

    def evaluate(state: StateDict) -> float:
        candidates.append(session.score(session.prepare(state)))
        tracker.measure(dict(zip(candidates[-1].case_ids, candidates[-1].per_case)))
        return candidates[-1].mean

    # on_step runs after the decision: the tracker's current soup follows the soup that greedy_soup keeps.
    greedy = greedy_soup(lambda i: ingredients[i].state_dict(), [s.dice["mean"] for s in scores], evaluate,
                         strict=strict, on_step=lambda step: tracker.kept(step.kept),
                         keep=(lambda candidate, best: tracker.significant()) if significant else None)
    return greedy, candidates, tracker


def _rule(strict: bool, significant: bool) -> str:
    if significant:
        return "the step's gain interval above 0 (--significant-gain)"
    return f"{'>' if strict else '≥'} the current soup (Model soups' rule)"


def greedy_soup_from_checkpoints(checkpoints: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None,
                                 report: str | os.PathLike[str] | None = None, strict: bool = False,
                                 significant: bool = False, rescore: bool = False, hd95: bool = True,
                                 progress: bool = True, **data: Any) -> SoupResult:
    """Greedy soup (*Model soups* Recipe 1) of the checkpoints in a folder, selected on the held-out fold.

    Args:
        checkpoints: the folder of ingredients.
        out: write the soup checkpoint there (and the report next to it, ``<stem>_report/``); None writes nothing.
        report: the report's folder instead.
        strict: keep an ingredient only if the score rises (``>``; default ``≥``).
        significant: keep an ingredient only if the step's gain interval lies above 0 (off by default; see
            :mod:`brats_ugrip.souping.gains`).
        rescore: recompute ingredient scores even when their checkpoints hold them for these cases and settings.
        hd95: HD95 in the report's tables.
        data: :class:`~brats_ugrip.souping.soup_cli.SoupData` fields.
    """
    ingredients = load_ingredients(checkpoints)
    session = _session(ingredients, data)
    stored = session.stored_scores(rescore)
    n = len(ingredients)
    with progress_task("held-out evaluations", sum(s is None for s in stored) + n, visible=progress) as task:
        session.on_evaluation = task.advance
        scores = session.ingredient_scores(stored)
        greedy, candidates, tracker = _run_greedy(session, ingredients, scores, strict, significant)
        best = greedy.steps[0].index
        per_case_note = ", 1 for the best ingredient's per-case scores" if scores[best].per_case is None else ""
        kept_scores = [c for c, step in zip(candidates, greedy.steps[1:]) if step.kept]
        greedy_score = Scores.of(kept_scores[-1]) if kept_scores else scores[best]
        greedy_state = session.prepare(greedy.state_dict)
        uniform_state = session.prepare(uniform_soup(i.state_dict() for i in ingredients))
        uniform_score = Scores.of(session.score(uniform_state, with_hd95=hd95 and session.test is None))
        load_best = ingredients[best].state_dict
        same_as_best = len(greedy.kept) == 1 and session.recalibrate is None
        models: list[tuple[str, Callable[[], StateDict], Scores]] = [
            (f"best ingredient ({ingredients[best].name})", load_best, scores[best]),
            (f"uniform soup ({n})", lambda: uniform_state, uniform_score),
            (f"greedy soup ({len(greedy.kept)} of {n})", load_best if same_as_best else lambda: greedy_state,
             greedy_score)]
        report_evaluations = session.report_evaluations(models, hd95)
        task.set_total(task.completed + report_evaluations)
        tables = session.compare(models, hd95)

    gains = [None, *tracker.gains]
    meta = soup_meta(ingredients, "greedy", best, greedy.kept, scores, greedy_score, session, strict=strict,
                     significant_gain=significant, order=[step.index for step in greedy.steps], test=test_scores(tables),
                     gains=[gain_record(g) for g in tracker.gains])
    reused = sum(s is not None for s in stored)
    kept = [ingredients[i].name for i in greedy.kept]
    notes = [f"Greedy soup kept {len(kept)} of {n} ingredients ({', '.join(kept)}); rule: {_rule(strict, significant)}.",
             f"Step gains: {tracker.method} (selection cases: optimistic).",
             shared_base_note(ingredients),
             _evaluation_note(n, reused, f"{greedy.evaluations} greedy candidates, 1 uniform soup"
                              f"{per_case_note} on the selection cases; {report_evaluations} for the report ("
                              f"{'test cases' if session.test is not None else 'HD95 on the selection cases'})."),
             *session.notes, *(f"Skipped unreadable checkpoint {path.name}." for path, _ in ingredients.skipped)]
    result = SoupResult(greedy_state, meta, kept, tables, notes, greedy=greedy)
    return _finish(result, out, report, f"Greedy soup of {checkpoints}", steps=greedy.steps,
                   names=[i.name for i in ingredients], uniform_score=uniform_score.dice["mean"], gains=gains)


def uniform_soup_from_checkpoints(checkpoints: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None,
                                  report: str | os.PathLike[str] | None = None, score: bool = True,
                                  rescore: bool = False, hd95: bool = True, progress: bool = True,
                                  **data: Any) -> SoupResult:
    """Uniform soup (the mean of every checkpoint in a folder), scored with the best ingredient unless ``score`` is
    False. Arguments as :func:`greedy_soup_from_checkpoints`'s."""
    ingredients = load_ingredients(checkpoints)
    everything = list(range(len(ingredients)))
    names = [i.name for i in ingredients]
    state = uniform_soup(i.state_dict() for i in ingredients)
    if not score:
        result = SoupResult(state, soup_meta(ingredients, "uniform", 0, everything), names,
                            notes=[shared_base_note(ingredients)])
        return _finish(result, out, None, "")
    session = _session(ingredients, data)
    state = session.prepare(state)
    stored = session.stored_scores(rescore)
    with progress_task("held-out evaluations", sum(s is None for s in stored) + 1, visible=progress) as task:
        session.on_evaluation = task.advance
        scores = session.ingredient_scores(stored)
        soup_score = Scores.of(session.score(state, with_hd95=hd95 and session.test is None))
        best = max(everything, key=lambda i: scores[i].dice["mean"])
        models = [(f"best ingredient ({ingredients[best].name})", ingredients[best].state_dict, scores[best]),
                  (f"uniform soup ({len(ingredients)})", lambda: state, soup_score)]
        report_evaluations = session.report_evaluations(models, hd95)
        task.set_total(task.completed + report_evaluations)
        tables = session.compare(models, hd95)

    meta = soup_meta(ingredients, "uniform", 0, everything, scores, soup_score, session, test=test_scores(tables))
    reused = sum(s is not None for s in stored)
    notes = [shared_base_note(ingredients),
             _evaluation_note(len(ingredients), reused, f"1 uniform soup on the selection cases; {report_evaluations} "
                              "for the report."),
             *session.notes, *(f"Skipped unreadable checkpoint {path.name}." for path, _ in ingredients.skipped)]
    result = SoupResult(state, meta, names, tables, notes)
    return _finish(result, out, report, f"Uniform soup of {checkpoints}")
