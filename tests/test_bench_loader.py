"""bench/loader.py at 48³: the JSON line's structure, positive rates, and a worker recommendation consistent with
the rates it printed (no timing thresholds)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from brats_ugrip.bench.loader import main
from brats_ugrip.errors import ConfigError

TINY = ["--cases", "3", "--size", "48", "--roi", "32", "32", "32", "--batches", "4"]


def run_bench(capsys, *extra: str) -> dict:
    assert main([*TINY, *extra]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("| workers |") for line in lines)
    assert any(line.startswith("Recommendation: num_workers = ") for line in lines)
    return json.loads(lines[0])


def check_recommendation(result: dict) -> None:
    """``workers_needed`` follows from the printed rates: the first measured count ≥ 1 at the target ratio, or the
    per-worker rate of the largest count extrapolated when none reaches it."""
    target = result["target_ratio"] * result["consumed_samples_per_s"]
    loaders = sorted(result["loaders"], key=lambda r: r["workers"])
    reaching = [r["workers"] for r in loaders if r["workers"] >= 1 and r["samples_per_s"] >= target]
    if result["workers_needed_from"] == "measured":
        assert result["workers_needed"] == reaching[0]
    else:
        assert result["workers_needed_from"] == "extrapolated" and not reaching
        largest = loaders[-1]
        # the JSON line keeps 4 significant digits of each rate
        expected = math.ceil(target / largest["samples_per_s_per_worker"])
        assert result["workers_needed"] == pytest.approx(expected, rel=2e-3, abs=1)
        assert result["workers_needed"] > largest["workers"] or largest["workers"] == 0


@pytest.mark.parametrize("step_seconds", ["1000", "1e-6"])  # a consumer slower / faster than any loader
def test_given_step_time(capsys, step_seconds):
    result = run_bench(capsys, "--workers", "0", "1", "--step-seconds", step_seconds)
    assert result["step_source"] == "given" and result["step_s"] == float(step_seconds)
    assert result["consumed_samples_per_s"] == pytest.approx(2 / float(step_seconds), rel=1e-3)
    assert [r["workers"] for r in result["loaders"]] == [0, 1]
    for r in result["loaders"]:
        assert r["samples_per_s"] > 0 and r["first_round_s"] > 0
        assert r["samples_per_s_per_worker"] == pytest.approx(r["samples_per_s"] / max(r["workers"], 1), rel=1e-3)
        assert r["ratio"] == pytest.approx(r["samples_per_s"] / result["consumed_samples_per_s"], rel=0.01)
    check_recommendation(result)
    assert result["workers_needed_from"] == ("measured" if step_seconds == "1000" else "extrapolated")


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads make a tiny network's step ~30× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_measured_step(capsys, one_thread):
    result = run_bench(capsys, "--workers", "1", "--model", "segresnet", "--init-filters", "8", "--steps", "1")
    assert result["step_source"].startswith("segresnet f8 fp32 on cpu") and result["step_s"] > 0
    check_recommendation(result)


@pytest.mark.parametrize("args, key", [(["--roi", "40", "40", "40", "--model", "mednext_b"], "--roi"),
                                       (["--workers", "-1", "--step-seconds", "1"], "--workers"),
                                       (["--size", "big", "--step-seconds", "1"], "--size"),
                                       (["--model", "segresnet", "--deep-supervision"], "deep_supervision")])
def test_bad_options_are_named(args, key):
    with pytest.raises(ConfigError, match=key):
        main(["--cases", "2", *args])
