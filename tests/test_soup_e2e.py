"""End to end: a tiny base run on phantoms, three fine-tunes from it with different learning rates, then the greedy
and uniform soups of their checkpoints through the commands; the soups load and predict."""
from __future__ import annotations

import shutil

import pytest
import torch

from brats_ugrip.checkpoints import load_checkpoint, load_model
from brats_ugrip.config import load_config
from brats_ugrip.data import Datalist, make_datalist, save_datalist
from brats_ugrip.heldout import checkpoint_settings
from brats_ugrip.inference import predict_case
from brats_ugrip.io import load_nifti
from brats_ugrip.souping import greedy as greedy_cli
from brats_ugrip.souping import uniform as uniform_cli
from brats_ugrip.souping.ingredients import SoupWarning
from brats_ugrip.training import train

FINETUNE_LRS = (1e-3, 3e-3, 1e-2)


@pytest.mark.slow
def test_soups_of_finetuned_runs(phantom_dir, tmp_path, recwarn):
    datalist_path = tmp_path / "datalist.json"
    save_datalist(make_datalist(phantom_dir, n_folds=3, seed=0, relative_to=tmp_path), datalist_path)
    tiny = {"data.datalist": str(datalist_path), "data.cache_dir": str(tmp_path / "cache"), "data.samples_per_case": 1,
            "data.roi_size": [32, 32, 32], "inference.roi_size": [48, 48, 48], "model.name": "unet",
            "model.init_filters": 4, "trainer.val_every": 1, "logging.mode": "disabled"}
    base = train(load_config("experiments/train_tiny_cpu.yaml", {**tiny, "trainer.max_epochs": 1}), tmp_path / "base")
    models = tmp_path / "models"
    models.mkdir()
    for i, lr in enumerate(FINETUNE_LRS):
        run = train(load_config("experiments/train_tiny_cpu.yaml", {
            **tiny, "trainer.max_epochs": 1, "optim.lr": lr, "optim.warmup_steps": 0,
            "finetune.init_from": base["best_checkpoint"]}), tmp_path / f"finetune{i}")
        shutil.copy(run["best_checkpoint"], models / f"lr{lr:g}.ckpt")
        assert run["init_id"] == base["init_id"]

    greedy_out, uniform_out = tmp_path / "greedy.ckpt", tmp_path / "uniform.ckpt"
    assert greedy_cli.main(["--ckpts", str(models), "--out", str(greedy_out), "--no-hd95", "--device", "cpu"]) == 0
    assert uniform_cli.main(["--ckpts", str(models), "--out", str(uniform_out), "--no-hd95", "--device", "cpu"]) == 0
    assert not [w for w in recwarn if issubclass(w.category, SoupWarning)]  # one shared initialisation

    greedy_meta = load_checkpoint(greedy_out)["brats_ugrip"]
    soup = greedy_meta["soup"]
    # Training validated each run on fold 0 with the same settings: the scores are read from the checkpoints,
    # so the greedy soup costs N−1 evaluations, plus 1 for the uniform soup in the report and 1 for the best
    # ingredient's per-case scores (the step gains' intervals need them; its checkpoint holds only its mean).
    assert [i["score_source"] for i in soup["ingredients"]] == ["metadata"] * len(FINETUNE_LRS)
    assert soup["selection"]["evaluations"] == {"selection": len(FINETUNE_LRS) + 1}
    assert greedy_meta["val_metrics"]["mean"] >= max(i["score"]["mean"] for i in soup["ingredients"])
    assert greedy_meta["init_id"] == base["init_id"] and greedy_meta["weights"] == "averaged"
    assert (tmp_path / "greedy_report" / "greedy.png").is_file()
    assert load_checkpoint(uniform_out)["brats_ugrip"]["soup"]["kept"] == len(FINETUNE_LRS)

    case = Datalist.load(datalist_path).fold_cases(0)[0]
    for path in (greedy_out, uniform_out):
        model, meta = load_model(path)
        prediction = predict_case(model, case.images, checkpoint_settings(meta), case_id=case.case_id)
        assert prediction.labels.shape == load_nifti(case.images[0]).shape
        assert torch.isfinite(torch.as_tensor(prediction.probabilities)).all()
