import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from brats_ugrip.checkpoints import load_model, save_model_checkpoint
from brats_ugrip.config import load_config
from brats_ugrip.data import Datalist, cases_from_dir, make_datalist, save_datalist
from brats_ugrip.ensembling import cli as ensemble_cli
from brats_ugrip.ensembling.fit import PredictionCache, _positives, fit_weights, region_dice_table, score, simplex_grid
from brats_ugrip.ensembling.predict import Ensemble, WeightedSum, disagreement_map, entropy_map, model_channels
from brats_ugrip.ensembling.spec import EnsembleSpec, spec_from_checkpoints
from brats_ugrip.errors import CheckpointError, ConfigError, DataError
from brats_ugrip.heldout import HeldOutSet, checkpoint_settings
from brats_ugrip.inference import predict_preprocessed
from brats_ugrip.labels import REGIONS, get_scheme
from brats_ugrip.models import create_model, resolve_kwargs
from brats_ugrip.postprocess import PostProcessing
from brats_ugrip.preprocess import preprocess_case

SCHEME = get_scheme("brats2023")


def tiny_checkpoint(path, seed, scheme="brats2023", fold=0, seen=()):
    """A random tiny SegResNet saved as a model-only checkpoint (window 32³), recording ``seen`` as its training
    cases (none by default: it was never trained)."""
    config = load_config(base={"data": {"datalist": "unused.json", "scheme": scheme, "roi_size": [48, 48, 48]},
                               "model": {"name": "segresnet", "init_filters": 8},
                               "inference": {"overlap": 0.25, "sw_batch_size": 2}})
    torch.manual_seed(seed)
    model = create_model("segresnet", init_filters=8)
    kwargs = resolve_kwargs("segresnet", init_filters=8)
    meta = {"config": config.to_dict(), "model": {"name": "segresnet", "kwargs": kwargs}, "fold": fold,
            "cases": {"train": list(seen), "val": [], "init": []}}
    return save_model_checkpoint(path, model.state_dict(), meta)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble_models")
    return [tiny_checkpoint(root / f"m{i}.ckpt", seed=i) for i in range(2)]


@pytest.fixture(scope="module")
def case(phantom_dir):
    first = cases_from_dir(phantom_dir)[0]
    return first, preprocess_case(first.images, None, "brats2023", margin=2, case_id=first.case_id)


@pytest.fixture(scope="module")
def single_predictions(checkpoints, case):
    """Each model's own prediction of the case (brats_ugrip.inference), the reference for the ensemble."""
    out = []
    for path in checkpoints:
        model, meta = load_model(path)
        out.append(predict_preprocessed(model, case[1], checkpoint_settings(meta)))
    return out


def ensemble_of(checkpoints, weights, **spec):
    return Ensemble(EnsembleSpec.from_dict({"models": [{"path": str(p), "weights": w} for p, w in zip(checkpoints, weights)],
                                            **spec}))


def test_weights_one_zero_reproduce_model_one_exactly(checkpoints, case, single_predictions):
    runs = []
    prediction = ensemble_of(checkpoints, [1, 0]).predict_preprocessed(case[1], probabilities=True,
                                                                       on_model=lambda: runs.append(1))
    assert len(runs) == 1  # a model weighing 0 everywhere is not even run
    assert np.array_equal(prediction.probabilities, single_predictions[0].probabilities)
    assert np.array_equal(prediction.labels, single_predictions[0].labels)


@pytest.fixture(scope="module")
def equal_prediction(checkpoints, case):
    return ensemble_of(checkpoints, [1, 1]).predict_preprocessed(case[1], probabilities=True)


def test_equal_weights_equal_the_mean_computed_by_hand(equal_prediction, single_predictions):
    prediction = equal_prediction
    by_hand = (single_predictions[0].probabilities + single_predictions[1].probabilities) / 2
    assert not np.allclose(single_predictions[0].probabilities, single_predictions[1].probabilities, atol=1e-3)
    np.testing.assert_allclose(prediction.probabilities, by_hand, atol=1e-6)


def test_per_channel_weights_only_affect_their_channel(checkpoints, case, single_predictions, equal_prediction):
    equal = equal_prediction.probabilities
    et_heavy = ensemble_of(checkpoints, [1, {"TC": 1, "WT": 1, "ET": 4}]).predict_preprocessed(
        case[1], probabilities=True).probabilities
    tc, wt, et = (REGIONS.index(r) for r in ("TC", "WT", "ET"))
    assert np.array_equal(equal[tc], et_heavy[tc]) and np.array_equal(equal[wt], et_heavy[wt])
    p0, p1 = (s.probabilities[et] for s in single_predictions)
    np.testing.assert_allclose(et_heavy[et], (p0 + 4 * p1) / 5, atol=1e-6)
    assert not np.allclose(equal[et], et_heavy[et], atol=1e-4)


def test_streaming_sum_holds_one_tensor_and_divides_per_channel():
    total = WeightedSum()
    terms = [torch.rand(3, 4, 4, 4) for _ in range(3)]
    weights = [(1, 0, 2), (1, 1, 0), (2, 3, 1)]
    for term, w in zip(terms, weights):
        total.add(term, w)
    expected = torch.stack([sum(w[c] * t[c] for t, w in zip(terms, weights)) / sum(w[c] for w in weights) for c in range(3)])
    torch.testing.assert_close(total.mean(), expected)


def test_uncertainty_maps_are_zero_when_certain_and_one_at_an_even_split():
    probabilities = torch.tensor([0.0, 1.0, 0.5]).view(1, 3, 1, 1).expand(3, 3, 1, 1)
    entropy = entropy_map(probabilities)
    assert entropy[0].max() < 1e-5 and entropy[1].max() < 1e-5 and entropy[2].min() == pytest.approx(1.0)
    disagreement = disagreement_map(probabilities)  # as vote shares
    assert disagreement.tolist() == [[[0.0]], [[0.0]], [[1.0]]]


def test_incompatible_models_are_rejected_with_clear_errors(checkpoints, tmp_path):
    other = tiny_checkpoint(tmp_path / "brats2021.ckpt", seed=5, scheme="brats2021")
    with pytest.raises(CheckpointError, match="different label schemes.*brats2021"):
        ensemble_of([checkpoints[0], other], [1, 1])
    # Naming the output scheme accepts them: every model predicts the regions TC, WT, ET.
    assert ensemble_of([checkpoints[0], other], [1, 1], label_scheme="brats2023").scheme == "brats2023"
    with pytest.raises(ConfigError, match=r"models\[1\]\.inference\.roi_size.*multiple of 8"):
        bad_window = {"path": str(checkpoints[1]), "inference": {"roi_size": [30, 32, 32]}}
        Ensemble(EnsembleSpec.from_dict({"models": [str(checkpoints[0]), bad_window]}))
    assert model_channels(create_model("segresnet", init_filters=8), 8) == (4, 3)
    assert model_channels(torch.nn.Sequential(torch.nn.Conv3d(5, 2, 1)), 8) == (5, 2)


def test_spec_round_trip_keeps_everything_and_paths_stay_relative(checkpoints, tmp_path):
    folder = tmp_path / "ens"
    (folder / "models").mkdir(parents=True)
    paths = [shutil.copy(p, folder / "models" / Path(p).name) for p in checkpoints]
    spec = EnsembleSpec.from_dict({
        "label_scheme": "brats2023", "thresholds": {"TC": 0.45, "WT": 0.5, "ET": 0.4},
        "models": [{"path": str(paths[0]), "weights": [0.25, 0.5, 0.75],
                    "inference": {"tta": True, "roi_size": [32, 32, 32]}},
                   {"path": str(paths[1]), "weights": 1}],
        "postprocessing": {"min_component_size": {"TC": 0, "WT": 20, "ET": 5}, "et_to_netc_below": 30},
        "fit": {"method": "fitted", "selection_score": {"dice": {"mean": 0.5}}}})
    spec.save(folder / "ensemble.yaml")
    assert yaml.safe_load((folder / "ensemble.yaml").read_text())["models"][0]["path"] == "models/m0.ckpt"
    assert EnsembleSpec.load(folder / "ensemble.yaml") == spec
    moved = shutil.move(folder, tmp_path / "elsewhere")
    reloaded = EnsembleSpec.load(Path(moved) / "ensemble.yaml")
    assert [m.path for m in reloaded.members] == [Path(moved).resolve() / "models" / f"m{i}.ckpt" for i in range(2)]
    assert reloaded.weights.tolist() == spec.weights.tolist() and reloaded.postprocessing == spec.postprocessing


@pytest.mark.parametrize("values, key", [
    ({"models": [{"path": "a.ckpt", "weights": [1, 1, -1]}]}, r"models\[0\]\.weights\.ET: must be ≥ 0"),
    ({"models": [{"path": "a.ckpt", "weights": {"TC": 1, "WT": 1}}]}, r"models\[0\]\.weights\.ET: missing"),
    ({"models": [{"path": "a.ckpt"}], "thresholds": [0.5, 1.0, 0.5]}, r"thresholds\.WT: must be in \(0.0, 1.0\)"),
    ({"models": [{"path": "a.ckpt"}], "postprocessing": {"min_size": 3}}, r"postprocessing\.min_size: unknown key"),
    ({"models": [{"path": "a.ckpt", "inference": {"threshold": 0.3}}]}, r"models\[0\]\.inference\.threshold: unknown"),
    ({"models": [{"weights": 1}]}, r"models\[0\]\.path: required"),
    ({"models": [{"path": "a.ckpt", "weights": [1, 1, 0]}, {"path": "b.ckpt", "weights": [1, 1, 0]}]},
     r"models: every model has ET weight 0"),
])
def test_spec_validation_errors_name_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        EnsembleSpec.from_dict(values)


def test_weights_file_gives_one_entry_per_model(checkpoints, tmp_path):
    weights = tmp_path / "w.yaml"
    weights.write_text(yaml.safe_dump({"weights": [[1, 0, 1], {"TC": 0, "WT": 1, "ET": 1}], "thresholds": 0.4}))
    spec = spec_from_checkpoints(checkpoints, weights)
    assert spec.weights.tolist() == [[1, 0, 1], [0, 1, 1]] and spec.thresholds == (0.4, 0.4, 0.4)
    weights.write_text(yaml.safe_dump({"weights": [1]}))
    with pytest.raises(ConfigError, match="weights: expected a list of 2 entries"):
        spec_from_checkpoints(checkpoints, weights)


def lesion_labels():
    """A 24³ map: one big lesion (oedema, core, a large and a 4-voxel enhancing part), a 2-voxel oedema blob and
    a 3-voxel isolated core blob inside its own oedema."""
    labels = np.zeros((24, 24, 24), np.uint8)
    labels[2:14, 2:14, 2:14] = SCHEME.edema
    labels[4:12, 4:12, 4:12] = SCHEME.core
    labels[5:9, 5:9, 5:9] = SCHEME.enhancing       # 64 voxels
    labels[10:11, 10:12, 10:12] = SCHEME.enhancing  # 4 voxels, separate component
    labels[20, 20, 20:22] = SCHEME.edema            # 2 voxels
    labels[16:21, 2:7, 2:7] = SCHEME.edema
    labels[18, 4, 3:6] = SCHEME.core                # 3 voxels
    return labels


def test_postprocessing_rules():
    labels = lesion_labels()
    assert PostProcessing().apply(labels, SCHEME) is labels  # off by default
    wt = PostProcessing(min_component_size=(0, 10, 0)).apply(labels, SCHEME)
    assert wt[20, 20, 20] == 0 and (wt[:14] == labels[:14]).all() and wt[18, 4, 4] == SCHEME.core
    tc = PostProcessing(min_component_size=(5, 0, 0)).apply(labels, SCHEME)
    assert tc[18, 4, 4] == SCHEME.edema and (tc[:14] == labels[:14]).all()
    et = PostProcessing(min_component_size=(0, 0, 10)).apply(labels, SCHEME)
    assert et[10, 10, 10] == SCHEME.core and et[6, 6, 6] == SCHEME.enhancing
    assert np.count_nonzero(et != labels) == 4
    relabel = PostProcessing(et_to_netc_below=100).apply(labels, SCHEME)
    assert not (relabel == SCHEME.enhancing).any() and (relabel == SCHEME.core).sum() == (np.isin(labels, (1, 3))).sum()
    assert np.array_equal(PostProcessing(et_to_netc_below=68).apply(labels, SCHEME), labels)  # 68 ET voxels: kept
    # After removing the 4-voxel component, 64 ET voxels remain: below 65 → relabelled.
    both = PostProcessing(min_component_size=(0, 0, 10), et_to_netc_below=65).apply(labels, SCHEME)
    assert not (both == SCHEME.enhancing).any()


def synthetic_cache(seed=0, cases=4, size=24):
    """Cached predictions of two models on nested-sphere cases: model 0 is sharp on ET and noisy on WT, model 1 the
    reverse; both medium on TC."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3)
    cache = PredictionCache(2, floor=0.1)
    for i in range(cases):
        centre = rng.uniform(9, size - 9, 3)[:, None, None, None]
        distance = np.sqrt(((grid - centre) ** 2).sum(0))
        wt, tc = distance < rng.uniform(6, 8), distance < rng.uniform(3.5, 5)
        et = tc & (distance > 2)
        reference = np.stack([tc, wt, et])
        noise = {0: (2.0, 6.0, 0.8), 1: (2.0, 0.8, 6.0)}  # (TC, WT, ET) noise of each model
        probabilities = [torch.sigmoid(torch.as_tensor(
            np.stack([3 * (2 * r - 1) + s * rng.standard_normal(r.shape) for r, s in zip(reference, noise[m])]),
            dtype=torch.float32)) for m in (0, 1)]
        cache.add(f"case{i}", probabilities, reference)
    return cache


def test_fitted_weights_beat_every_single_model_on_the_fitting_data():
    cache = synthetic_cache()
    singles = [score(cache, np.repeat(np.eye(2)[k][:, None], 3, axis=1), (0.5,) * 3, SCHEME).dice for k in range(2)]
    weights, thresholds = fit_weights(cache)
    fitted = score(cache, weights, thresholds, SCHEME).dice
    assert fitted["mean"] > max(s["mean"] for s in singles)
    et, wt = REGIONS.index("ET"), REGIONS.index("WT")
    assert weights[0, et] > weights[1, et] and weights[1, wt] > weights[0, wt]
    assert np.allclose(weights.sum(axis=0), 1)


def test_dice_table_scores_candidates_exactly_like_the_full_pipeline():
    cache = synthetic_cache(seed=1, cases=2)
    candidates = simplex_grid(2, resolution=4)
    thresholds = (0.3, 0.5, 0.7)
    et = REGIONS.index("ET")
    table = region_dice_table(cache, et, candidates, thresholds)
    for k in (0, 2, len(candidates) - 1):
        for t, threshold in enumerate(thresholds):
            weights = np.repeat(candidates[k][:, None], 3, axis=1)
            # ET is innermost: its Dice through labels depends on the ET channel only.
            assert table[k, t] == pytest.approx(score(cache, weights, (0.5, 0.5, threshold), SCHEME).dice["ET"], abs=1e-6)


def test_inner_regions_count_in_outer_ones_as_in_the_label_map():
    """TC and WT are scored with the voxels the inner regions predict, exactly as the written labels count them."""
    cache = synthetic_cache(seed=2, cases=2)
    weights, thresholds = fit_weights(cache, resolution=4)
    pipeline = score(cache, weights, thresholds, SCHEME).dice
    forced = [np.zeros(0, dtype=np.int64) for _ in cache.cases]
    for name in ("ET", "TC", "WT"):
        c = REGIONS.index(name)
        table = region_dice_table(cache, c, weights[:, c][None], (thresholds[c],), forced)
        assert table[0, 0] == pytest.approx(pipeline[name], abs=1e-6)
        forced = [np.union1d(f, _positives(case, c, weights[:, c], thresholds[c])) for f, case in zip(forced, cache.cases)]


def test_simplex_grid_holds_equal_weights_and_every_single_model():
    for n in (1, 2, 3, 8):
        grid = simplex_grid(n)
        assert len(grid) <= 512 + 1 and np.allclose(grid.sum(axis=1), 1) and np.allclose(grid[0], 1 / n)
        for k in range(n):
            assert any(np.allclose(row, np.eye(n)[k]) for row in grid)
    assert len(simplex_grid(2, resolution=10)) == 11


@pytest.fixture(scope="module")
def datalist(phantom_dir, tmp_path_factory):
    """Six folds of one phantom each: fits and scores stay cheap (each case costs one inference per model)."""
    return save_datalist(make_datalist(phantom_dir, 6, 0), tmp_path_factory.mktemp("ens_data") / "datalist.json")


def test_cached_scores_equal_heldout_scores_of_each_model(checkpoints, datalist):
    held_out = HeldOutSet.from_fold(Datalist.load(datalist), 0, progress=False)
    ensemble = ensemble_of(checkpoints, [1, 1])
    cache = PredictionCache.predict(held_out, ensemble.members, floor=0.1, progress=False)
    member = ensemble.members[1]
    expected = held_out.score(member.model, member.settings).dice
    threshold = member.settings.threshold
    # Held-out scores are of the written label map: TC counts the ET voxels, WT both (forced, as the fit counts them).
    forced = [np.zeros(0, dtype=np.int64) for _ in cache.cases]
    for name in ("ET", "TC", "WT"):
        c = REGIONS.index(name)
        table = region_dice_table(cache, c, np.eye(2), (threshold,), forced)
        assert table[1, 0] == pytest.approx(expected[name], abs=1e-6)
        forced = [np.union1d(f, _positives(case, c, np.eye(2)[1], threshold)) for f, case in zip(forced, cache.cases)]


def test_soup_scoring_and_ensemble_fit_scoring_give_the_same_scores_for_the_same_model(checkpoints, datalist):
    """Soups score a model with HeldOutSet.score (souping/scoring.py); the fit scores it alone through the ensemble
    pipeline (fit.score). Both score the label map that gets written, through metrics.regions.label_map_scores."""
    held_out = HeldOutSet.from_fold(Datalist.load(datalist), 0, progress=False)
    ensemble = ensemble_of(checkpoints, [1, 1])
    cache = PredictionCache.predict(held_out, ensemble.members, floor=0.1, progress=False)
    for k, member in enumerate(ensemble.members):
        soup = held_out.score(member.model, member.settings, with_hd95=True)
        alone = np.repeat(np.eye(2)[k][:, None], 3, axis=1)
        fit = score(cache, alone, (member.settings.threshold,) * 3, SCHEME, with_hd95=True)
        assert soup.per_case == fit.per_case
        assert soup.dice == fit.dice and soup.hd95 == fit.hd95


def test_cli_fits_on_a_fold_and_never_scores_below_the_best_single_model(checkpoints, datalist, tmp_path):
    out = tmp_path / "fit"
    ensemble_cli.main(["--models", *map(str, checkpoints), "--fit", "--datalist", str(datalist), "--fold", "0",
                       "--test-fold", "1", "--out", str(out)])
    spec = EnsembleSpec.load(out / "ensemble.yaml")
    record = spec.fit
    assert record["method"] == "fitted" and record["fold"] == 0 and record["test_fold"] == 1
    assert record["selection_score"]["dice"]["mean"] >= max(s["mean"] for s in record["single_model_scores"]) - 1e-12
    assert set(record["test_score"]["dice"]) == {*REGIONS, "mean"} and "hd95" in record["test_score"]
    report = json.loads((out / "ensemble.fit.json").read_text())
    assert len(report["selection"]["per_case"]) == record["cases"] == 1
    assert report["postprocessing_trials"][0]["rule"] == "none"
    assert record["test_label"] == "test scores on fold 1 of datalist.json, 1 cases, never used for training, " \
                                   "validation or fitting" and record["test_notice"] is None


def test_fit_refuses_a_test_case_a_model_trained_on_unless_allowed(checkpoints, datalist, tmp_path, capsys):
    test_case = Datalist.load(datalist).fold_cases(1)[0].case_id
    seen = tiny_checkpoint(tmp_path / "seen.ckpt", seed=5, seen=[test_case])
    args = ["--models", str(checkpoints[0]), str(seen), "--fit", "--datalist", str(datalist), "--fold", "0",
            "--test-fold", "1", "--out", str(tmp_path / "fit"), "--method", "equal", "--no-postprocessing"]
    with pytest.raises(DataError, match=f"{test_case}, seen by seen.ckpt"):
        ensemble_cli.main(args)
    ensemble_cli.main([*args, "--allow-seen-test-cases"])
    record = EnsembleSpec.load(tmp_path / "fit" / "ensemble.yaml").fit
    assert "NOT held out" in record["test_label"] and "--allow-seen-test-cases" in record["test_notice"]
    assert json.loads((tmp_path / "fit" / "ensemble.fit.json").read_text())["fit"]["test_label"] == record["test_label"]
    assert "NOT held out" in " ".join(capsys.readouterr().err.split())


def test_cli_writes_labels_probabilities_uncertainty_and_overlays_in_input_geometry(checkpoints, case, tmp_path):
    out = tmp_path / "pred"
    case_dir = case[0].images[0].parent
    ensemble_cli.main(["--models", *map(str, checkpoints), "--input", str(case_dir), "--out", str(out),
                       "--probabilities", "--uncertainty", "disagreement", "--overlays"])
    image = nib.load(case[0].images[0])
    name = f"{case[0].case_id}.nii.gz"
    labels, probabilities, uncertainty = (nib.load(out / sub / name) for sub in ("", "probabilities", "uncertainty"))
    for written in (labels, probabilities, uncertainty):
        assert np.allclose(written.affine, image.affine)
    assert labels.shape == image.shape and probabilities.shape == (*image.shape, 3)
    assert set(np.unique(np.asarray(labels.dataobj))) <= set(SCHEME.labels)
    values = np.asarray(uncertainty.dataobj)
    assert values.min() >= 0 and values.max() <= 1 and values.max() > 0
    assert (out / "overlays" / f"{case[0].case_id}.png").stat().st_size > 1000
    assert EnsembleSpec.load(out / "ensemble.yaml").weights.tolist() == [[1, 1, 1], [1, 1, 1]]


def test_cli_rejects_fit_options_without_fit(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="--fit"):
        ensemble_cli.main(["--models", str(checkpoints[0]), "--fold", "0", "--out", str(tmp_path)])
