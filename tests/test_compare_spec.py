"""brats-ugrip compare --spec: ensemble specs of two tiny untrained SegResNets predicted on the test split of the
phantoms, their per-case scores checked against the ensembles' own predictions scored independently (and, for an
ensemble that predicts nothing, against the BraTS empty-mask rules worked by hand); bad --spec inputs exit 2
naming the file."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from test_ensemble import tiny_checkpoint

from brats_ugrip.cli import run
from brats_ugrip.data import Datalist, make_datalist, save_datalist
from brats_ugrip.ensembling.predict import Ensemble
from brats_ugrip.ensembling.spec import EnsembleSpec
from brats_ugrip.errors import DataError
from brats_ugrip.labels import REGIONS, get_scheme
from brats_ugrip.metrics.regions import BRATS_MAX_HD95, label_map_scores, region_masks
from brats_ugrip.tools import compare as compare_tool

# The untrained models' probabilities stay below 0.81 on every phantom voxel, so thresholds of 0.95 predict
# nothing: the "empty" ensemble's scores follow from the references alone.
EMPTY_THRESHOLD = 0.95


@pytest.fixture(scope="module")
def inputs(phantom_dir, tmp_path_factory):
    """A datalist of the six 48³ phantoms with a 2-case test split, and three specs of two tiny models: the first
    model alone (weights 1, 0), both equally, and both with thresholds that nothing reaches."""
    root = tmp_path_factory.mktemp("compare_spec")
    datalist = save_datalist(make_datalist(phantom_dir, n_folds=2, seed=0, relative_to=root, test_cases=2),
                             root / "datalist.json")
    models = [tiny_checkpoint(root / f"m{i}.ckpt", seed=i) for i in range(2)]
    specs = {"first": ([1, 0], 0.5), "equal": ([1, 1], 0.5), "empty": ([1, 1], EMPTY_THRESHOLD)}
    paths = {}
    for name, (weights, threshold) in specs.items():
        spec = EnsembleSpec.from_dict({"models": [{"path": str(m), "weights": w} for m, w in zip(models, weights)],
                                       "thresholds": threshold})
        paths[name] = spec.save(root / f"{name}.yaml")
    return datalist, models, paths


def _argv(datalist, paths, work, *extra):
    return ["--cases", str(datalist), *[a for name, path in paths.items() for a in ("--spec", f"{name}={path}")],
            "--work", str(work), "--device", "cpu", "--resamples", "200", *extra]


def _independent_scores(spec_path, cases) -> dict[str, dict[str, float]]:
    """The spec's ensemble predicting each case in memory, scored by the one label-map scorer (no files written,
    nothing of the compare command)."""
    ensemble, scores = Ensemble(EnsembleSpec.load(spec_path)), {}
    for case in cases:
        labels = ensemble.predict_case(case.images, case_id=case.case_id).labels
        reference = nib.load(str(case.label))
        spacing = tuple(float(z) for z in reference.header.get_zooms()[:3])
        scores[case.case_id] = label_map_scores(labels, np.asarray(reference.dataobj).astype(np.int16), "brats2023",
                                                spacing)
    return scores


@pytest.fixture(scope="module")
def compared(inputs, tmp_path_factory):
    """One ``compare --spec`` run (the default section: the test split): the candidates it ranked (kept by a spy
    on ``candidates``, so the scores checked are those of the printed table) and the table it wrote."""
    datalist, _, paths = inputs
    root = tmp_path_factory.mktemp("compared")
    original, seen = compare_tool.candidates, []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compare_tool, "candidates", lambda args: seen.extend(original(args)) or seen)
        assert compare_tool.main(_argv(datalist, paths, root / "work", "--baseline", "first",
                                       "--out", str(root / "table.md"))) == 0
    return {c.name: c for c in seen}, (root / "table.md").read_text()


def test_spec_scores_equal_the_ensembles_predictions_scored_independently(inputs, compared):
    datalist, _, paths = inputs
    found, _ = compared
    test_cases = Datalist.load(datalist).test
    assert len(test_cases) == 2
    assert [(name, c.kind) for name, c in found.items()] == [("first", "ensemble"), ("equal", "ensemble"),
                                                             ("empty", "ensemble")]
    for candidate in found.values():  # the default section is the held-out test split
        assert sorted(candidate.scores) == sorted(c.case_id for c in test_cases)
    for name in ("first", "equal"):
        for case_id, expected in _independent_scores(paths[name], test_cases).items():
            got = {k: v for k, v in found[name].scores[case_id].items() if k in expected}
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-9), (name, case_id)
    for case in test_cases:
        # Each spec's own predictions, not one folder read three times: the first model alone ≠ both models.
        assert found["first"].scores[case.case_id] != found["equal"].scores[case.case_id]
        # Hand-worked: an empty prediction against a reference with every region scores Dice 0 and HD95 374 mm.
        masks = region_masks(np.asarray(nib.load(str(case.label)).dataobj), get_scheme("brats2023"))
        assert all(masks[r].any() for r in REGIONS)
        empty = found["empty"].scores[case.case_id]
        assert [empty[f"dice_{r}"] for r in REGIONS] == [0.0] * 3
        assert [empty[f"hd95_{r}"] for r in REGIONS] == [BRATS_MAX_HD95] * 3


def test_table_names_each_spec_and_ranks_the_empty_ensemble_last(compared):
    _, table = compared
    assert table.startswith("Comparison on 2 cases") and "200 resamples, seed 0" in table
    rows = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"candidate", "first", "equal", "empty"}
    # The empty ensemble is last on every case and metric (Dice 0 < theirs, HD95 374 > theirs): mean rank 3 of 3.
    assert rows["empty"].startswith("| 3 | empty | 3.00 | 0.0000 (0.0000) | 0.0000 (0.0000) | 0.0000 (0.0000) | "
                                    "374.00 (374.00) | 374.00 (374.00) | 374.00 (374.00) | ")
    assert "| baseline | – | baseline |" in rows["first"]


def test_bad_spec_inputs_exit_2_naming_the_file(inputs, tmp_path, capsys):
    datalist, models, paths = inputs
    missing, work = tmp_path / "missing.yaml", tmp_path / "work"
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [{path: m0.ckpt, weights: {TC: 1, WT: 1, XX: 1}}]\n")
    for spec, message in ((missing, "ensemble spec not found"), (bad, "models[0].weights"),
                          (models[0], "ensemble spec cannot be read")):  # a checkpoint is not read as a spec
        with pytest.raises(SystemExit) as exit_info:
            run(compare_tool.main, _argv(datalist, {"x": spec, **paths}, work))
        error = " ".join(capsys.readouterr().err.split())
        assert exit_info.value.code == 2 and str(spec.name) in error and message in error, error
    assert not (work / "x").exists()  # refused before anything was predicted
    with pytest.raises(DataError, match="given twice"):  # refused before predicting into one --work/first/
        compare_tool.main(_argv(datalist, paths, work, "--spec", f"first={paths['equal']}"))
    no_test = save_datalist(make_datalist(Datalist.load(datalist).data_root, n_folds=2, seed=0), tmp_path / "dl.json")
    with pytest.raises(DataError, match="no test cases"):
        compare_tool.main(_argv(no_test, paths, work))
