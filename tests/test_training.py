import csv
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from brats_ugrip.checkpoints import git_commit, load_checkpoint, load_model, model_state_dict
from brats_ugrip.config import LossConfig, OptimConfig, load_config
from brats_ugrip.data import Datalist, make_datalist, save_datalist
from brats_ugrip.heldout import HeldOutSet, checkpoint_settings, validation_fingerprint
from brats_ugrip.inference import inference_settings, sliding_window_probabilities
from brats_ugrip.loaders import make_loaders
from brats_ugrip.losses import SegmentationLoss, mednext_ds_weights
from brats_ugrip.optim import WarmupSchedule, averaged_parameters, build_optimizer, set_train_mode
from brats_ugrip.training import evaluate, read_progress, train, wandb_run_id

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(phantom_dir, tmp_path_factory):
    """A datalist over the phantoms (3 folds: 4 training and 2 validation cases) and a shared case cache."""
    root = tmp_path_factory.mktemp("training")
    datalist = save_datalist(make_datalist(phantom_dir, 3, 0), root / "datalist.json")
    return root, datalist


def tiny_config(workspace, **overrides):
    root, datalist = workspace
    base = {
        "data": {"datalist": str(datalist), "roi_size": [32, 32, 32], "batch_size": 2, "cache_dir": str(root / "cache")},
        "model": {"name": "segresnet", "init_filters": 8},
        "optim": {"name": "adamw_sf", "lr": 0.01},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "log_every_n_steps": 1},
        "inference": {"roi_size": [48, 48, 48], "sw_batch_size": 1},  # one window per 48³ phantom's brain
        "logging": {"mode": "disabled"},
    }
    return load_config(base=base, overrides=overrides)


def csv_rows(run_dir):
    with open(Path(run_dir) / "csv" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def segresnet_run(workspace):
    config = tiny_config(workspace, **{"logging.mode": "offline", "logging.run_name": "tiny",
                                       "logging.group": "tiny_sweep", "logging.tags": ["optim.lr=0.01"],
                                       "logging.varied": ["optim.lr"]})
    run_dir = workspace[0] / "segresnet"
    return config, run_dir, train(config, run_dir)


def test_tiny_segresnet_run_writes_a_complete_run_directory(segresnet_run):
    config, run_dir, summary = segresnet_run
    assert summary["status"] == "completed" and summary["epochs"] == 2 and summary["steps"] == 4
    progress = read_progress(run_dir)
    assert progress["status"] == "completed" and progress["epoch"] == 2 and progress["max_epochs"] == 2
    assert progress["step"] == 4 and progress["host"] and progress["finished_at"] and progress["started_at"]
    # every validation, in order (what promote: predicted extrapolates); the last one is val_metrics
    assert [e for e, _ in progress["val_curve"]] == sorted({e for e, _ in progress["val_curve"]})
    assert progress["val_curve"] and progress["val_curve"][-1][1] == pytest.approx(progress["val_metrics"])
    assert 0 <= progress["best_val_dice"] <= 1 and progress["best_epoch"] in (1, 2)
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == {**config.to_dict(), "run_dir": str(run_dir)}

    checkpoint = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    meta = checkpoint["brats_ugrip"]
    assert meta["model"] == {"name": "segresnet", "kwargs": {"init_filters": 8, "dropout": 0.0}}
    assert meta["fold"] == 0 and meta["epoch"] == progress["best_epoch"] == meta["val_epoch"]
    assert set(meta["val_metrics"]) == {"TC", "WT", "ET", "mean"}
    assert meta["val_metrics"]["mean"] == pytest.approx(progress["best_val_dice"])
    assert meta["weights"] == "averaged" and meta["config_hash"] == config.hash()
    assert len(meta["init_id"]) == 16 and meta["init_id"] == summary["init_id"]
    assert meta["config"]["optim"]["lr"] == 0.01
    # The cases it trained and validated on travel inside it (the test-split guard reads them, not the datalist).
    train_cases, val_cases = Datalist.load(config.data.datalist).split(0)
    assert meta["cases"] == {"train": sorted(c.case_id for c in train_cases),
                             "val": sorted(c.case_id for c in val_cases), "init": []}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    # The validation cases and settings are named in the checkpoint, as souping rebuilds them from the datalist.
    stored = meta.pop("val_fingerprint")
    assert len(stored) == 16 and stored == validation_fingerprint(meta)

    logged = [float(r["val/dice_mean"]) for r in csv_rows(run_dir) if r.get("val/dice_mean")]
    assert len(logged) == 2 and max(logged) == pytest.approx(progress["best_val_dice"])


def wandb_records(log: Path) -> list[dict]:
    """The records of an offline run's ``.wandb`` file, as ``wandb leet inspect --json`` reads them."""
    result = subprocess.run([str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json", str(log)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_wandb_offline_run_holds_the_logged_metrics(segresnet_run):
    _, run_dir, _ = segresnet_run
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(log)
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    assert any("train/loss_step" in item for item in history)
    wandb_dice = [item["val/dice_mean"] for item in history if "val/dice_mean" in item]
    csv_dice = [float(r["val/dice_mean"]) for r in csv_rows(run_dir) if r.get("val/dice_mean")]
    assert len(wandb_dice) == 2 and wandb_dice == pytest.approx(csv_dice)


def test_wandb_offline_run_holds_config_group_tags_and_code_version(segresnet_run):
    """What W&B groups and filters by: the resolved config as dotted keys, the sweep's group, the fold as job type,
    the varied key=value as tags, the run's name; code version and node in the summary."""
    config, run_dir, _ = segresnet_run
    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(log)
    (run,) = [r["run"] for r in records if r.get("type") == "run"]
    logged = run["config"]["update"]
    assert logged["optim.lr"] == 0.01 and logged["data.fold"] == 0 and logged["model.name"] == "segresnet"
    assert logged["data.roi_size"] == [32, 32, 32] and logged["logging.varied"] == ["optim.lr"]
    assert logged["config_hash"] == config.hash()
    assert run["run_group"] == "tiny_sweep" and run["job_type"] == "fold0" and run["tags"] == ["optim.lr=0.01"]
    assert run["display_name"] == "tiny" and run["run_id"] == log.stem.removeprefix("run-")
    summary = {}
    for record in records:
        if record.get("type") == "summary":
            summary.update(record["summary"]["update"])
    assert summary["git_commit"] == git_commit() and summary["git_commit"]
    assert summary["host"] == socket.gethostname() and summary["gpu"] is None and summary["gpu_count"] == 0


class StopAtEpoch(Callback):
    """Stops a run as SLURM's SIGTERM does (a requeue or preemption), when epoch ``epoch`` (0-based) starts."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise SIGTERMException()


def test_requeued_run_continues_the_same_wandb_run(workspace, tmp_path):
    """A run stopped after its first epoch and started again in its directory (what a requeue does) resumes from
    last.ckpt and logs to the same W&B run: two offline segments with one run id, which `wandb sync` joins."""
    config = tiny_config(workspace, **{"logging.mode": "offline", "trainer.limit_train_batches": 1,
                                       "trainer.limit_val_batches": 1})
    run_dir = tmp_path / "run"
    with pytest.raises(SIGTERMException):
        train(config, run_dir, callbacks=[StopAtEpoch(1)])
    assert read_progress(run_dir)["status"] == "interrupted"
    summary = train(config, run_dir)
    assert summary["epochs"] == 2
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2
    ids = set()
    for segment in segments:
        (log,) = segment.glob("run-*.wandb")
        (run,) = [r["run"] for r in wandb_records(log) if r.get("type") == "run"]
        ids.add(run["run_id"])
        # W&B names a folder offline-run-<time>-<id>, with "-1" appended when an attempt starts within the second
        # of the previous one (as a quick restart here can).
        assert re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run['run_id']}(-\d+)?", segment.name), segment.name
        assert run["resume"] is True
    assert ids == {wandb_run_id(config, run_dir.resolve())}
    epochs = [item["epoch"] for item in (r["history"]["item"] for r in wandb_records(log) if r.get("type") == "history")
              if "val/dice_mean" in item]
    assert epochs == [1]  # the second segment continues with the second epoch


class RecordTrainWeights(Callback):
    """The train-mode (y) weights and the schedule-free z after the last optimizer step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        self.y = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
        self.z = {n: optimizer.state[p]["z"].clone() for n, p in pl_module.model.named_parameters()}  # all stepped
        self.beta1 = optimizer.param_groups[0]["betas"][0]
        self.train_mode = optimizer.param_groups[0]["train_mode"]


def test_tiny_mednext_schedule_free_checkpoints_hold_averaged_weights(workspace):
    # Validation every 2nd of 3 epochs: best.ckpt is written after validation (optimizer in eval mode); the
    # final last.ckpt at a train epoch end with the optimizer still in train mode (the on_save_checkpoint guard).
    config = tiny_config(workspace, **{"model.name": "mednext_s", "model.deep_supervision": True,
                                       "trainer.max_epochs": 3, "trainer.val_every": 2})
    run_dir = workspace[0] / "mednext"
    recorder = RecordTrainWeights()
    summary = train(config, run_dir, callbacks=[recorder])
    assert summary["epochs"] == 3 and recorder.train_mode

    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    weights = model_state_dict(last)
    averaged_diff = y_diff = 0.0
    for name, y in recorder.y.items():
        x = y.lerp(recorder.z[name], 1 - 1 / recorder.beta1)
        averaged_diff = max(averaged_diff, float((weights[name] - x).abs().max()))
        y_diff = max(y_diff, float((weights[name] - y).abs().max()))
    assert averaged_diff < 1e-6 < 1e-4 < y_diff
    assert all(not g["train_mode"] for g in last["optimizer_states"][0]["param_groups"])
    assert last["brats_ugrip"]["weights"] == "averaged" and last["brats_ugrip"]["epoch"] == 3

    model, meta = load_model(run_dir / "checkpoints" / "best.ckpt")
    assert meta["val_epoch"] == meta["epoch"] == 2
    _, val_loader = make_loaders(Datalist.load(config.data.datalist), 0, "brats2023", config.data.roi_size, 2,
                                 config.data.cache_dir)
    reproduced = evaluate(model, val_loader, inference_settings(config))
    for region, value in meta["val_metrics"].items():
        assert reproduced[region] == pytest.approx(value, abs=1e-5)


def test_freezing_keeps_frozen_parameters_bit_identical(workspace, segresnet_run):
    _, source_dir, source_summary = segresnet_run
    source = source_dir / "checkpoints" / "best.ckpt"
    config = tiny_config(workspace, **{"finetune.init_from": str(source), "finetune.freeze.all_but_last": 2,
                                       "optim.name": "adamw", "trainer.max_epochs": 1})
    summary = train(config, workspace[0] / "frozen")
    before = model_state_dict(load_checkpoint(source))
    after = model_state_dict(load_checkpoint(workspace[0] / "frozen" / "checkpoints" / "last.ckpt"))
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["conv_final.2.conv.bias", "conv_final.2.conv.weight"]  # SegResNet's output convolution
    assert summary["init_id"] == source_summary["init_id"]  # fine-tuned runs share the source's initialisation
    # ... and inherit the cases it had seen (here the same folds: 6 phantoms, none unseen).
    frozen_meta = load_checkpoint(workspace[0] / "frozen" / "checkpoints" / "last.ckpt")["brats_ugrip"]
    assert set(frozen_meta["cases"]["init"]) == {c.case_id for c in Datalist.load(workspace[1]).training}
    assert read_progress(workspace[0] / "frozen")["trainable_parameters"] == 3 * 8 + 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast inference runs on GPUs only")
def test_bf16_inference_agrees_with_fp32(segresnet_run):
    config, run_dir, _ = segresnet_run
    model, _ = load_model(run_dir / "checkpoints" / "best.ckpt", map_location="cuda")
    _, val_loader = make_loaders(Datalist.load(config.data.datalist), 0, "brats2023", config.data.roi_size, 2,
                                 config.data.cache_dir)
    settings = inference_settings(config)
    fp32 = evaluate(model, val_loader, settings)
    bf16 = evaluate(model, val_loader, dataclasses.replace(settings, precision="bf16"))
    assert all(abs(fp32[r] - bf16[r]) <= 0.01 for r in fp32)


def test_bf16_autocast_agrees_with_fp32_on_cpu(segresnet_run):
    """The bf16 check where CI can run it: the trained network's sliding window under CPU bf16 autocast. (The
    project's ``inference.precision: bf16`` applies on GPUs only: CPU bf16 3-D convolutions are many times slower.)"""
    config, run_dir, _ = segresnet_run
    model, _ = load_model(run_dir / "checkpoints" / "best.ckpt")
    _, val_loader = make_loaders(Datalist.load(config.data.datalist), 0, "brats2023", config.data.roi_size, 2,
                                 config.data.cache_dir)
    settings = inference_settings(config)
    image = next(iter(val_loader))["image"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_probabilities = sliding_window_probabilities(model, image, settings)
        bf16 = evaluate(model, val_loader, settings)
    assert not torch.equal(bf16_probabilities, sliding_window_probabilities(model, image, settings))  # bf16 did run
    fp32 = evaluate(model, val_loader, settings)
    assert all(abs(fp32[r] - bf16[r]) <= 0.01 for r in fp32)


def test_resume_after_sigkill_mid_epoch_finishes_the_same_epochs(workspace, tmp_path):
    config = tiny_config(workspace, **{"trainer.max_epochs": 3, "data.samples_per_case": 2,
                                       "trainer.limit_val_batches": 0})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "brats_ugrip.train", str(path), "--run-dir", str(run_dir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 600
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        steps_at_first_checkpoint = load_checkpoint(last)["global_step"]
        # Into the next epoch: at least one more optimizer step logged, then kill without warning.
        while process.poll() is None and time.monotonic() < deadline:
            rows = csv_rows(run_dir) if (run_dir / "csv" / "metrics.csv").exists() else []
            if any(int(r["step"]) > steps_at_first_checkpoint + 1 for r in rows):
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert read_progress(run_dir)["status"] == "running"
    killed_at = load_checkpoint(last)["brats_ugrip"]["epoch"]
    assert 1 <= killed_at < 3

    summary = train(path, run_dir)
    steps_per_epoch = 4 * 2 // 2
    assert summary["epochs"] == 3 and summary["steps"] == 3 * steps_per_epoch
    final = load_checkpoint(last)
    assert final["brats_ugrip"]["epoch"] == 3 and final["global_step"] == 3 * steps_per_epoch
    for checkpoint in (run_dir / "checkpoints").iterdir():
        load_checkpoint(checkpoint)  # every file left is complete
    assert not list((run_dir / "checkpoints").glob(".*"))
    progress = read_progress(run_dir)
    assert progress["status"] == "completed" and progress["epoch"] == 3
    epochs_logged = {int(r["epoch"]) for r in csv_rows(run_dir) if r.get("train/loss_epoch")}
    assert epochs_logged == {0, 1, 2}  # the log of the killed attempt is continued, not replaced


@pytest.mark.slow
def test_two_process_run_scores_the_whole_fold_once(phantom_dir, tmp_path):
    """Two processes (torchrun; DDP with gloo on CPU) train one run. Each scores its share of the 3 validation
    cases (the sampler repeats one to even the shares); the shares are gathered, so the checkpoint holds the
    metrics and fingerprint of the whole fold, as one process scores it."""
    datalist = save_datalist(make_datalist(phantom_dir, 2, 0), tmp_path / "datalist.json")
    config = tiny_config((tmp_path, datalist), **{"trainer.val_every": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "brats_ugrip.train", str(path), "--run-dir", str(run_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Starting with 2 processes" in output and output.count("done 2 epochs") == 1  # one summary: rank 0's

    model, meta = load_model(run_dir / "checkpoints" / "best.ckpt")
    held_out = HeldOutSet.from_fold(Datalist.load(datalist), 0, cache_dir=tmp_path / "cache")
    settings = checkpoint_settings(meta)
    assert len(held_out) == 3 and meta["val_fingerprint"] == held_out.fingerprint(settings)
    score = held_out.score(model, settings)
    assert meta["val_metrics"] == pytest.approx({**score.dice, "mean": score.mean}, abs=1e-6)
    progress = read_progress(run_dir)
    assert progress["status"] == "completed" and progress["epoch"] == 2
    assert progress["best_val_dice"] == pytest.approx(meta["val_metrics"]["mean"])


def test_schedules_and_deep_supervision_weights():
    warmup_poly = WarmupSchedule("poly", warmup=10, total=110)
    assert warmup_poly(0) == pytest.approx(0.1) and warmup_poly(9) == 1.0
    assert warmup_poly(60) == pytest.approx(0.5**0.9) and warmup_poly(110) == 0.0
    assert WarmupSchedule("cosine", 0, 100)(50) == pytest.approx(0.5) and WarmupSchedule("none", 0, 100)(99) == 1.0
    assert mednext_ds_weights(5) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])

    loss = SegmentationLoss(LossConfig())
    target = (torch.rand(1, 3, 16, 16, 16) > 0.5).float()
    outputs = tuple(torch.randn(1, 3, s, s, s) for s in (16, 8, 4))
    downsampled = [torch.nn.functional.interpolate(target, size=(s,) * 3, mode="nearest-exact") for s in (16, 8, 4)]
    expected = sum(w * loss(o, t) for w, o, t in zip(mednext_ds_weights(3), outputs, downsampled))
    assert loss(outputs, target) == pytest.approx(float(expected))


def test_averaged_parameters_match_schedule_free_eval():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(model.parameters(), OptimConfig(name="adamw_sf", lr=0.1))
    set_train_mode(optimizer, True)
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    averaged = {name: averaged_parameters(optimizer)[p] for name, p in model.named_parameters()}
    y = {name: p.detach().clone() for name, p in model.named_parameters()}
    set_train_mode(optimizer, False)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), averaged[name]) and not torch.equal(p.detach(), y[name])
    assert averaged_parameters(optimizer) == {}  # already holding x
