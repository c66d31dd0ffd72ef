"""Soups: the averaging and greedy rules, every ingredient check, held-out scoring, and the two commands."""
from __future__ import annotations

import json
import random
import weakref

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from brats_ugrip.checkpoints import load_checkpoint, load_model, save_model_checkpoint
from brats_ugrip.cli import run
from brats_ugrip.config import config_from_dict
from brats_ugrip.data import Datalist, make_datalist, save_datalist
from brats_ugrip.errors import CheckpointError, DataError
from brats_ugrip.heldout import HeldOutSet, checkpoint_settings, stored_score, validation_fingerprint
from brats_ugrip.inference import predict_preprocessed
from brats_ugrip.labels import get_scheme
from brats_ugrip.metrics.regions import dice
from brats_ugrip.models import create_model, resolve_kwargs
from brats_ugrip.preprocess import CaseCache
from brats_ugrip.souping import greedy as greedy_cli
from brats_ugrip.souping import uniform as uniform_cli
from brats_ugrip.souping.ingredients import SoupWarning, load_ingredients
from brats_ugrip.souping.soups import RunningSum, greedy_soup, rank, recalibrate_batchnorm, uniform_soup

MODEL = {"name": "unet", "kwargs": resolve_kwargs("unet", init_filters=4)}
"""A tiny network (90k parameters): one 48³ window covers a phantom's brain crop, so scoring is fast on CPU."""


# --- uniform ----------------------------------------------------------------------------------------------


def _states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"conv.weight": torch.randn(4, 3, 3, generator=generator),
             "half": torch.randn(5, generator=generator).half(),
             "bn.num_batches_tracked": torch.tensor(10 * (i + 1))} for i in range(n)]


def test_uniform_soup_is_the_mean_computed_by_hand():
    states = _states(5)
    soup = uniform_soup(iter(states))
    by_hand = sum(s["conv.weight"].double() for s in states) / 5
    assert soup["conv.weight"].dtype == torch.float32
    assert torch.equal(soup["conv.weight"], by_hand.float())
    assert soup["half"].dtype == torch.float16
    assert torch.equal(soup["half"], (sum(s["half"].double() for s in states) / 5).half())
    assert soup["bn.num_batches_tracked"].item() == 10  # integer buffers: the first ingredient's, not averaged


def test_uniform_soup_holds_one_ingredient_at_a_time():
    class Tracked(dict):
        pass

    alive: list[weakref.ref] = []

    def track(state: Tracked) -> Tracked:
        alive.append(weakref.ref(state))
        return state

    def ingredients():
        for seed in range(6):
            # When the next ingredient is loaded, every earlier one must already be freed.
            assert sum(ref() is not None for ref in alive) == 0
            yield track(Tracked(_states(1, seed)[0]))

    uniform_soup(ingredients())
    assert len(alive) == 6


def test_uniform_soup_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        uniform_soup(iter([]))


# --- greedy -----------------------------------------------------------------------------------------------


def _scalar_states(values):
    return [{"w": torch.tensor([float(v)])} for v in values]


def test_greedy_ranks_tries_each_once_and_never_reevaluates_the_soup():
    states = _scalar_states([1.0, 2.0, 3.0, 4.0])
    scores = [0.3, 0.9, 0.5, 0.7]
    seen = []

    def evaluate(state):
        seen.append(state["w"].item())
        return 1.0 - abs(state["w"].item() - 2.5)  # best soup weights near 2.5

    result = greedy_soup(lambda i: states[i], scores, evaluate)
    assert rank(scores) == [1, 3, 2, 0]
    assert result.evaluations == len(states) - 1 == len(seen)
    # Candidates: mean(2, 4) = 3 → 0.5 < 0.9 rejected; mean(2, 3) = 2.5 → 1.0 kept; mean(2, 3, 1) = 2 → 0.5 rejected.
    assert seen == pytest.approx([3.0, 2.5, 2.0])
    assert result.kept == [1, 2]
    assert result.state_dict["w"].item() == pytest.approx(2.5)
    assert result.score == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(20))
def test_greedy_never_scores_below_its_best_ingredient(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 8)
    states = _scalar_states([rng.uniform(-1, 1) for _ in range(n)])
    scores = [rng.random() for _ in range(n)]
    target = rng.uniform(-1, 1)
    result = greedy_soup(lambda i: states[i], scores, lambda s: 1 - abs(s["w"].item() - target))
    assert result.score >= max(scores)
    assert result.kept[0] == scores.index(max(scores))
    soup_scores = [step.soup_score for step in result.steps if step.kept]
    assert soup_scores == sorted(soup_scores)  # each kept ingredient improves or ties the soup


def test_greedy_ties_keep_with_ge_and_reject_when_strict():
    states = _scalar_states([1.0, 1.0, 1.0])
    scores = [0.5, 0.5, 0.5]  # ties in the ranking keep the input order
    loose = greedy_soup(lambda i: states[i], scores, lambda s: 0.5)
    strict = greedy_soup(lambda i: states[i], scores, lambda s: 0.5, strict=True)
    assert [s.index for s in loose.steps] == [0, 1, 2]
    assert loose.kept == [0, 1, 2]
    assert strict.kept == [0]


def test_running_sum_candidate_does_not_change_the_soup():
    soup = RunningSum()
    a, b = _states(2)
    soup.add(a)
    candidate = soup.mean(extra=b)
    assert torch.allclose(candidate["conv.weight"], (a["conv.weight"] + b["conv.weight"]) / 2)
    assert torch.equal(soup.mean()["conv.weight"], a["conv.weight"])


def test_recalibrate_batchnorm_uses_the_average_of_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3))
    model[1].running_mean.fill_(100.0)
    batches = [torch.randn(2, 2, 4, 4, 4) + i for i in range(3)]
    assert recalibrate_batchnorm(model, batches) == 3
    with torch.no_grad():
        expected = torch.stack([model[0](b).mean(dim=(0, 2, 3, 4)) for b in batches]).mean(0)
    assert torch.allclose(model[1].running_mean, expected, atol=1e-5)
    assert not model.training
    assert recalibrate_batchnorm(nn.Sequential(nn.Conv3d(2, 3, 1), nn.GroupNorm(1, 3)), batches) == 0


# --- ingredient checks ------------------------------------------------------------------------------------


def _config(datalist: str = "unused.json", **sections) -> dict:
    values = {"data": {"datalist": datalist, "roi_size": [48, 48, 48]}, "model": {"name": "unet", "init_filters": 4},
              "inference": {"overlap": 0.25, "sw_batch_size": 2}, "optim": {"name": "adamw_sf"}}
    for section, changes in sections.items():
        values[section] = {**values.get(section, {}), **changes}
    return config_from_dict(values).to_dict()


def _network(seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("unet", **{"init_filters": 4, **kwargs})


def _finetuned(base: nn.Module, seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.std().nan_to_num() * torch.randn(v.shape, generator=generator) if v.is_floating_point()
            else v.clone() for k, v in base.state_dict().items()}


def _write(path, state, config=None, **meta):
    meta = {"model": MODEL, "config": config or _config(), "fold": 0, "init_id": "init-a", "weights": "averaged", **meta}
    return save_model_checkpoint(path, state, meta)


def test_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints"):
        load_ingredients(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_ingredients(tmp_path / "absent")


def test_corrupt_checkpoint_is_skipped_with_a_warning(tmp_path):
    base = _network(0)
    _write(tmp_path / "a.ckpt", _finetuned(base, 1))
    _write(tmp_path / "b.ckpt", _finetuned(base, 2))
    (tmp_path / "c.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.warns(SoupWarning, match="skipping .*c.ckpt"):
        ingredients = load_ingredients(tmp_path)
    assert [i.name for i in ingredients] == ["a.ckpt", "b.ckpt"]
    assert [p.name for p, _ in ingredients.skipped] == ["c.ckpt"]
    (tmp_path / "a.ckpt").write_bytes(b"")
    (tmp_path / "b.ckpt").write_bytes(b"\x00" * 10)
    with pytest.warns(SoupWarning), pytest.raises(CheckpointError, match="none of the 3 checkpoints"):
        load_ingredients(tmp_path)


def test_architecture_mismatch_names_the_first_differing_key(tmp_path):
    _write(tmp_path / "a.ckpt", _network(0).state_dict())
    _write(tmp_path / "b.ckpt", _network(0, init_filters=8).state_dict())
    first_key = next(iter(_network(0).state_dict()))
    with pytest.raises(CheckpointError, match=f"b.ckpt: tensor '{first_key}' has shape"):
        load_ingredients(tmp_path)


def test_missing_and_extra_keys_are_named(tmp_path):
    state = _network(0).state_dict()
    _write(tmp_path / "a.ckpt", state)
    _write(tmp_path / "b.ckpt", {**state, "head.extra": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="'head.extra'"):
        load_ingredients(tmp_path)
    last = list(state)[-1]
    _write(tmp_path / "b.ckpt", {k: v for k, v in state.items() if k != last})
    with pytest.raises(CheckpointError, match=f"has no tensor '{last}'"):
        load_ingredients(tmp_path)


def test_scheme_and_input_channel_mismatch_are_errors(tmp_path):
    state = _network(0).state_dict()
    _write(tmp_path / "a.ckpt", state)
    _write(tmp_path / "b.ckpt", state, config=_config(data={"scheme": "brats2021"}))
    with pytest.raises(CheckpointError, match="label scheme 'brats2021'"):
        load_ingredients(tmp_path)
    stem = next(k for k, v in state.items() if v.ndim == 5)
    _write(tmp_path / "b.ckpt", {**state, stem: state[stem][:, :3].clone()})
    with pytest.raises(CheckpointError, match="takes 3 input channels"):
        load_ingredients(tmp_path)


def test_schedule_free_train_mode_weights_are_refused(tmp_path):
    state = _network(0).state_dict()
    _write(tmp_path / "a.ckpt", state)
    _write(tmp_path / "b.ckpt", state, weights="current")
    with pytest.raises(CheckpointError, match="b.ckpt: a schedule-free .*averaged"):
        load_ingredients(tmp_path)
    # The same weight mode from a plain AdamW run is fine.
    _write(tmp_path / "b.ckpt", state, weights="current", config=_config(optim={"name": "adamw"}))
    assert len(load_ingredients(tmp_path)) == 2


def test_different_initialisations_warn(tmp_path, recwarn):
    base = _network(0)
    _write(tmp_path / "a.ckpt", _finetuned(base, 1))
    _write(tmp_path / "b.ckpt", _finetuned(base, 2), init_id="init-b")
    with pytest.warns(SoupWarning, match="2 different initialisations"):
        load_ingredients(tmp_path)
    # Without init ids, weight-space distance tells fine-tunes of one start from independent starts.
    _write(tmp_path / "a.ckpt", _finetuned(base, 1), init_id=None)
    _write(tmp_path / "b.ckpt", _finetuned(base, 2), init_id=None)
    recwarn.clear()
    load_ingredients(tmp_path)
    assert not [w for w in recwarn if issubclass(w.category, SoupWarning)]
    _write(tmp_path / "b.ckpt", _network(7).state_dict(), init_id=None)
    with pytest.warns(SoupWarning, match="b.ckpt .*different random start"):
        load_ingredients(tmp_path)


def test_lightning_and_compile_prefixes_are_stripped_exactly(tmp_path):
    base = _network(0)
    bare = _finetuned(base, 1)
    lightning = {"state_dict": {**{f"model._orig_mod.{k}": v for k, v in bare.items()},
                                "loss.pos_weight": torch.ones(3)},  # a module tensor that is not the network's
                 "pytorch-lightning_version": "2.6.6",
                 "brats_ugrip": {"model": MODEL, "config": _config(), "fold": 0, "init_id": "init-a",
                                 "weights": "averaged"}}
    torch.save(lightning, tmp_path / "a.ckpt")
    _write(tmp_path / "b.ckpt", bare)
    ingredients = load_ingredients(tmp_path)
    assert list(ingredients[0].state_dict()) == list(bare)
    soup = uniform_soup(i.state_dict() for i in ingredients)
    assert all(torch.equal(soup[k], bare[k]) for k in bare)


def test_batchnorm_statistics_are_detected(tmp_path):
    state = {"stem.weight": torch.randn(4, 4, 1, 1, 1), "bn.running_mean": torch.zeros(4),
             "bn.running_var": torch.ones(4), "bn.num_batches_tracked": torch.tensor(3)}
    _write(tmp_path / "a.ckpt", state)
    assert load_ingredients(tmp_path).running_stats_keys == ["bn.running_mean", "bn.running_var"]


# --- held-out scoring -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datalist_path(phantom_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("soup_data") / "datalist.json"
    save_datalist(make_datalist(phantom_dir, n_folds=3, seed=0, relative_to=path.parent), path)
    return path


def test_heldout_scores_exactly_as_training_validation(datalist_path, tmp_path):
    from brats_ugrip.loaders import make_loaders
    from brats_ugrip.training import evaluate

    settings = checkpoint_settings({"config": _config(str(datalist_path))})
    model = _network(3).eval()
    datalist = Datalist.load(datalist_path)
    _, val_loader = make_loaders(datalist, 0, "brats2023", (48, 48, 48), 1, tmp_path / "cache")
    heldout = HeldOutSet.from_fold(datalist, 0, cache_dir=tmp_path / "cache", progress=False)
    assert heldout.score(model, settings).dice == evaluate(model, val_loader, settings)


def test_heldout_reads_each_case_once_and_crop_scores_equal_full_volume(datalist_path, monkeypatch):
    datalist = Datalist.load(datalist_path)
    reads = []
    original = CaseCache.get
    monkeypatch.setattr(CaseCache, "get", lambda self, case, *a, **k: reads.append(case.case_id) or original(self, case, *a,
                                                                                                             **k))
    heldout = HeldOutSet.from_fold(datalist, 0, progress=False)
    settings = checkpoint_settings({"config": _config(str(datalist_path))})
    model = _network(3).eval()
    first = heldout.score(model, settings, with_hd95=True)
    heldout.score(_network(4), settings)
    assert sorted(reads) == sorted(heldout.case_ids)  # two evaluations, each case read once
    # On the brain crop as in the input geometry: outside the crop both are background.
    for case, scores in zip(datalist.fold_cases(0), first.per_case):
        preprocessed = original(CaseCache(None), case)
        preprocessed.image = preprocessed.image.astype(np.float16)  # as the validation loader reads it
        prediction = predict_preprocessed(model, preprocessed, settings)
        reference = nib.load(str(case.label)).get_fdata().astype(int)
        regions = get_scheme("brats2023").to_regions(reference)
        # Scored as the label map that gets written (TC includes ET), in the input geometry.
        full = [dice(p, r) for p, r in zip(get_scheme("brats2023").to_regions(prediction.labels), regions)]
        assert [scores[f"dice_{r}"] for r in ("TC", "WT", "ET")] == pytest.approx(full, abs=1e-6)
        assert scores["hd95_WT"] >= 0


def test_stored_scores_are_reused_only_for_the_same_cases_and_settings(datalist_path):
    config = _config(str(datalist_path))
    heldout = HeldOutSet.from_fold(Datalist.load(datalist_path), 0, progress=False)
    settings = checkpoint_settings({"config": config})
    metrics = {"TC": 0.5, "WT": 0.6, "ET": 0.4, "mean": 0.5}
    meta = {"config": config, "fold": 0, "val_metrics": metrics, "epoch": 4, "val_epoch": 4}
    assert validation_fingerprint(meta) == heldout.fingerprint(settings)
    assert stored_score(meta, heldout.fingerprint(settings)) == metrics
    assert stored_score({**meta, "val_epoch": 2}, heldout.fingerprint(settings)) is None  # older weights' metrics
    assert stored_score({**meta, "fold": 1}, heldout.fingerprint(settings)) is None
    tta = _config(str(datalist_path), inference={"tta": True})
    assert stored_score({**meta, "config": tta}, heldout.fingerprint(settings)) is None
    few = _config(str(datalist_path), trainer={"limit_val_batches": 1})
    assert stored_score({**meta, "config": few}, heldout.fingerprint(settings)) is None
    wide = _config(str(datalist_path), inference={"sw_batch_size": 8})  # speed only: still the same scores
    assert stored_score({**meta, "config": wide}, heldout.fingerprint(settings)) == metrics


# --- the commands -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ingredient_dir(datalist_path, tmp_path_factory):
    """Three perturbations of one tiny init, with their fold-0 scores stored as training would store them."""
    config = _config(str(datalist_path))
    heldout = HeldOutSet.from_fold(Datalist.load(datalist_path), 0, progress=False)
    settings = checkpoint_settings({"config": config})
    base = _network(0)
    folder = tmp_path_factory.mktemp("models")
    for i, scale in enumerate((0.05, 0.1, 0.2)):
        state = _finetuned(base, i, scale)
        model = _network(0)
        model.load_state_dict(state)
        score = heldout.score(model, settings).dice
        _write(folder / f"run{i}.ckpt", state, config=config, val_metrics=score, epoch=3, val_epoch=3)
    return folder


def test_significant_gain_keeps_only_steps_whose_interval_is_above_zero(ingredient_dir, tmp_path):
    out = tmp_path / "soup.ckpt"
    assert greedy_cli.main(["--ckpts", str(ingredient_dir), "--out", str(out), "--no-hd95", "--device", "cpu",
                            "--significant-gain"]) == 0
    soup = load_model(out)[1]["soup"]
    assert soup["significant_gain"] is True and len(soup["gains"]) == 2
    # The rule, step by step: an ingredient after the first stays exactly when its gain's lower bound is > 0.
    kept_after_first = [soup["ingredients"][index]["kept"] for index in soup["order"]][1:]  # in the order tried
    assert kept_after_first == [gain["low"] is not None and gain["low"] > 0 for gain in soup["gains"]]
    report = (tmp_path / "soup_report" / "report.md").read_text()
    assert "the step's gain interval above 0 (--significant-gain)" in report


def test_greedy_command_reuses_stored_scores_and_writes_a_loadable_soup(ingredient_dir, tmp_path):
    out = tmp_path / "soup.ckpt"
    assert greedy_cli.main(["--ckpts", str(ingredient_dir), "--out", str(out), "--no-hd95", "--device", "cpu"]) == 0
    model, meta = load_model(out)
    soup = meta["soup"]
    assert soup["method"] == "greedy"
    # Scores read from the checkpoints: N−1 candidate evaluations, 1 for the uniform soup, and 1 for the best
    # ingredient's per-case scores (each step's gain interval needs them; its checkpoint holds only its mean).
    assert soup["selection"]["evaluations"] == {"selection": 4}
    assert len(soup["gains"]) == 2 and not soup["significant_gain"]
    assert all(i["score_source"] == "metadata" for i in soup["ingredients"])
    kept = [i for i in soup["ingredients"] if i["kept"]]
    assert len(kept) == soup["kept"] >= 1
    assert meta["val_metrics"]["mean"] >= max(i["score"]["mean"] for i in soup["ingredients"])
    with torch.no_grad():
        assert model(torch.zeros(1, 4, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    report = (tmp_path / "soup_report" / "report.md").read_text()
    assert "selection scores" in report and "not test scores" in report and "Test scores" not in report
    assert "## Greedy steps (selection cases)" in report and "gain [95 % CI]" in report
    assert "1 for the best ingredient's per-case scores" in report
    assert (tmp_path / "soup_report" / "greedy.png").stat().st_size > 0
    csv = (tmp_path / "soup_report" / "report.csv").read_text().splitlines()
    assert csv[0].startswith("scores,cases,n_cases,model,dice_ET") and len(csv) == 4


@pytest.mark.slow
def test_rescoring_reproduces_the_stored_scores(ingredient_dir, tmp_path):
    out = tmp_path / "soup.ckpt"
    greedy_cli.main(["--ckpts", str(ingredient_dir), "--out", str(out), "--no-hd95", "--rescore"])
    soup = load_checkpoint(out)["brats_ugrip"]["soup"]
    assert soup["selection"]["evaluations"] == {"selection": 3 + 2 + 1}
    for ingredient in soup["ingredients"]:
        stored = load_checkpoint(ingredient["path"])["brats_ugrip"]["val_metrics"]
        assert ingredient["score_source"] == "evaluated"
        assert ingredient["score"] == pytest.approx(stored, abs=1e-12)


@pytest.mark.slow
def test_test_fold_seen_in_training_is_refused_unless_allowed_and_then_labelled(ingredient_dir, tmp_path, capsys):
    out = tmp_path / "soup.ckpt"
    with pytest.raises(SystemExit) as exit_info:  # fold 1 was in the ingredients' training split
        run(greedy_cli.main, ["--ckpts", str(ingredient_dir), "--out", str(out), "--test-fold", "1"])
    assert exit_info.value.code == 2 and "--allow-seen-test-cases" in capsys.readouterr().err
    assert not out.exists()
    greedy_cli.main(["--ckpts", str(ingredient_dir), "--out", str(out), "--test-fold", "1", "--allow-seen-test-cases"])
    test = load_checkpoint(out)["brats_ugrip"]["soup"]["test"]
    assert len(test["models"]) == 3 and all(v["hd95"] is not None for v in test["models"].values())
    report = (tmp_path / "soup_report" / "report.md").read_text()
    assert report.splitlines()[0].startswith("**NOT A TEST SCORE (--allow-seen-test-cases)")
    assert test["notice"] in report.splitlines()[0] and f"## {test['label']}" in report
    assert "NOT held out" in test["label"] and "NOT held out" in capsys.readouterr().err
    assert report.index("'Test' scores") < report.index("Selection scores")
    with pytest.raises(SystemExit) as exit_info:
        run(greedy_cli.main, ["--ckpts", str(ingredient_dir), "--out", str(out), "--test-fold", "0"])
    assert exit_info.value.code == 2  # the selection fold cannot be the test fold


def test_uniform_command(ingredient_dir, tmp_path):
    out = tmp_path / "uniform.ckpt"
    assert uniform_cli.main(["--ckpts", str(ingredient_dir), "--out", str(out), "--no-score"]) == 0
    states = [load_checkpoint(p)["state_dict"] for p in sorted(ingredient_dir.glob("*.ckpt"))]
    soup = load_checkpoint(out)["state_dict"]
    key = next(k for k, v in soup.items() if v.is_floating_point())
    assert torch.allclose(soup[key], sum(s[key].double() for s in states).float() / 3)
    uniform_cli.main(["--ckpts", str(ingredient_dir), "--out", str(out), "--no-hd95"])
    meta = load_checkpoint(out)["brats_ugrip"]
    assert meta["soup"]["method"] == "uniform" and meta["soup"]["selection"]["evaluations"] == {"selection": 1}
    assert json.loads(json.dumps(meta["val_metrics"])) == meta["soup"]["score"]


def test_commands_exit_2_with_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(greedy_cli.main, ["--ckpts", str(tmp_path), "--out", str(tmp_path / "s.ckpt")])
    assert exit_info.value.code == 2
    assert "no checkpoints" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_soups_report_on_the_test_split_by_default(phantom_dir, tmp_path):
    """From Python, with keyword arguments: a datalist with a test split (2 of 6 phantoms), ingredients that
    record the cases they saw; both soups are tested on the split without being told, and a datalist moved away
    changes nothing of the check (the ids travel in the checkpoints)."""
    from brats_ugrip.seen_cases import case_record
    from brats_ugrip.souping.api import greedy_soup_from_checkpoints, uniform_soup_from_checkpoints

    path = tmp_path / "datalist.json"
    save_datalist(make_datalist(phantom_dir, n_folds=2, seed=0, relative_to=tmp_path, test_cases=2), path)
    datalist = Datalist.load(path)
    train, val = datalist.split(0)
    config, base, folder = _config(str(path)), _network(0), tmp_path / "models"
    for i in range(2):
        _write(folder / f"run{i}.ckpt", _finetuned(base, i, 0.05), config=config, cases=case_record(train, val))
    result = greedy_soup_from_checkpoints(folder, out=tmp_path / "greedy.ckpt", hd95=False, device="cpu",
                                          progress=False)
    test = next(t for t in result.tables if t.kind == "test")
    assert test.cases == "the test split of datalist.json, 2 cases" and test.notice is None
    assert test.heading.startswith("Test scores") and len(test.rows) == 3
    assert result.meta["soup"]["test"]["label"] == test.heading
    assert set(result.meta["cases"]["init"]) == {c.case_id for c in train + val}  # the soup records them too
    assert result.report["markdown"].read_text().startswith("# Greedy soup")
    assert "share the initialisation init-a" in result.report["markdown"].read_text()
    from brats_ugrip.candidates import from_soup  # the per-case test scores a comparison ranks

    candidates, stored = from_soup(tmp_path / "greedy.ckpt")
    assert stored["label"] == test.heading and len(candidates) == 3
    assert all(set(c.scores) == {case.case_id for case in datalist.test} for c in candidates)
    assert [c.kind for c in candidates] == ["single", "soup", "soup"]

    seen = case_record(train + datalist.test[:1], val)  # one test case leaked into an ingredient's training
    _write(folder / "run1.ckpt", _finetuned(base, 1, 0.05), config=config, cases=seen)
    path.rename(tmp_path / "moved.json")
    with pytest.raises(DataError, match=datalist.test[0].case_id):
        uniform_soup_from_checkpoints(folder, datalist=str(tmp_path / "moved.json"), device="cpu", progress=False)


def test_compare_command_predicts_checkpoints_and_ranks_them(ingredient_dir, datalist_path, tmp_path):
    """``brats-ugrip compare --ckpt``: each checkpoint predicts the labelled cases into --work, then is scored and
    ranked; the table names the cases, the method and a verdict for every candidate but the baseline."""
    from brats_ugrip.tools.compare import main as compare_main

    out = tmp_path / "table.md"
    assert compare_main(["--cases", str(datalist_path), "--section", "training", "--resamples", "200",
                         "--ckpt", f"a={ingredient_dir / 'run0.ckpt'}", "--ckpt", f"b={ingredient_dir / 'run2.ckpt'}",
                         "--work", str(tmp_path / "work"), "--device", "cpu", "--out", str(out)]) == 0
    n = len(Datalist.load(datalist_path).training)
    assert len(list((tmp_path / "work" / "a").glob("*.nii.gz"))) == n
    table = out.read_text()
    assert f"Comparison on {n} cases" in table and "200 resamples, seed 0" in table
    rows = [line for line in table.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2 and sum("| baseline |" in row for row in rows) == 1
