import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from brats_ugrip.data import MODALITIES, Datalist, cases_from_dir, check_case, make_datalist, save_datalist
from brats_ugrip.io import read_volume
from brats_ugrip.synthetic.synthesize import (
    GENERATOR,
    SynthesisParams,
    synthesize_case,
    synthesize_datalist,
    synthesize_from_case,
)

REPO = Path(__file__).resolve().parents[1]
STILL = SynthesisParams(max_rotation_deg=0, max_scaling=0, displacement_std_mm=0)
CLEAN = SynthesisParams(max_blur_mm=0, max_noise=0, bias_log_std=0, relative_std_range=(0.0, 0.01))


def _mean(image, mask):
    return float(image[mask].mean())


@pytest.fixture(scope="module")
def sources(phantom_dir):
    """(t1n, label, voxel spacing) of every phantom."""
    loaded = []
    for case in cases_from_dir(phantom_dir):
        t1n, affine = read_volume(case.images[MODALITIES.index("t1n")])
        loaded.append((t1n, read_volume(case.label, np.int16)[0], np.linalg.norm(affine[:3, :3], axis=0)))
    return loaded


@pytest.fixture(scope="module")
def synth_dir(phantom_dir, tmp_path_factory):
    """Every phantom synthesised twice through the CLI (seed 3)."""
    root = tmp_path_factory.mktemp("synth")
    save_datalist(make_datalist(phantom_dir, 3, 0, relative_to=root), root / "datalist.json")
    result = subprocess.run([sys.executable, "synthetic/synthesize.py", "--datalist", root / "datalist.json",
                             "--out", root / "cases", "--per-case", "2", "--seed", "3"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return root / "cases"


def test_without_deformation_the_label_map_is_kept_exactly(sources):
    t1n, label, spacing = sources[0]
    out = synthesize_case(t1n, label, "brats2023", seed=1, params=STILL, spacing=spacing)
    np.testing.assert_array_equal(out.label, label)


def test_images_and_label_share_the_deformation(sources):
    """Voxels classified by their 4-channel intensity agree with the output seg, not with the source seg."""
    t1n, label, spacing = sources[0]
    out = synthesize_case(t1n, label, "brats2023", seed=2, params=CLEAN, spacing=spacing)
    assert not np.array_equal(out.label, label)  # it was deformed
    assert {1, 2, 3} <= set(np.unique(out.label).tolist())
    intensities = out.images.reshape(4, -1).T[:, None, :] / 1000.0
    nearest = np.abs(intensities - out.means.T[None]).sum(axis=2).argmin(axis=1).reshape(out.label.shape)
    tumour = out.label > 0
    assert (nearest == out.classes)[tumour].mean() > 0.95
    assert ((nearest >= 4) == tumour).mean() > ((nearest >= 4) == (label > 0)).mean()
    # The brain (non-zero voxels of every modality) is the deformed brain, and holds the whole tumour.
    assert np.array_equal(out.images[0] != 0, out.classes != 0) and np.all(out.images[:, tumour] > 0)


@pytest.mark.parametrize("seed", range(2))
def test_contrast_rules_hold(sources, seed):
    for t1n, label, spacing in sources:
        out = synthesize_case(t1n, label, "brats2023", seed, spacing=spacing)
        images, seg = dict(zip(MODALITIES, out.images.astype(np.float64))), out.label
        netc, snfh, et, normal = seg == 1, seg == 2, seg == 3, (out.classes > 0) & (seg == 0)
        t1c = images["t1c"]
        assert _mean(t1c, et) > max(_mean(t1c, snfh), _mean(t1c, normal))
        if netc.any():  # a necrotic core of a few voxels may be deformed away on a 48³ phantom
            assert _mean(t1c, et) > _mean(t1c, netc) and _mean(t1c, netc) < _mean(t1c, normal)
        assert _mean(images["t2f"], snfh) > _mean(images["t2f"], normal)
        # "Bright-ish" / "dark-ish" rules compare with the average of the three normal tissue classes.
        tissue_average = {m: np.mean([_mean(images[m], out.classes == k) for k in (1, 2, 3)]) for m in ("t2w", "t1n")}
        assert _mean(images["t2w"], snfh) > tissue_average["t2w"] and _mean(images["t1n"], snfh) < tissue_average["t1n"]


def test_written_cases_keep_brats_contrasts(synth_dir):
    for case in cases_from_dir(synth_dir):
        t1c, t2f = (read_volume(case.images[MODALITIES.index(m)])[0] for m in ("t1c", "t2f"))
        seg, _ = read_volume(case.label, np.uint8)
        assert _mean(t1c, seg == 3) > _mean(t1c, seg == 2)
        assert _mean(t2f, seg == 2) > _mean(t2f, (t2f != 0) & (seg == 0))


def test_written_cases_are_valid_and_record_their_origin(synth_dir, phantom_dir):
    cases = cases_from_dir(synth_dir)
    sources = sorted(p.name for p in phantom_dir.iterdir())
    assert len(cases) == 2 * len(sources)
    for case in cases:
        assert check_case(case, "brats2023").ok
        record = json.loads((case.images[0].parent / "synthesis.json").read_text())
        assert record["generator"] == GENERATOR and record["source_case"] in sources and record["base_seed"] == 3
        assert case.case_id.startswith(record["source_case"])
    seeds = [json.loads((c.images[0].parent / "synthesis.json").read_text())["seed"] for c in cases]
    assert len(set(seeds)) == len(seeds)


def test_deterministic_by_seed(phantom_dir, synth_dir, tmp_path):
    case = cases_from_dir(phantom_dir)[1]
    again = synthesize_from_case(case, "brats2023", tmp_path / "a", index=1, base_seed=3)
    other = synthesize_from_case(case, "brats2023", tmp_path / "b", index=1, base_seed=4)
    written = synth_dir / again.name
    for name in [p.name for p in written.glob("*.nii.gz")]:
        reference = read_volume(written / name)[0]
        np.testing.assert_array_equal(read_volume(again / name)[0], reference)
    assert not np.array_equal(read_volume(next(other.glob("*-t1c.nii.gz")))[0],
                              read_volume(next(written.glob("*-t1c.nii.gz")))[0])


def test_only_original_cases_condition_the_synthesis(phantom_dir, tmp_path):
    raw = make_datalist(phantom_dir, 2, 0)
    for entry in raw["training"][1:]:
        entry.update(fold=-1, source="synthetic")
    out = synthesize_datalist(Datalist.from_dict(raw), tmp_path, per_case=1)
    assert [p.name.split("-syn")[0] for p in out] == [raw["training"][0]["case_id"]]


def test_cli_reports_bad_datalist(tmp_path):
    result = subprocess.run([sys.executable, "synthetic/synthesize.py", "--datalist", tmp_path / "missing.json",
                             "--out", tmp_path / "out"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "missing.json" in result.stderr
