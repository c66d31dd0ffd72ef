"""The soup report: best ingredient vs uniform soup vs greedy soup per region (Markdown + CSV), and a plot of the
held-out score as the greedy soup tries its ingredients.

Scores are always labelled with the cases they come from. *Selection* scores are measured on the cases used to
choose the ingredients (and the best checkpoint): optimistic for the greedy soup and the best ingredient, and the
report says so. *Test* scores come from cases that no ingredient trained or validated on and selection never used
(by default the datalist's test split). When the user allowed test cases an ingredient had seen, the report's first
line, the test table's heading, the console summary and the soup's stored scores all say so.
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brats_ugrip.atomic import atomic_path, atomic_write_text
from brats_ugrip.cli import console
from brats_ugrip.souping.soups import GreedyStep

REPORT_REGIONS = ("ET", "TC", "WT", "mean")
SELECTION_NOTE = ("These are **selection scores**, not test scores: they are measured on the held-out cases used to "
                  "choose the soup (and the best ingredient), so they favour the greedy soup and the best ingredient. "
                  "Pass `--test-fold` to score all three on cases that selection never saw.")


@dataclass
class ReportRow:
    """One model's scores: ``dice`` and ``hd95`` as ``{"TC", "WT", "ET", "mean"}`` (HD95 in mm, None if not computed)."""

    model: str
    dice: dict[str, float]
    hd95: dict[str, float] | None = None
    per_case: dict[str, dict[str, float]] | None = None


@dataclass
class ScoreTable:
    """Rows scored on one set of cases: ``kind`` is ``"selection"`` or ``"test"``; ``cases`` describes them."""

    kind: str
    cases: str
    n_cases: int
    rows: list[ReportRow]
    notice: str | None = None
    """For test scores on cases some model had seen (allowed explicitly): the line that says so."""

    @property
    def heading(self) -> str:
        if self.kind == "test" and self.notice:
            return f"'Test' scores — {self.cases}: NOT held out, some were seen in training or validation"
        if self.kind == "test":
            return f"Test scores — {self.cases}, never used for training, validation or selection"
        return f"Selection scores — {self.cases} (used to choose the soup; not test scores)"


def _cells(row: ReportRow) -> list[str]:
    dice = [f"{row.dice[r]:.4f}" for r in REPORT_REGIONS]
    hd95 = [f"{row.hd95[r]:.2f}" if row.hd95 else "—" for r in REPORT_REGIONS]
    return [row.model, *dice, *hd95]


def markdown_table(table: ScoreTable) -> str:
    header = ["model", *(f"Dice {r}" for r in REPORT_REGIONS), *(f"HD95 {r}" for r in REPORT_REGIONS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in table.rows]
    return "\n".join(lines)


def csv_text(tables: Sequence[ScoreTable]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["scores", "cases", "n_cases", "model", *(f"dice_{r}" for r in REPORT_REGIONS),
                     *(f"hd95_{r}" for r in REPORT_REGIONS)])
    for table in tables:
        for row in table.rows:
            hd95 = [row.hd95[r] if row.hd95 else "" for r in REPORT_REGIONS]
            writer.writerow([table.kind, table.cases, table.n_cases, row.model,
                             *(row.dice[r] for r in REPORT_REGIONS), *hd95])
    return buffer.getvalue()


def plot_greedy(path: str | os.PathLike[str], steps: Sequence[GreedyStep], names: Sequence[str],
                uniform_score: float | None = None) -> Path:
    """PNG: the soup's held-out mean Dice as ingredients are tried (best first), each candidate kept or rejected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tried = range(1, len(steps) + 1)
    best, current = [], float("-inf")
    for step in steps:
        current = step.soup_score if step.kept else current
        best.append(current)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.45 * len(steps) + 3), 4.2))
    axes.step(tried, best, where="post", color="tab:blue", label="greedy soup")
    axes.scatter(tried, [s.ingredient_score for s in steps], marker=".", color="grey", label="ingredient alone")
    for kept, marker, color, label in ((True, "o", "tab:green", "candidate kept"), (False, "x", "tab:red",
                                                                                    "candidate rejected")):
        chosen = [(i, s.soup_score) for i, s in zip(tried, steps) if s.kept == kept and i > 1]
        if chosen:
            axes.scatter(*zip(*chosen), marker=marker, color=color, label=label, zorder=3)
    if uniform_score is not None:
        axes.axhline(uniform_score, linestyle="--", color="tab:orange", label="uniform soup")
    axes.set_xticks(list(tried), [names[s.index] for s in steps], rotation=60, ha="right", fontsize=7)
    axes.set_xlabel("ingredients tried, best first")
    axes.set_ylabel("held-out mean Dice (selection cases)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    return Path(path)


def write_report(directory: str | os.PathLike[str], title: str, tables: Sequence[ScoreTable], notes: Sequence[str] = (),
                 steps: Sequence[GreedyStep] | None = None, names: Sequence[str] = (),
                 uniform_score: float | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and, for a greedy soup, ``greedy.png`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tables = sorted(tables, key=lambda t: t.kind != "test")  # test scores first: they are the ones to quote
    notice = next((t.notice for t in tables if t.notice), None)
    parts = [f"**{notice}**", ""] if notice else []
    parts += [f"# {title}", ""]
    if steps:
        parts += ["![greedy soup: held-out score as ingredients are tried](greedy.png)", ""]
    if not any(t.kind == "test" for t in tables):
        parts += [SELECTION_NOTE, ""]
    for table in tables:
        parts += [f"## {table.heading}", "", markdown_table(table), ""]
    if notes:
        parts += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    paths = {"markdown": atomic_write_text(directory / "report.md", "\n".join(parts)),
             "csv": atomic_write_text(directory / "report.csv", csv_text(tables))}
    if steps:
        paths["plot"] = plot_greedy(directory / "greedy.png", steps, names, uniform_score)
    return paths


def test_scores(tables: Sequence[ScoreTable]) -> dict[str, Any] | None:
    """The test table for the soup's metadata, labelled as the report labels it: ``{"label": heading, "notice":
    line or None, "cases": n, "models": {model: {"dice": .., "hd95": .., "per_case": {case_id: scores}}}}``
    (``per_case`` is what a comparison ranks and resamples); None without test cases."""
    table = next((t for t in tables if t.kind == "test"), None)
    if table is None:
        return None
    return {"label": table.heading, "notice": table.notice, "cases": table.n_cases, "where": table.cases,
            "models": {row.model: {"dice": row.dice, "hd95": row.hd95, "per_case": row.per_case} for row in table.rows}}


def print_summary(tables: Sequence[ScoreTable], soup: Path, report: Path) -> None:
    """The tables (test first, under the report's headings) and where the soup and the report are, on the console."""
    notice = next((t.notice for t in tables if t.notice), None)
    if notice:
        console.print(f"[bold yellow]{notice}[/]", highlight=False)
    for table in sorted(tables, key=lambda t: t.kind != "test"):
        console.print(f"\n{table.heading}\n{markdown_table(table)}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"soup: {soup}   report: {report}", highlight=False)
