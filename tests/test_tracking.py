"""Experiment tracking around a sweep: what the launcher hands W&B, syncing offline runs (``wandb sync`` is not
reachable here: the command it would run and the bookkeeping are checked), and the sweep report (its numbers
against ``results.csv``), on a ``sweep.db`` and run directories written by hand: no training."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from brats_ugrip.config import load_config
from brats_ugrip.errors import ConfigError
from brats_ugrip.sweeps import monitor as monitor_cli
from brats_ugrip.sweeps import wandb_sync
from brats_ugrip.sweeps.layout import run_dir_path, sweep_db_path
from brats_ugrip.sweeps.run_ids import param_tags
from brats_ugrip.sweeps.state import RunRecord, RunState, SweepState
from brats_ugrip.sweeps.wandb_sync import SYNCED_FILE, read_synced, sync_sweep

WANDB = "/opt/bin/wandb"


# --- what runs hand W&B ------------------------------------------------------------------------------------


def test_tags_are_the_varied_key_values_within_wandbs_limit():
    tags = param_tags({"optim.lr": 0.001, "data.fold": 0, "data.roi_size": [64, 64, 64],
                       "data.datalist": "/very/long/" + "x" * 80 + ".json"})
    assert tags[:3] == ["optim.lr=0.001", "data.fold=0", "data.roi_size=64x64x64"]
    assert len(tags[3]) == 64 and tags[3].startswith("data.datalist=xxx")  # W&B refuses tags over 64 characters


def test_logging_keys_are_validated_with_their_path():
    base = {"data": {"datalist": "d.json"}}
    config = load_config(base=base, overrides={"logging.group": "ssa", "logging.tags": ["optim.lr=0.001"],
                                               "logging.varied": ["optim.lr"]})
    assert config.logging.mode == "offline"  # every run, on SLURM too, unless a grid or config says online
    assert config.logging.group == "ssa" and config.logging.tags == ["optim.lr=0.001"]
    for override, key in (({"logging.tags": ["x" * 65]}, "logging.tags[0]"), ({"logging.tags": "a"}, "logging.tags"),
                          ({"logging.group": ""}, "logging.group"),
                          ({"logging.varied": ["optim."]}, "logging.varied[0]"),
                          ({"logging.entity": "me"}, "logging.entity")):
        with pytest.raises(ConfigError) as error:
            load_config(base=base, overrides=override)
        assert error.value.key_path == key


# --- syncing offline runs ----------------------------------------------------------------------------------


def _segment(run_dir: Path, started: str, wandb_id: str, data: bytes = b"records") -> Path:
    """An attempt's offline W&B folder, as wandb names it: offline-run-<start time>-<id>/run-<id>.wandb."""
    folder = run_dir / "wandb" / f"offline-run-{started}-{wandb_id}"
    folder.mkdir(parents=True)
    (folder / f"run-{wandb_id}.wandb").write_bytes(data)
    return folder


def _add_runs(sweep_dir: Path, states: dict[str, RunState]) -> None:
    with SweepState(sweep_db_path(sweep_dir)) as state:
        records = [RunRecord(run_id=run_id, config={"data": {"fold": 0}}, params={"optim.lr": float(i)},
                             run_dir=str(run_dir_path(sweep_dir, run_id)), state=run_state)
                   for i, (run_id, run_state) in enumerate(states.items())]
        state.add_runs(records)


class Recorder:
    """A ``wandb sync`` stand-in: records each command and answers ``status``."""

    def __init__(self, status: int = 0):
        self.commands: list[list[str]] = []
        self.status = status

    def __call__(self, command: list[str]) -> int:
        self.commands.append(command)
        return self.status


def test_sync_sends_each_offline_segment_once(tmp_path):
    _add_runs(tmp_path, {"a": RunState.COMPLETED, "b": RunState.RUNNING, "c": RunState.FAILED, "d": RunState.COMPLETED})
    a1 = _segment(run_dir_path(tmp_path, "a"), "20260101_100000", "ida")
    a2 = _segment(run_dir_path(tmp_path, "a"), "20260101_120000", "ida")  # resumed after a requeue
    b1 = _segment(run_dir_path(tmp_path, "b"), "20260101_100000", "idb")
    b2 = _segment(run_dir_path(tmp_path, "b"), "20260102_080000", "idb")  # the running attempt's
    c1 = _segment(run_dir_path(tmp_path, "c"), "20260101_100000", "idc")
    # d logged nothing to W&B (logging.mode: disabled)

    runner = Recorder()
    report = sync_sweep(tmp_path, runner=runner, executable=WANDB)
    # One command per run, its segments oldest first; the running attempt's segment waits.
    assert runner.commands == [[WANDB, "sync", "--include-synced", str(a1), str(a2)],
                               [WANDB, "sync", "--include-synced", str(b1)],
                               [WANDB, "sync", "--include-synced", str(c1)]]
    assert report.waiting == ["runs/b/wandb/offline-run-20260102_080000-idb"] and not report.failed
    synced = json.loads((tmp_path / SYNCED_FILE).read_text())["segments"]
    assert sorted(synced) == ["runs/a/wandb/offline-run-20260101_100000-ida",
                              "runs/a/wandb/offline-run-20260101_120000-ida",
                              "runs/b/wandb/offline-run-20260101_100000-idb",
                              "runs/c/wandb/offline-run-20260101_100000-idc"]
    record = synced["runs/a/wandb/offline-run-20260101_120000-ida"]
    assert record["run_id"] == "a" and record["wandb_id"] == "ida" and record["size"] == len(b"records")
    assert not list(tmp_path.glob(f".{SYNCED_FILE}.*"))  # written atomically: no temporary file left

    runner = Recorder()
    again = sync_sweep(tmp_path, runner=runner, executable=WANDB)
    assert runner.commands == [] and again.up_to_date == 4 and again.synced == {}

    # Run a is resumed once more, b finishes, c's old segment was appended to: only the new data goes.
    a3 = _segment(run_dir_path(tmp_path, "a"), "20260103_090000", "ida")
    with SweepState(sweep_db_path(tmp_path)) as state:
        state.update_run("b", state=RunState.COMPLETED)
    log = c1 / "run-idc.wandb"
    log.write_bytes(b"records and more")
    runner = Recorder()
    sync_sweep(tmp_path, runner=runner, executable=WANDB)
    assert runner.commands == [[WANDB, "sync", "--include-synced", str(a3)],
                               [WANDB, "sync", "--include-synced", str(b2)],
                               [WANDB, "sync", "--include-synced", str(c1)]]
    assert read_synced(tmp_path)["runs/c/wandb/offline-run-20260101_100000-idc"]["size"] == len(b"records and more")


def test_a_failed_sync_records_nothing_and_is_tried_again(tmp_path):
    _add_runs(tmp_path, {"a": RunState.COMPLETED, "b": RunState.COMPLETED})
    a1 = _segment(run_dir_path(tmp_path, "a"), "20260101_100000", "ida")
    b1 = _segment(run_dir_path(tmp_path, "b"), "20260101_100000", "idb")
    failing = Recorder(status=1)
    report = sync_sweep(tmp_path, runner=failing, executable=WANDB)
    assert len(failing.commands) == 2 and set(report.failed) == {"a", "b"} and read_synced(tmp_path) == {}
    runner = Recorder()
    sync_sweep(tmp_path, runner=runner, executable=WANDB)
    assert runner.commands == [[WANDB, "sync", "--include-synced", str(a1)],
                               [WANDB, "sync", "--include-synced", str(b1)]]


def test_monitor_sync_flag(tmp_path, monkeypatch, capsys):
    _add_runs(tmp_path, {"a": RunState.COMPLETED})
    a1 = _segment(run_dir_path(tmp_path, "a"), "20260101_100000", "ida")
    runner = Recorder()
    monkeypatch.setattr(wandb_sync, "run_command", runner)
    assert monitor_cli.main([str(tmp_path), "--sync"]) == 0
    assert runner.commands == [[wandb_sync.wandb_command(), "sync", "--include-synced", str(a1)]]
    assert "1 offline segments of 1 runs sent" in capsys.readouterr().out
    assert monitor_cli.main([str(tmp_path), "--sync"]) == 0 and len(runner.commands) == 1
    runner.status = 1
    os.utime(a1 / "run-ida.wandb", ns=(1, 1))  # changed since it was sent: sent again, and this time it fails
    assert monitor_cli.main([str(tmp_path), "--sync"]) == 1


# --- the sweep report --------------------------------------------------------------------------------------

# Validation mean Dice of each run's best checkpoint: (lr, init_filters, fold) → Dice; None: the run failed.
DICE = {(0.001, 8, 0): 0.70, (0.001, 8, 1): 0.60, (0.001, 16, 0): 0.95, (0.001, 16, 1): None,
        (0.01, 8, 0): 0.80, (0.01, 8, 1): 0.76, (0.01, 16, 0): 0.85, (0.01, 16, 1): 0.81}
T0 = 1_800_000_000.0


def _log_csv(run_dir: Path, dice: float, epochs: int = 3) -> None:
    """A Lightning CSV log as training writes it: step rows, then validation and train-epoch rows per epoch."""
    lines = ["epoch,step,train/loss_step,train/loss_epoch,val/dice_mean"]
    for epoch in range(epochs):
        value = dice * (epoch + 1) / epochs
        lines += [f"{epoch},{2 * epoch},1.0,,", f"{epoch},{2 * epoch + 1},,,{value}", f"{epoch},{2 * epoch + 1},,"
                  f"{1.5 - value},"]
    (run_dir / "csv").mkdir(parents=True)
    (run_dir / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def report_sweep(tmp_path):
    """8 runs (lr × init_filters × fold): 7 completed after one 30-minute attempt on 1 GPU, one failed twice
    (two 10-minute attempts); CSV logs and progress files as training writes them."""
    with SweepState(sweep_db_path(tmp_path)) as state:
        state.set_meta("name", "report_demo")
        for (lr, filters, fold), dice in DICE.items():
            run_id = f"filters={filters}-fold={fold}-lr={lr}"
            run_dir = run_dir_path(tmp_path, run_id)
            run_dir.mkdir(parents=True)
            metrics = {} if dice is None else {"val_metrics": {"TC": dice, "WT": dice, "ET": dice, "mean": dice},
                                               "best_val_dice": dice, "best_epoch": 3, "epochs": 3}
            state.add_runs([RunRecord(run_id=run_id, config={"data": {"fold": fold}, "optim": {"lr": lr}},
                                      params={"optim.lr": lr, "model.init_filters": filters, "data.fold": fold},
                                      run_dir=str(run_dir), submit={"cluster": "slurm",
                                                                    "parameters": {"gpus_per_node": 1}},
                                      max_retries=1, metrics=metrics)])
            durations = [1800.0] if dice is not None else [600.0, 600.0]
            for attempt, seconds in enumerate(durations, 1):
                state.record_submission(run_id, f"{len(DICE)}{attempt}")
                state.update_attempt(run_id, attempt, started_at=T0, ended_at=T0 + seconds, node="gpu07",
                                     state="COMPLETED" if dice is not None else "FAILED",
                                     error_tail=None if dice is not None else "Traceback ...\nRuntimeError: CUDA out "
                                                                              "of memory\n")
            if dice is None:
                state.update_run(run_id, state=RunState.FAILED, reason="failed 2 times (out of retries)")
            else:
                state.update_run(run_id, state=RunState.COMPLETED)
                _log_csv(run_dir, dice)
            (run_dir / "progress.json").write_text(json.dumps({"host": "gpu07", "gpu": "NVIDIA H100"}))
    return tmp_path


def _markdown_rows(text: str, heading: str) -> list[dict[str, str]]:
    """The first Markdown table after ``heading``, as dicts of cell text."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return [dict(zip(table[0], row)) for row in table[2:]]


def test_report_numbers_are_results_csv_numbers(report_sweep):
    import pandas as pd

    from brats_ugrip.sweeps.monitoring.collect import write_results
    from brats_ugrip.sweeps.monitoring.report import write_report

    with SweepState(sweep_db_path(report_sweep)) as state:
        results = pd.read_csv(write_results(report_sweep, state)).set_index("run_id")
        report = write_report(report_sweep, state)
    text = report.path.read_text()
    assert report.path == report_sweep / "report" / "report.md"

    folds = {row["configuration"]: row for row in _markdown_rows(text, "Configuration × fold")}
    assert list(folds) == ["init_filters=16 lr=0.01", "init_filters=8 lr=0.01", "init_filters=8 lr=0.001",
                           "init_filters=16 lr=0.001"]  # most folds first, then the highest mean
    for (lr, filters, fold), dice in DICE.items():
        cell = folds[f"init_filters={filters} lr={lr}"][f"fold {fold}"]
        expected = results.loc[f"filters={filters}-fold={fold}-lr={lr}", "dice_mean"]
        assert cell == ("–" if dice is None else f"{expected:.4f}") and (dice is None or expected == dice)
    assert folds["init_filters=16 lr=0.01"]["mean"] == f"{(0.85 + 0.81) / 2:.4f}"
    assert folds["init_filters=16 lr=0.001"]["n_folds"] == "1"
    # The 0.95 of a configuration that failed on fold 1 does not beat 0.83 over both folds.
    # Two folds, 0.85 and 0.81: a bootstrap resample's mean is 0.81, 0.83 or 0.85 (probability 1/4, 1/2, 1/4), so
    # the 95 % interval is [0.81, 0.85]; 8/0.01 gives [0.76, 0.80] and 8/0.001 [0.60, 0.70]: no overlap, no tie
    # (16/0.001 ran on one fold only and is not compared).
    assert ("Best configuration: `init_filters=16 lr=0.01`**, validation mean Dice 0.8300 over 2 folds, 95 % "
            "interval [0.8100, 0.8500]") in text
    assert "No configuration's interval overlaps the best's" in text
    # sd of (0.85, 0.81) = 0.04 / √2; the configurations' sds are 0.0283, 0.0283, 0.0707: median 0.0283.
    assert ("sd over folds is 0.0283 (range 0.8100–0.8500); median sd of all configurations 0.0283") in text

    per_lr = {row["optim.lr"]: row for row in _markdown_rows(text, "### `optim.lr`")}
    fold_means = [(0.80 + 0.85) / 2, (0.76 + 0.81) / 2]  # per fold, the mean over the runs with lr = 0.01
    assert per_lr["0.01"]["mean"] == f"{sum(fold_means) / 2:.4f}"
    assert per_lr["0.01"]["sd"] == f"{abs(fold_means[0] - fold_means[1]) / 2 ** 0.5:.4f}"

    compute = {row["run_id"]: row for row in _markdown_rows(text, "## Compute")}
    assert compute["filters=8-fold=0-lr=0.01"]["gpu_hours"] == "0.500"
    assert compute["filters=16-fold=1-lr=0.001"]["gpu_hours"] == "0.333"  # two 10-minute attempts
    assert compute["filters=8-fold=0-lr=0.01"]["gpu"] == "NVIDIA H100"
    assert f"**{7 * 0.5 + 2 * 600 / 3600:.2f} GPU-hours** in total" in text
    (failed,) = _markdown_rows(text, "## Failed runs")
    assert failed["run_id"] == "filters=16-fold=1-lr=0.001" and failed["attempts"] == "2"
    assert failed["reason"] == "failed 2 times (out of retries)"
    assert failed["error"] == "RuntimeError: CUDA out of memory"

    names = sorted(path.name for path in report.figures)
    assert names == ["dice_vs_model.init_filters.png", "dice_vs_optim.lr.png", "heatmap.png", "learning_curves.png"]
    for path in report.figures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({path.name})" in text


def test_learning_curves_read_train_loss_and_validation_dice(report_sweep):
    from brats_ugrip.sweeps.monitoring.report import read_log

    log = read_log(run_dir_path(report_sweep, "filters=8-fold=0-lr=0.01"))
    assert list(log["epoch"]) == [1, 2, 3]
    assert list(log["val_dice"]) == pytest.approx([0.80 / 3, 0.80 * 2 / 3, 0.80])
    assert list(log["train_loss"]) == pytest.approx([1.5 - 0.80 / 3, 1.5 - 0.80 * 2 / 3, 1.5 - 0.80])


def test_monitor_summary_prints_the_report_path(report_sweep, capsys):
    assert monitor_cli.main([str(report_sweep), "--summary"]) == 0
    out = capsys.readouterr().out
    assert f"sweep report: {report_sweep / 'report' / 'report.md'}" in out.replace("\n", "")


def test_slurm_sweep_runs_log_offline_grouped_and_tagged(tmp_path, phantom_dir, tiny_run_base):
    """A SLURM grid that says nothing about logging: every run logs to W&B offline (compute nodes rarely reach
    the internet), named by its run id, grouped by the sweep, tagged with its varied values."""
    import yaml

    from brats_ugrip.data import make_datalist, save_datalist
    from brats_ugrip.sweeps.launch import plan_launch

    datalist = save_datalist(make_datalist(phantom_dir, 2, 0), tmp_path / "datalist.json")
    base = tiny_run_base(datalist)
    del base["logging"]
    grid = {"name": "ssa_lr", "base": base, "grid": {"optim.lr": [0.001, 0.01], "data.fold": [0, 1]},
            "executor": {"cluster": "slurm", "gpus_per_node": 1}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))  # tags in the grid's order
    plan = plan_launch(tmp_path / "grid.yaml", tmp_path / "sweep")
    assert len(plan.runs) == 4
    for record in plan.runs:
        lr, fold = record.params["optim.lr"], record.params["data.fold"]
        assert record.config["logging"] == {"project": "brats-ugrip", "run_name": record.run_id, "mode": "offline",
                                            "group": "ssa_lr", "job_type": None,
                                            "tags": [f"optim.lr={lr}", f"data.fold={fold}"],
                                            "varied": ["optim.lr", "data.fold"]}


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
                  "--hide-scrollbars")
# Written into the page by the page itself once it has loaded: how many tables, and each image's decoded size.
RENDER_CHECK = """<script>
window.addEventListener('load', () => {
  const out = document.createElement('pre'); out.id = 'render-check';
  out.textContent = JSON.stringify({tables: document.querySelectorAll('table').length,
    images: [...document.images].map(i => [i.naturalWidth, i.naturalHeight])});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (bash run.sh test installs Debian's chromium when it can)")
    return found


def test_html_report_is_self_contained_and_renders_in_chromium(report_sweep, tmp_path):
    import html as html_module
    import re
    import subprocess

    import matplotlib.image

    from brats_ugrip.sweeps.monitoring.report import write_report

    with SweepState(sweep_db_path(report_sweep)) as state:
        report = write_report(report_sweep, state)
    page = report.html.read_text()
    assert report.html == report_sweep / "report" / "report.html"
    # Self-contained: every figure inline, nothing fetched from anywhere.
    assert page.count('<img src="data:image/png;base64,') == len(report.figures) == 4
    assert not re.search(r'(src|href)="(https?:|//|file:)', page) and "<table>" in page

    browser = _chromium()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", RENDER_CHECK + "</body>"))
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="render-check">(.*?)</pre>', dom, re.S)
    assert found, f"the page did not finish loading in Chromium: {dom[:500]!r}"
    rendered = json.loads(html_module.unescape(found.group(1)))
    assert rendered["tables"] >= 5  # best configuration, two parameters, compute, failed runs
    assert len(rendered["images"]) == 4 and all(w > 0 and h > 0 for w, h in rendered["images"])

    shot = tmp_path / "shot.png"
    subprocess.run([*common, "--window-size=1200,1600", f"--screenshot={shot}", report.html.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = matplotlib.image.imread(shot)
    assert pixels.std() > 0.05  # not a blank page: text, tables and figures drawn
