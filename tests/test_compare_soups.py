"""tools/compare_soups.py on stored per-case test scores (tiny soup checkpoints and a fit report written here, no
model run): the four candidates named and ranked as worked by hand, the printed table written to --out, and
scores from different or seen test cases refused with exit code 2."""
from __future__ import annotations

import json

import pytest
import torch

from brats_ugrip.checkpoints import save_model_checkpoint
from brats_ugrip.cli import run
from brats_ugrip.tools.compare_soups import main

CASES = ["c1", "c2", "c3"]
WHERE = "the test split of datalist.json, 3 cases"


def _per_case(dice: float) -> dict[str, dict[str, float]]:
    """Every case and region at ``dice``, HD95 falling as Dice rises (so one candidate is best on both)."""
    return {case: {f"{m}_{r}": (dice if m == "dice" else 10 * (1 - dice)) for m in ("dice", "hd95")
                   for r in ("TC", "WT", "ET")} for case in CASES}


def _soup(path, models: dict[str, float], where: str = WHERE, notice: str | None = None):
    test = {"label": f"Test scores ({where})", "notice": notice, "cases": 3, "where": where,
            "models": {name: {"dice": {}, "hd95": {}, "per_case": _per_case(d)} for name, d in models.items()}}
    meta = {"model": {"name": "segresnet", "kwargs": {}}, "soup": {"test": test}}
    return save_model_checkpoint(path, {"w": torch.zeros(1)}, meta)


def _fit(path, dice: float, cases: int = 3):
    fit = {"single_model_scores": [{}, {}], "test_cases_from": "the test split of datalist.json", "test_cases": cases,
           "test_notice": None}
    path.write_text(json.dumps({"fit": fit, "test": {"per_case": _per_case(dice)}}))
    return path


@pytest.fixture
def inputs(tmp_path):
    greedy = _soup(tmp_path / "greedy.ckpt", {"best ingredient (run0)": 0.6, "greedy soup (2 of 3)": 0.7,
                                              "uniform soup (3)": 0.65})
    uniform = _soup(tmp_path / "uniform.ckpt", {"best ingredient (run0)": 0.6, "uniform soup (3)": 0.65})
    return greedy, uniform, _fit(tmp_path / "ensemble.fit.json", 0.8)


def test_table_ranks_the_four_candidates_and_is_written_as_printed(inputs, tmp_path, capsys):
    greedy, uniform, fit = inputs
    out = tmp_path / "table.md"
    assert main(["--greedy", str(greedy), "--uniform", str(uniform), "--ensemble", str(fit), "--resamples", "100",
                 "--out", str(out)]) == 0
    table = out.read_text()
    assert capsys.readouterr().out == table + "\n"
    # Constant scores per candidate: ensemble (.8) > greedy (.7) > uniform (.65) > best ingredient (.6) on every
    # case and metric, so the mean ranks are 1, 2, 3, 4; Δ to the baseline (the best ingredient) is constant.
    rows = [line.split(" | ")[:3] for line in table.splitlines() if line[:3] in {"| 1", "| 2", "| 3", "| 4"}]
    assert rows == [["| 1", "ensemble (fitted per channel, 2 models)", "1.00"], ["| 2", "greedy soup (2 of 3)", "2.00"],
                    ["| 3", "uniform soup (3)", "3.00"], ["| 4", "best single ingredient (run0)", "4.00"]]
    assert table.startswith(f"Test scores ({WHERE})") and "+0.2000 [+0.2000, +0.2000]" in table


def test_different_or_seen_test_cases_are_refused(inputs, tmp_path, capsys):
    greedy, uniform, fit = inputs
    other = _fit(tmp_path / "other.fit.json", 0.8, cases=4)  # the ensemble was tested on 4 cases, the soups on 3
    seen = _soup(tmp_path / "seen.ckpt", {"best ingredient (run0)": 0.6, "uniform soup (3)": 0.65},
                 notice="NOT held out")
    for uniform_ckpt, fit_report, message in ((uniform, other, "tested on different cases"),
                                              (seen, fit, "not held out")):
        with pytest.raises(SystemExit) as exit_info:
            run(main, ["--greedy", str(greedy), "--uniform", str(uniform_ckpt), "--ensemble", str(fit_report)])
        assert exit_info.value.code == 2 and message in " ".join(capsys.readouterr().err.split())
