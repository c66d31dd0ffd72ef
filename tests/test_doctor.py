"""The node check (tools/doctor.py) at tiny sizes on a CPU: every part reports, the JSON holds what the README
promises, and a broken part is reported without stopping the others."""
from __future__ import annotations

import json

import pytest

from brats_ugrip.tools import doctor


@pytest.mark.slow
def test_doctor_reports_every_part_at_tiny_size(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "doctor.json"
    code = doctor.main(["--size", "tiny", "--device", "cpu", "--models", "segresnet", "--workers", "0",
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["ok"], report
    assert report["device"]["device"] == "cpu" and report["device"]["bf16"] is False
    step = report["training"]["segresnet"]["eager"]
    assert step["step_seconds"] > 0 and step["samples_per_second"] == pytest.approx(1 / step["step_seconds"], rel=0.02)
    assert report["loader"]["samples_per_second"] > 0 and report["loader"]["margin"] > 0
    inference = report["inference"]
    # The brain box is smaller than the padded full volume, so it is never slower by much, and always smaller.
    full, box = inference["full_volume"]["volume"], inference["brain_box"]["volume"]
    assert all(b <= f for b, f in zip(box, full)) and box != full
    assert report["cache"]["writable"] and report["cache"]["read_mb_s"] > 0
    assert not list((tmp_path / "cache").iterdir())  # the probe file is gone
    assert report["wandb"]["mode"] == "offline"


def test_a_failing_part_is_reported_and_the_rest_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available")

    monkeypatch.setattr(doctor, "training_report", broken)
    monkeypatch.setattr(doctor, "write_cases", broken)
    results = doctor.check_node(models=["segresnet"], size="tiny", device="cpu", workers=0,
                                cache_dir=tmp_path / "cache", compile_too=False)
    assert results["training"]["error"] == "RuntimeError: CUDA error: no kernel image is available"
    assert "error" in results["cases"] and "loader" not in results
    assert results["cache"]["writable"] and results["ok"] is False


def test_unknown_model_is_refused_before_any_check(tmp_path):
    from brats_ugrip.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model 'mednext_x'"):
        doctor.main(["--models", "mednext_x", "--out", str(tmp_path / "d.json")])
