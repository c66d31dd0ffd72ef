"""Rendering a :class:`~brats_ugrip.sweeps.monitoring.snapshot.SweepSnapshot` with rich: the live dashboard,
``--once`` and ``--compact``.

- header: the sweep, counts per state, GPU-hours, the best run so far, when it was polled;
- one row per run: id, varied parameters, state, attempt, job id, node and GPU, an epoch progress bar, best
  validation Dice and its epoch, elapsed time, ETA, time since the last progress update, and the reason of a
  failure or a retry;
- compact mode (for 1000+ runs): one row per parameter value with the number of runs per state, the best and the
  mean best Dice.

The live view shows as many rows as the terminal has lines and says how many it left out; rows are built from
one fixed-width text (:func:`grid_text`, not ``rich.table.Table``) so that a frame renders in milliseconds.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from rich.cells import cell_len, set_cell_size
from rich.console import Group, RenderableType
from rich.text import Span, Text

from brats_ugrip.errors import BratsUgripError
from brats_ugrip.sweeps.monitoring.snapshot import AWAITING_ACCOUNTING, STALLED, RunView, SweepSnapshot
from brats_ugrip.sweeps.run_ids import format_value, short_keys
from brats_ugrip.sweeps.state import RunState

STATE_STYLES = {
    "PENDING": "dim", "SUBMITTED": "cyan", "RUNNING": "green", "REQUEUED": "yellow", "TIMEOUT": "yellow",
    "RETRYING": "yellow", "COMPLETED": "bold blue", "FAILED": "bold red", "CANCELLED": "magenta", STALLED: "bold red",
    "PAUSED": "blue", AWAITING_ACCOUNTING: "blue",
}
STATE_ORDER = {s: i for i, s in enumerate(("RUNNING", "REQUEUED", "RETRYING", "SUBMITTED", "PENDING", "TIMEOUT",
                                           "FAILED", "CANCELLED", "PAUSED", "COMPLETED"))}
SORT_KEYS = ("grid", "state", "dice")
BAR_WIDTH = 10
HEADER_LINES = 6  # header (3 lines), the table's heading and rule, a spare line: a frame besides its rows


@dataclass(frozen=True)
class RunFilter:
    """``key=value[,value…]``: ``state=RUNNING,FAILED`` (STALLED matches stalled runs) or a parameter, by its
    dotted key or its last part (``lr=0.001``, ``optim.lr=0.001``)."""

    key: str
    values: frozenset[str]

    def matches(self, run: RunView) -> bool:
        if self.key == "state":
            return run.state in self.values or (run.stalled and STALLED in self.values) or (
                "TIMEOUT→REQUEUED" in self.values and run.state == RunState.REQUEUED.value)
        if self.key not in run.params:
            return False
        value = run.params[self.key]
        return value_text(value) in self.values or str(value) in self.values


def value_text(value: Any) -> str:
    """A parameter value as in run ids: ``0.001``, ``true``, ``64x64x64``, a path's stem."""
    return format_value(value)


def parse_filter(text: str, varied_keys: list[str]) -> RunFilter:
    """Parse one ``--filter``; a key that is neither ``state`` nor a varied parameter is an error naming them."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise BratsUgripError(f"--filter {text!r}: expected KEY=VALUE[,VALUE…], e.g. state=RUNNING or lr=0.001")
    names = short_keys(varied_keys)
    if key != "state":
        matching = [k for k in varied_keys if key in (k, names[k])]
        if not matching:
            raise BratsUgripError(f"--filter {text!r}: {key!r} is not varied in this sweep; filter on state or one "
                                  f"of: {', '.join(names[k] for k in varied_keys) or '(no varied parameters)'}")
        key = matching[0]
    wanted = {v.strip() for v in values.split(",") if v.strip()}
    if key == "state":
        wanted = {v.upper() for v in wanted}
        known = {s.value for s in RunState} | {STALLED, "TIMEOUT→REQUEUED"}
        unknown = wanted - known
        if unknown:
            raise BratsUgripError(f"--filter {text!r}: unknown state {', '.join(sorted(unknown))}; states: "
                                  f"{', '.join(sorted(known))}")
    return RunFilter(key, frozenset(wanted))


@dataclass
class ViewOptions:
    """How runs are chosen and drawn: sort (``grid`` order, ``state`` or best ``dice``), filters (all must match),
    compact mode, and the most rows to draw (None: all)."""

    sort: str = "grid"
    filters: list[RunFilter] = field(default_factory=list)
    compact: bool = False
    max_rows: int | None = None


def select_runs(snapshot: SweepSnapshot, options: ViewOptions) -> list[RunView]:
    runs = [r for r in snapshot.runs if all(f.matches(r) for f in options.filters)]
    if options.sort == "state":
        runs.sort(key=lambda r: (not r.stalled, STATE_ORDER.get(r.state, len(STATE_ORDER))))
    elif options.sort == "dice":
        runs.sort(key=lambda r: (r.best_dice is None, -(r.best_dice or 0.0)))
    return runs


# --- formatting ---------------------------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """``42s``, ``7m05s``, ``3h12m``, ``2d04h``; ``–`` for unknown."""
    if seconds is None:
        return "–"
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def progress_text(run: RunView) -> Text:
    """``██████░░░░ 6/10`` (epochs done / max epochs)."""
    if run.fraction is None:
        return Text("–", style="dim")
    filled = round(run.fraction * BAR_WIDTH)
    bar = Text("█" * filled, style=STATE_STYLES.get(run.state, ""))
    bar.append("░" * (BAR_WIDTH - filled), style="dim")
    bar.append(f" {run.epoch}/{run.max_epochs}")
    return bar


def dice_text(value: float | None, epoch: int | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" + (f" @{epoch}" if epoch is not None else "")


def state_text(run: RunView) -> Text:
    style = STATE_STYLES.get(run.shown_state, STATE_STYLES.get(run.state, ""))
    return Text(run.label, style=STATE_STYLES[STALLED] if run.stalled else style)


def header(snapshot: SweepSnapshot, shown: int, total: int) -> Text:
    """Sweep name, counts per state, GPU-hours, the best run, the time of the poll (lines never wrap: the frame's
    height is counted in lines)."""
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(f"sweep {snapshot.name}", style="bold")
    text.append(f" · {snapshot.sweep_dir} · {len(snapshot.runs)} runs", style="dim")
    polled = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at))
    text.append(f" · polled {polled}" + (f" in {snapshot.poll_seconds:.2f} s" if snapshot.poll_seconds else ""),
                style="dim")
    text.append("\n")
    for state, count in snapshot.counts.items():
        text.append(f"{state} {count}", style=STATE_STYLES.get(state, ""))
        text.append("  ")
    text.append(f"· GPU-hours {snapshot.gpu_hours:.1f}", style="bold")
    text.append(f" (job-hours {snapshot.job_hours:.1f})", style="dim")
    best = snapshot.best
    text.append("\nbest: ")
    if best is None:
        text.append("no validation yet", style="dim")
    else:
        text.append(best.run_id, style="bold")
        text.append(f"  Dice {dice_text(best.best_dice, best.best_epoch)}  ({best.label})")
    for line in snapshot.halving:
        text.append(f"\n{line}")
    if shown < total:
        text.append(f"\nshowing {shown} of {total} runs", style="dim")
    for cluster, since in sorted(snapshot.unavailable_since.items()):
        text.append(f"\n{cluster} accounting unavailable since {time.strftime('%H:%M', time.localtime(since))}: "
                    "states kept as last known, nothing concluded until it answers", style="bold yellow")
    for note in snapshot.notes:
        text.append(f"\nwarning: {note}", style="yellow")
    return text


@dataclass(frozen=True)
class Column:
    """A column of :func:`grid_text`: its heading, alignment, widest width, whether it gives up width first when
    the terminal is too narrow (down to ``min_width``), and ``drop``: when even that does not fit, columns with the
    highest ``drop`` are left out first (0: always shown)."""

    heading: str
    justify: str = "left"
    max_width: int | None = None
    flexible: bool = False
    drop: int = 0
    min_width: int = 8


Cell = str | Text


def _width(text: str) -> int:
    return len(text) if text.isascii() else cell_len(text)


def _parts(cell: Cell) -> tuple[str, list[Span]]:
    if isinstance(cell, str):
        return cell, []
    spans = list(cell.spans)
    if cell.style:
        spans.insert(0, Span(0, len(cell.plain), cell.style))
    return cell.plain, spans


def _columns_that_fit(columns: list[Column], widths: list[int], width: int, gap: int) -> list[int]:
    """Indices of the columns to show in ``width``: all of them when they fit with flexible columns at their
    minimum, else without the most droppable ones (highest ``drop`` first) until they do."""
    keep = list(range(len(columns)))
    narrowest = {i: min(w, c.min_width) if c.flexible else w for i, (w, c) in enumerate(zip(widths, columns))}
    droppable = sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: -columns[i].drop)
    while sum(narrowest[i] for i in keep) + gap * (len(keep) - 1) > width and droppable:
        keep.remove(droppable.pop(0))
    return keep


def grid_text(columns: list[Column], rows: list[list[Cell]], width: int | None = None, gap: int = 2) -> Text:
    """Rows of cells as one fixed-width :class:`~rich.text.Text` (heading, rule, one line per row).

    Two orders of magnitude faster than ``rich.table.Table`` for hundreds of rows: one string with style spans,
    no per-cell measuring or wrapping. Widths come from the cells' lengths, capped by ``max_width``; when the lines
    exceed ``width``, the least needed columns are left out (``drop``) and flexible columns shrink (down to their
    ``min_width``); cells that do not fit end with "…".
    """
    heading = [Text(c.heading, style="bold") for c in columns]
    cells = [[_parts(cell) for cell in row] for row in [heading, *rows]]
    widths = [0] * len(columns)
    for row in cells:
        for i, (plain, _) in enumerate(row[:len(columns)]):
            widths[i] = max(widths[i], _width(plain))
    widths = [min(w, c.max_width) if c.max_width else w for w, c in zip(widths, columns)]
    if width is not None:
        keep = _columns_that_fit(columns, widths, width, gap)
        columns, widths = [columns[i] for i in keep], [widths[i] for i in keep]
        cells = [[row[i] if i < len(row) else ("", []) for i in keep] for row in cells]
        excess = sum(widths) + gap * (len(columns) - 1) - width
        for i in reversed([i for i, c in enumerate(columns) if c.flexible]):
            if excess <= 0:
                break
            cut = min(excess, max(0, widths[i] - columns[i].min_width))
            widths[i] -= cut
            excess -= cut
    total = sum(widths) + gap * (len(columns) - 1)
    pieces: list[str] = []
    spans: list[Span] = []
    offset = 0
    for number, row in enumerate(cells):
        for i, column in enumerate(columns):
            plain, cell_spans = row[i] if i < len(row) else ("", [])
            cell_width = _width(plain)
            if cell_width > widths[i]:
                plain = set_cell_size(plain, max(0, widths[i] - 1)) + "…" if widths[i] else ""
                cell_width = widths[i]
            if i:
                pieces.append(" " * gap)
                offset += gap
            pad = " " * (widths[i] - cell_width) if column.justify == "right" or i < len(columns) - 1 else ""
            text = (pad + plain) if column.justify == "right" else (plain + pad)
            start = offset + (len(pad) if column.justify == "right" else 0)
            spans.extend(Span(start + a, min(start + b, start + len(plain)), style) for a, b, style in cell_spans
                         if a < len(plain))
            pieces.append(text)
            offset += len(text)
        line_end = "\n" + ("─" * total + "\n" if number == 0 else "")
        if number == 0:
            spans.append(Span(offset + 1, offset + 1 + total, "dim"))
        pieces.append(line_end)
        offset += len(line_end)
    return Text("".join(pieces).rstrip("\n"), spans=spans, no_wrap=True, overflow="crop")


def note_text(run: RunView) -> str:
    """The run's reason without the scheduler word and attempt it starts with ("FAILED (attempt 3): ..."): the
    state and try columns show them, and a narrow terminal keeps the cause in view."""
    reason = run.reason or ""
    head, _, rest = reason.partition(": ")
    return rest if rest and " (attempt " in head and head.split(" ")[0].isupper() else reason


def runs_table(snapshot: SweepSnapshot, runs: list[RunView], max_rows: int | None = None,
               width: int | None = None) -> Text:
    """One row per run (at most ``max_rows``; a last line says how many were left out)."""
    names = short_keys(snapshot.varied_keys)
    # On a narrow terminal the varied parameters, the state, the best Dice and the note (why a run failed or is
    # retried) stay; node, run id (the parameters name the run), job, update time, try, elapsed, ETA and the epoch
    # bar are left out in that order.
    columns = [Column("run", max_width=48, flexible=True, drop=7 if snapshot.varied_keys else 0),
               *(Column(names[key], max_width=16) for key in snapshot.varied_keys),
               Column("state"), Column("try", "right", drop=4), Column("job", drop=6),
               Column("node/GPU", max_width=28, flexible=True, drop=8), Column("epoch", drop=1),
               Column("best Dice", "right"), Column("elapsed", "right", drop=3), Column("ETA", "right", drop=2),
               Column("updated", "right", drop=5), Column("note", max_width=80, flexible=True, min_width=40)]
    shown = runs if max_rows is None or len(runs) <= max_rows else runs[:max(0, max_rows - 1)]
    now = snapshot.taken_at
    rows: list[list[Cell]] = []
    for run in shown:
        node = " · ".join(filter(None, (run.node, run.gpu))) or "–"
        updated = duration(now - run.updated_at) + " ago" if run.updated_at else "–"
        rows.append([
            run.run_id, *(value_text(run.params[k]) if k in run.params else "–" for k in snapshot.varied_keys),
            state_text(run), f"{run.attempt}/{run.max_attempts}", run.job_id or "–", node, progress_text(run),
            dice_text(run.best_dice, run.best_epoch), duration(run.elapsed_s), duration(run.eta_s), updated,
            Text(note_text(run), style="red" if run.state == "FAILED" else "dim"),
        ])
    table = grid_text(columns, rows, width)
    if len(shown) < len(runs):
        table.append(f"\n… {len(runs) - len(shown)} more runs (--filter, --sort, --compact)", style="dim")
    return table


def compact_table(snapshot: SweepSnapshot, runs: list[RunView], width: int | None = None) -> Text:
    """One row per value of each varied parameter: runs per state, stalled runs, best and mean best Dice."""
    states = [s.value for s in RunState if any(r.state == s.value for r in runs)]
    names = short_keys(snapshot.varied_keys)
    columns = [Column("parameter"), Column("value", max_width=24, flexible=True), Column("runs", "right"),
               *(Column(state, "right") for state in states), Column(STALLED, "right"), Column("best Dice", "right"),
               Column("mean best Dice", "right")]
    groups: dict[tuple[str, str], list[RunView]] = defaultdict(list)
    for key in snapshot.varied_keys:  # all values of a parameter together, in order of first appearance
        for run in runs:
            if key in run.params:
                groups[(key, value_text(run.params[key]))].append(run)
    if not snapshot.varied_keys:
        groups[("(all)", "")] = list(runs)
    rows: list[list[Cell]] = []
    for (key, value), members in groups.items():
        counts = Counter(r.state for r in members)
        scores = [r.best_dice for r in members if r.best_dice is not None]
        stalled = sum(r.stalled for r in members)
        rows.append([names.get(key, key), value, str(len(members)),
                     *(Text(str(counts[s] or ""), style=STATE_STYLES.get(s, "")) for s in states),
                     Text(str(stalled or ""), style=STATE_STYLES[STALLED]), dice_text(max(scores) if scores else None),
                     dice_text(sum(scores) / len(scores) if scores else None)])
    return grid_text(columns, rows, width)


def render(snapshot: SweepSnapshot, options: ViewOptions, height: int | None = None,
           width: int | None = None) -> RenderableType:
    """The whole frame; with ``height`` the run rows are cut to fit the terminal, with ``width`` the widest
    columns (run id, node, note) shrink to fit it."""
    runs = select_runs(snapshot, options)
    if options.compact:
        return Group(header(snapshot, len(runs), len(snapshot.runs)), compact_table(snapshot, runs, width))
    max_rows = options.max_rows
    if height is not None:
        fit = max(3, height - HEADER_LINES - len(snapshot.notes) - len(snapshot.halving) - len(snapshot.unavailable_since)
                  - (len(runs) < len(snapshot.runs)))
        max_rows = fit if max_rows is None else min(max_rows, fit)
    shown = len(runs) if max_rows is None or len(runs) <= max_rows else max_rows - 1
    return Group(header(snapshot, shown, len(snapshot.runs)), runs_table(snapshot, runs, max_rows, width))
