"""End to end: two tiny models of different architectures trained on phantoms, ensembled with fitted weights, the
predictions scored by tools/evaluate.py."""
import pandas as pd
import pytest

from brats_ugrip.config import load_config
from brats_ugrip.data import Datalist, make_datalist, save_datalist
from brats_ugrip.ensembling import cli as ensemble_cli
from brats_ugrip.ensembling.spec import EnsembleSpec
from brats_ugrip.labels import REGIONS
from brats_ugrip.tools import evaluate
from brats_ugrip.training import train


def tiny_run(root, datalist, model, seed):
    config = load_config(base={
        "data": {"datalist": str(datalist), "roi_size": [32, 32, 32], "batch_size": 2, "cache_dir": str(root / "cache")},
        "model": {"name": model, "init_filters": 8},
        "optim": {"name": "adamw_sf", "lr": 0.01},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "seed": seed, "log_every_n_steps": 1},
        "inference": {"roi_size": [48, 48, 48]},  # one window covers a 48³ phantom's brain crop
        "logging": {"mode": "disabled"},
    })
    return train(config, root / f"{model}-{seed}")["best_checkpoint"]


@pytest.mark.slow
def test_fitted_ensemble_of_two_trained_models_is_scored_by_the_evaluate_tool(phantom_dir, tmp_path):
    datalist = save_datalist(make_datalist(phantom_dir, 3, 0), tmp_path / "datalist.json")
    checkpoints = [tiny_run(tmp_path, datalist, "segresnet", 0), tiny_run(tmp_path, datalist, "unet", 1)]
    out = tmp_path / "ensemble"
    # Both models trained on fold 1 (their validation fold is 0): allowed here, to compare with the evaluate tool.
    ensemble_cli.main(["--models", *checkpoints, "--fit", "--datalist", str(datalist), "--fold", "0",
                       "--test-fold", "1", "--allow-seen-test-cases", "--cache-dir", str(tmp_path / "cache"),
                       "--input", str(phantom_dir), "--out", str(out), "--uncertainty"])
    fit = EnsembleSpec.load(out / "ensemble.yaml").fit
    selection = fit["selection_score"]["dice"]
    assert selection["mean"] >= max(s["mean"] for s in fit["single_model_scores"]) - 1e-12

    assert evaluate.main(["--pred", str(out), "--ref", str(phantom_dir), "--out", str(tmp_path / "metrics.csv")]) == 0
    table = pd.read_csv(tmp_path / "metrics.csv")
    assert len(table) == 6 and not table["prediction_missing"].any()
    # The fit's scores (cached predictions on the crop) match the written label maps scored by the evaluate tool.
    folds = {case.case_id: case.fold for case in Datalist.load(datalist).training}
    for fold, scores in ((0, selection), (1, fit["test_score"]["dice"])):
        rows = table[table["case_id"].map(folds) == fold]
        assert len(rows) == 2
        for region in REGIONS:
            assert rows[f"dice_{region}"].mean() == pytest.approx(scores[region], abs=0.02)
    assert len(list((out / "uncertainty").glob("*.nii.gz"))) == 6
