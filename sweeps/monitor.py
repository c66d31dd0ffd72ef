"""Watch a sweep: live dashboard, retries and recovery, checkpoint collection, results table.

    python sweeps/monitor.py SWEEP_DIR                          # live dashboard until every run has ended
    python sweeps/monitor.py SWEEP_DIR --once                   # one poll, one plain table (logs, scripts, cron)
    python sweeps/monitor.py SWEEP_DIR --json                   # one poll, the state as JSON
    python sweeps/monitor.py SWEEP_DIR --sort dice --filter state=RUNNING,STALLED --filter lr=0.001
    python sweeps/monitor.py SWEEP_DIR --compact                # runs per state for each parameter value
    python sweeps/monitor.py SWEEP_DIR --cancel RUN_ID … | all  # cancel runs (their jobs too)
    python sweeps/monitor.py SWEEP_DIR --retry RUN_ID … | all   # submit again (resumes from last.ckpt)
    python sweeps/monitor.py SWEEP_DIR --summary                # best config per fold, mean±std; SWEEP_DIR/report/
    python sweeps/monitor.py SWEEP_DIR --sync                   # upload the runs' offline W&B data (once each)
    python sweeps/monitor.py SWEEP_DIR --resume-paused RUN_ID … | all  # continue paused runs to max_epochs

Each poll asks SLURM once (one ``sacct`` for all jobs) or looks at the local jobs, reads the runs' progress files,
and updates ``SWEEP_DIR/sweep.db``: failed runs are resubmitted up to the grid's ``max_retries`` (then FAILED,
with the reason), runs that timed out without being requeued resume from their ``last.ckpt``, running runs
without a progress update for ``--stall-minutes`` are flagged STALLED, and completed runs' best checkpoints are
copied (verified by SHA-256) to ``SWEEP_DIR/models/<run_id>.ckpt`` with their metadata; ``SWEEP_DIR/results.csv``
holds one row per run. The monitor may be killed at any moment and restarted, or run twice: a lock serialises
polls and nothing is submitted twice. The dashboard exits when no run is queued or running any more (exit code 0
when all completed, 1 otherwise).

A grid with a successive-halving ``schedule:`` stops runs at rungs (PAUSED) and promotes the best configurations
from each rung (``sweeps/monitoring/promotion.py``); the dashboard's header and ``--summary`` show each configuration's rung
and score, the promotions, the paused runs and the GPU-hours against the full grid's. Paused runs count as ended
(exit code 0 when every run completed or paused); ``--resume-paused`` continues chosen ones to ``max_epochs``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from brats_ugrip.cli import run
from brats_ugrip.sweeps.monitoring.collect import SweepSummary, sweep_summary, write_results
from brats_ugrip.sweeps.monitoring.dashboard import SORT_KEYS, ViewOptions, parse_filter, render, value_text
from brats_ugrip.sweeps.monitoring.engine import PollReport, SweepMonitor, resume_paused
from brats_ugrip.sweeps.monitoring.promotion import HalvingReport
from brats_ugrip.sweeps.monitoring.snapshot import SweepSnapshot
from brats_ugrip.sweeps.state import RunState

PLAIN_WIDTH = 250  # --once to a file or pipe: wide enough that no column is cut


def _snapshot(monitor: SweepMonitor, report: PollReport) -> SweepSnapshot:
    snapshot = monitor.snapshot(report.notes)
    snapshot.poll_seconds = report.seconds
    return snapshot


def _status_line(snapshot: SweepSnapshot) -> str:
    counts = ", ".join(f"{state} {n}" for state, n in snapshot.counts.items())
    return f"{time.strftime('%H:%M:%S')} {snapshot.name}: {counts}; GPU-hours {snapshot.gpu_hours:.1f}"


def watch(monitor: SweepMonitor, options: ViewOptions, interval_s: float, out: Console) -> int:
    """Poll every ``interval_s`` and redraw every second until no run is queued or running."""
    report = monitor.poll()
    snapshot = _snapshot(monitor, report)
    if not out.is_terminal:  # piped or logged: a plain table whenever a poll changed something (--compact: a line)
        def log() -> None:
            out.print(_status_line(snapshot), highlight=False)
            if not options.compact:
                out.print(render(snapshot, options))

        log()
        while snapshot.active:
            time.sleep(interval_s)
            report = monitor.poll()
            snapshot = _snapshot(monitor, report)
            if report.changed or report.notes:
                log()
        if options.compact:
            out.print(render(snapshot, options))
        return _exit_code(snapshot)
    next_poll = time.monotonic() + interval_s
    refresh_s, last_refresh = 1.0, time.monotonic()
    with Live(render(snapshot, options, out.height, out.width), console=out, auto_refresh=False,
              vertical_overflow="crop") as live:
        while snapshot.active:
            # Between polls the rows are re-read (progress files, elapsed times, ETAs) every second, or less often
            # when reading them takes long (1000+ runs), so that watching costs at most ~5% of a core.
            time.sleep(max(0.0, min(next_poll, last_refresh + refresh_s) - time.monotonic()))
            if time.monotonic() >= next_poll:
                report = monitor.poll()
                next_poll = time.monotonic() + interval_s
            started = time.perf_counter()
            snapshot = _snapshot(monitor, report)
            refresh_s, last_refresh = max(1.0, 20 * (time.perf_counter() - started)), time.monotonic()
            live.update(render(snapshot, options, out.height, out.width), refresh=True)
    return _exit_code(snapshot)


def _exit_code(snapshot: SweepSnapshot) -> int:
    return 0 if all(r.state in (RunState.COMPLETED.value, RunState.PAUSED.value) for r in snapshot.runs) else 1


def _cell(column: str, value: object) -> str:
    """Dice and means with 4 decimals, counts as integers, parameter values as in run ids."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if column.startswith("dice") or column in ("mean", "std"):
        return f"{float(value):.4f}"
    if column == "n_folds":
        return str(int(value))
    return value_text(value) if not isinstance(value, str) else value


def _frame_table(title: str, frame, columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold")
    for column in columns:
        table.add_column(column)
    for _, row in frame.iterrows():
        table.add_row(*(_cell(c, row[c]) if c in row else "–" for c in columns))
    return table


def _mean_std_frame(frame):
    frame = frame.copy()
    frame["mean ± std"] = [f"{m:.4f} ± {s:.4f}" if not math.isnan(s) else f"{m:.4f}"
                           for m, s in zip(frame["mean"], frame["std"])]
    return frame


def print_summary(summary: SweepSummary, out: Console) -> None:
    best = summary.best_per_fold
    out.print(_frame_table("best configuration per fold (validation mean Dice of the best checkpoint)", best,
                           list(best.columns)))
    if len(summary.per_config):
        frame = _mean_std_frame(summary.per_config)
        keys = [c for c in frame.columns if c not in ("mean", "std", "n_folds", "mean ± std")]
        out.print(_frame_table("mean ± std across folds, per configuration", frame, [*keys, "mean ± std", "n_folds"]))
    for key, frame in summary.per_value.items():
        out.print(_frame_table(f"{key}: mean ± std across folds", _mean_std_frame(frame), [key, "mean ± std",
                                                                                           "n_folds"]))
    if summary.halving is not None:
        print_halving(summary.halving, out)
    if summary.curves_png is not None:
        out.print(f"learning curves (training loss, validation Dice): {summary.curves_png}", highlight=False)
    else:
        out.print("no validation Dice curves yet (no runs/<id>/csv/metrics.csv with val/dice_mean)")


def print_halving(report: HalvingReport, out: Console) -> None:
    """Successive halving: each configuration's highest rung and score there, its promotions, the cost."""
    table = Table(title=report.lines()[0], title_justify="left", title_style="bold")
    predicted = report.schedule.promote == "predicted"
    columns = ["configuration", "rung (epochs)", "score", "folds", "promoted from", "runs"]
    if predicted:
        columns.insert(3, f"predicted at {report.schedule.max_epochs} (from rung: score)")
    for column in columns:
        table.add_column(column)
    for entry in report.configs:
        row = [entry.config, str(entry.rung_epochs or "–"), "–" if entry.score is None else f"{entry.score:.4f}",
               str(entry.folds_scored), ", ".join(map(str, entry.promoted_from)) or "–",
               ", ".join(f"{state} {n}" for state, n in sorted(entry.states.items()))]
        if predicted:
            row.insert(3, ", ".join(f"{rung}: {value:.4f}" for rung, value in sorted(entry.predicted.items())) or "–")
        table.add_row(*row)
    out.print(table)
    if report.paused:
        out.print(f"paused ({len(report.paused)}; checkpoints collected in models/; continue with --resume-paused): "
                  + ", ".join(report.paused), highlight=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory (holds sweep.db)")
    parser.add_argument("--once", action="store_true", help="poll once, print one plain table and exit")
    parser.add_argument("--json", action="store_true", help="poll once, print the sweep's state as JSON and exit")
    parser.add_argument("--summary", action="store_true",
                        help="print the best config per fold and mean±std tables, write SWEEP_DIR/report/ "
                             "(Markdown, PNGs), exit")
    parser.add_argument("--sync", action="store_true",
                        help="upload the runs' offline W&B data with `wandb sync` (what was sent is never sent "
                             "again: SWEEP_DIR/wandb-synced.json), exit")
    parser.add_argument("--sort", choices=SORT_KEYS, default="grid", help="row order (default: grid order)")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE[,VALUE]",
                        help="show only matching runs: state=RUNNING,STALLED or a parameter (lr=0.001); repeatable")
    parser.add_argument("--compact", action="store_true", help="one row per parameter value (for 1000+ runs)")
    parser.add_argument("--interval", type=float, default=15.0, metavar="S", help="seconds between polls (15)")
    parser.add_argument("--cancel", nargs="+", metavar="RUN_ID", help="cancel these runs (or `all`) and exit")
    parser.add_argument("--retry", nargs="+", metavar="RUN_ID", help="submit these runs (or `all` failed) again, exit")
    parser.add_argument("--resume-paused", nargs="+", metavar="RUN_ID",
                        help="continue these paused runs (or `all`) from last.ckpt to max_epochs, and exit")
    parser.add_argument("--stall-minutes", type=float, default=60.0, metavar="M",
                        help="flag running runs without a progress update for M minutes (60)")
    parser.add_argument("--collect-last", action="store_true", help="also copy last.ckpt to models/last/")
    parser.add_argument("--take-over", action="store_true",
                        help="follow a sweep owned by another host (stop that host's monitor first)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.interval <= 0 or args.stall_minutes <= 0:
        parser.error("--interval and --stall-minutes must be positive")

    out = Console(width=None if Console().is_terminal else PLAIN_WIDTH)
    monitor = SweepMonitor(args.sweep_dir, stall_minutes=args.stall_minutes, collect_last=args.collect_last,
                           take_over=args.take_over)
    try:
        if args.cancel:
            cancelled = monitor.cancel(args.cancel)
            out.print(f"cancelled {len(cancelled)} runs" + (f": {', '.join(cancelled)}" if cancelled else ""),
                      highlight=False)
            return 0
        if args.retry:
            submitted = monitor.retry(args.retry)
            for run_id, job_id in submitted.items():
                out.print(f"{run_id}: resubmitted as job {job_id}", highlight=False)
            if not submitted:
                out.print("nothing to retry")
            return 0
        if args.resume_paused:
            for run_id, job_id in resume_paused(monitor, args.resume_paused).items():
                out.print(f"{run_id}: continues to max_epochs as job {job_id}", highlight=False)
            return 0
        snapshot_keys = monitor.snapshot().varied_keys
        options = ViewOptions(sort=args.sort, filters=[parse_filter(f, snapshot_keys) for f in args.filter],
                              compact=args.compact)
        if args.sync:
            from brats_ugrip.sweeps.wandb_sync import report_lines, sync_sweep

            sync_report = sync_sweep(args.sweep_dir, state=monitor.state)
            out.print("\n".join(report_lines(sync_report)), highlight=False)
            return 1 if sync_report.failed else 0
        if args.summary:
            from brats_ugrip.sweeps.monitoring.report import plot_learning_curves, write_report

            write_results(args.sweep_dir, monitor.state)
            summary = sweep_summary(args.sweep_dir, monitor.state)
            summary.curves_png = plot_learning_curves(args.sweep_dir, monitor.state.runs())
            print_summary(summary, out)
            out.print(f"sweep report: {write_report(args.sweep_dir, monitor.state).path}", highlight=False)
            return 0
        if args.json or args.once:
            report = monitor.poll()
            snapshot = _snapshot(monitor, report)
            if args.json:
                state = snapshot.to_dict()
                state["poll"] = {"seconds": report.seconds, "resubmitted": report.resubmitted,
                                 "failed": report.failed, "collected": report.collected, "adopted": report.adopted}
                print(json.dumps(state, default=str))
            else:
                out.print(render(snapshot, options, width=out.width if out.is_terminal else None))
            return 0
        return watch(monitor, options, args.interval, out)
    finally:
        monitor.close()


if __name__ == "__main__":
    run(main)
