"""The speed benchmarks run at tiny sizes and report consistent figures (no timing thresholds: ratios only)."""
from __future__ import annotations

import json

import pytest

from brats_ugrip.bench import infer as infer_bench
from brats_ugrip.bench import train_step


def _json_line(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines() if line.startswith("{")))


def test_train_step_bench_compares_project_and_bare_loop(capsys):
    assert train_step.main(["--model", "mednext_s", "--init-filters", "4", "--roi", "32", "32", "32",
                            "--batch-size", "1", "--steps", "2", "--warmup", "1", "--device", "cpu"]) == 0
    result = _json_line(capsys.readouterr().out)
    assert result["model_kwargs"]["deep_supervision"] is True
    bare, project = result["rows"]
    assert (bare["path"], project["path"]) == ("bare", "project")
    assert bare["ms_per_step"] > 0 and project["ms_per_step"] > 0
    assert project["ratio_to_bare"] == pytest.approx(project["ms_per_step"] / bare["ms_per_step"], rel=1e-2)
    assert result["fastest_project_over_bare_fp32_eager"] == pytest.approx(project["ratio_to_bare"], rel=1e-2)


def test_train_step_bench_refuses_gpu_precision_on_cpu(capsys):
    from brats_ugrip.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a GPU"):
        train_step.main(["--precision", "bf16-mixed", "--device", "cpu"])


def test_infer_bench_trains_and_compares_paths(capsys):
    assert infer_bench.main(["--size", "48", "--roi", "32", "32", "32", "--train-epochs", "1", "--train-cases", "3",
                             "--test-cases", "2", "--repeat", "1", "--tta", "--device", "cpu"]) == 0
    result = _json_line(capsys.readouterr().out)
    paths = [r["path"] for r in result["rows"]]
    assert paths == ["full fp32", "box fp32", "box fp32, flip TTA batched", "box fp32, flip TTA 8 passes"]
    full, box, batched, separate = result["rows"]
    assert full["volume"] == [48, 48, 48] and box["windows"] <= full["windows"]
    assert all(0 < s <= 48 for s in box["volume"])
    # Batched and separate flip TTA compute the same average of the same 8 predictions.
    assert batched["dice"] == pytest.approx(separate["dice"], abs=1e-3)
    assert box["max_dice_difference"] == pytest.approx(max(abs(box["dice"][k] - full["dice"][k]) for k in full["dice"]),
                                                       abs=1e-5)
