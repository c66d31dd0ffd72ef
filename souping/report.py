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


def _key_text(names: Sequence[str], columns: int) -> str:
    """``1  name`` lines in ``columns`` columns, for a figure's key (short labels on the axis, names here)."""
    width = max(len(name) for name in names) + 6
    entries = [f"{i:>2}  {name}".ljust(width) for i, name in enumerate(names, 1)]
    rows = -(-len(entries) // columns)
    return "\n".join("".join(entries[r + c * rows] for c in range(columns) if r + c * rows < len(entries))
                     for r in range(rows))


def plot_greedy(path: str | os.PathLike[str], steps: Sequence[GreedyStep], names: Sequence[str],
                uniform_score: float | None = None, gains: Sequence[Any] = ()) -> Path:
    """PNG: the soup's held-out mean Dice as ingredients are tried (best first), each candidate kept or rejected;
    below, each step's gain with its 95 % interval when given. The axis shows step numbers; a key under the
    plot maps them to the ingredients' names (long names on the axis would crowd out the data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tried = list(range(1, len(steps) + 1))
    best, current = [], float("-inf")
    for step in steps:
        current = step.soup_score if step.kept else current
        best.append(current)
    intervals = [g for g in gains if g is not None]
    panels = 2 if intervals else 1
    key_names = [names[s.index] for s in steps]
    columns = 1 if len(steps) <= 6 else 2
    figure, axes_list = plt.subplots(panels, 1, figsize=(7.5, 3.4 * panels), sharex=True, squeeze=False)
    axes = axes_list[0][0]
    axes.step(tried, best, where="post", color="tab:blue", label="greedy soup")
    axes.scatter(tried, [s.ingredient_score for s in steps], marker=".", color="grey", label="ingredient alone")
    for kept, marker, color, label in ((True, "o", "tab:green", "candidate kept"),
                                       (False, "x", "tab:red", "candidate rejected")):
        chosen = [(i, s.soup_score) for i, s in zip(tried, steps) if s.kept == kept and i > 1]
        if chosen:
            axes.scatter(*zip(*chosen), marker=marker, color=color, label=label, zorder=3)
    if uniform_score is not None:
        axes.axhline(uniform_score, linestyle="--", color="tab:orange", label="uniform soup")
    axes.set_ylabel("mean Dice\n(selection cases)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    axes.set_title("Greedy soup: ingredients tried best first", fontsize=10)
    if intervals:
        _plot_gains(axes_list[1][0], tried, gains, steps)
    bottom = axes_list[-1][0]
    bottom.set_xticks(tried, [str(i) for i in tried])
    bottom.set_xlim(0.5, len(steps) + 0.5)
    bottom.set_xlabel("step (ingredient tried; key below)")
    figure.text(0.01, 0.0, "key: step  ingredient\n" + _key_text(key_names, columns), family="monospace",
                fontsize=7.5, va="top", ha="left")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


def _plot_gains(axes: Any, tried: Sequence[int], gains: Sequence[Any], steps: Sequence[GreedyStep]) -> None:
    """Each step's gain over the current soup with its 95 % interval; green when the candidate was kept."""
    axes.axhline(0.0, color="black", linewidth=0.8)
    for i, gain, step in zip(tried, gains, steps):
        if gain is None:
            continue
        low, high = (gain.interval.low, gain.interval.high) if gain.interval is not None else (gain.gain, gain.gain)
        colour = "tab:green" if step.kept else "tab:red"
        axes.errorbar([i], [gain.gain], yerr=[[gain.gain - low], [high - gain.gain]], fmt="o", color=colour,
                      capsize=4)
    axes.set_ylabel("gain over current soup\n(95 % interval)")
    axes.grid(alpha=0.3)


def steps_table(steps: Sequence[GreedyStep], names: Sequence[str], gains: Sequence[Any]) -> str:
    """The greedy soup's steps: ingredient, its own score, the candidate soup's, the gain [95 % CI], kept."""
    from brats_ugrip.souping.gains import gain_cell

    gains = list(gains) or [None] * len(steps)
    lines = ["| step | ingredient | alone | soup with it | gain [95 % CI] | kept |", "|---|---|---|---|---|---|"]
    for i, (step, gain) in enumerate(zip(steps, gains), 1):
        lines.append(f"| {i} | {names[step.index]} | {step.ingredient_score:.4f} | {step.soup_score:.4f} | "
                     f"{gain_cell(gain)} | {'yes' if step.kept else 'no'} |")
    return "\n".join(lines)


def write_report(directory: str | os.PathLike[str], title: str, tables: Sequence[ScoreTable], notes: Sequence[str] = (),
                 steps: Sequence[GreedyStep] | None = None, names: Sequence[str] = (),
                 uniform_score: float | None = None, gains: Sequence[Any] = ()) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and, for a greedy soup, ``greedy.png`` (and a table of its steps with
    each step's gain and interval) into ``directory``."""
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
    if steps:
        parts += ["## Greedy steps (selection cases)", "", steps_table(steps, names, gains), ""]
    if notes:
        parts += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    paths = {"markdown": atomic_write_text(directory / "report.md", "\n".join(parts)),
             "csv": atomic_write_text(directory / "report.csv", csv_text(tables))}
    if steps:
        paths["plot"] = plot_greedy(directory / "greedy.png", steps, names, uniform_score, gains)
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

