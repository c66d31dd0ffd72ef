import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brats_ugrip.data import MODALITIES, NAMINGS
from brats_ugrip.io import read_volume
from brats_ugrip.synthetic.anatomy import (
    BRATS_AFFINE,
    BRATS_SHAPE,
    CSF,
    FIELD_OF_VIEW_MM,
    GM,
    WM,
    atlas_path,
    grid_affine,
    load_anatomy,
)
from brats_ugrip.synthetic.phantom import ET, NETC, SNFH, case_seed, make_phantom, write_phantoms

REPO = Path(__file__).resolve().parents[1]
HAS_ATLAS = atlas_path().is_file()


def _run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True)


@pytest.fixture
def no_atlas(monkeypatch, tmp_path):
    """An empty cache folder: the atlas is unavailable."""
    monkeypatch.setenv("BRATS_UGRIP_CACHE", str(tmp_path / "empty-cache"))
    return tmp_path / "empty-cache"


def _check_labels_and_background(phantom, brain_mask):
    label = phantom.label
    assert label.dtype == np.uint8 and set(np.unique(label).tolist()) == {0, NETC, SNFH, ET}
    tumour = label > 0
    assert not (tumour & ~brain_mask).any(), "tumour outside the brain"
    # The core (ET, NETC) lies inside the whole tumour with a margin: its 6-neighbours are tumour.
    core = np.isin(label, (NETC, ET))
    assert not (core & ~ndimage.binary_erosion(tumour)).any()
    # The necrotic core is wrapped in core (enhancing rim).
    assert not ((label == NETC) & ~ndimage.binary_erosion(core)).any()
    for modality, image in phantom.images.items():
        assert image.dtype == np.int16 and image.shape == label.shape, modality
        assert np.array_equal(image != 0, brain_mask), f"{modality}: non-zero voxels differ from the brain mask"


def _check_contrasts(phantom, classes):
    label, images = phantom.label, phantom.images
    normal_wm = (classes == WM) & (label == 0)

    def mean(modality, region):
        return images[modality][region].astype(np.float64).mean()

    assert mean("t1c", label == ET) > mean("t1c", label == SNFH)
    assert mean("t1c", label == ET) > mean("t1c", label == NETC)
    assert mean("t2f", label == SNFH) > mean("t2f", normal_wm)
    assert mean("t2w", label == SNFH) > mean("t2w", normal_wm)
    assert mean("t1n", label == SNFH) < mean("t1n", normal_wm)
    # Normal tissue: CSF dark on T1 and FLAIR, bright on T2; WM brighter than GM on T1, darker on T2.
    csf, gm = classes == CSF, (classes == GM) & (label == 0)
    assert mean("t1n", csf) < mean("t1n", gm) < mean("t1n", normal_wm)
    assert mean("t2w", csf) > mean("t2w", gm) > mean("t2w", normal_wm)
    assert mean("t2f", csf) < mean("t2f", normal_wm)


def test_same_seed_same_case_other_seed_other_case():
    a, b, c = make_phantom((48,) * 3, seed=7), make_phantom((48,) * 3, seed=7), make_phantom((48,) * 3, seed=8)
    assert np.array_equal(a.label, b.label) and np.array_equal(a.affine, b.affine)
    assert all(np.array_equal(a.images[m], b.images[m]) for m in MODALITIES)
    assert not np.array_equal(a.label, c.label)
    assert all(not np.array_equal(a.images[m], c.images[m]) for m in MODALITIES)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_labels_nested_in_brain_and_contrasts_plausible(size):
    anatomy = load_anatomy((size,) * 3)
    for seed in range(3):
        phantom = make_phantom((size,) * 3, seed=case_seed(seed, 0), anatomy=anatomy)
        assert phantom.label.shape == (size,) * 3
        _check_labels_and_background(phantom, anatomy.brain_mask)
        _check_contrasts(phantom, anatomy.classes)


def test_cli_writes_brats2023_cases_reproducibly(tmp_path):
    result = _run("synthetic/phantom.py", "--out", tmp_path / "a", "--cases", "3", "--size", "32", "--seed", "5",
                  "--prefix", "BraTS-TST")
    assert result.returncode == 0, result.stderr
    ids = [f"BraTS-TST-{i:05d}-000" for i in range(3)]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ids
    naming = NAMINGS["brats2023"]
    files = sorted(p.name for p in (tmp_path / "a" / ids[1]).iterdir())
    assert files == sorted(f"{ids[1]}-{s}.nii.gz" for s in (*MODALITIES, "seg"))
    # Case i is the library's phantom for seed (5, i), whatever the number of workers.
    paths = write_phantoms(tmp_path / "b", 3, 32, seed=5, prefix="BraTS-TST", workers=2)
    assert [p.name for p in paths] == ids
    expected = make_phantom((32,) * 3, case_seed(5, 2))
    for directory in (tmp_path / "a", tmp_path / "b"):
        label, affine = read_volume(directory / naming.label_name(ids[2]), np.uint8)
        assert np.array_equal(label, expected.label) and np.allclose(affine, expected.affine)
        for name, modality in zip(naming.image_names(ids[2]), MODALITIES):
            image = nib.load(directory / name)
            assert image.get_data_dtype() == np.int16
            assert np.array_equal(np.asarray(image.dataobj), expected.images[modality])
    assert nib.load(tmp_path / "a" / naming.label_name(ids[0])).get_data_dtype() == np.uint8


def test_cli_rejects_a_too_small_grid(tmp_path):
    result = _run("synthetic/phantom.py", "--out", tmp_path, "--cases", "1", "--size", "8")
    assert result.returncode == 2 and "--size" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("size", [32, 48, 96])
def test_cube_affine_is_las_isotropic_and_centred_on_the_brain(size):
    affine = make_phantom((size,) * 3, seed=0).affine
    assert nib.aff2axcodes(affine) == ("L", "A", "S")
    assert np.allclose(np.abs(np.diag(affine)[:3]), FIELD_OF_VIEW_MM / size)
    # The grid centre is the same world point for every size, and the brain (atlas bounding box) fits in it.
    centre = affine @ np.array([*((np.array([size] * 3) - 1) / 2), 1.0])
    assert np.allclose(centre, grid_affine((40, 40, 40)) @ np.array([19.5, 19.5, 19.5, 1.0]))
    brain = np.argwhere(load_anatomy((size,) * 3).brain_mask)
    assert brain.min() > 0 and brain.max() < size - 1


def test_full_brats_grid():
    phantom = make_phantom(BRATS_SHAPE, seed=0)
    assert phantom.label.shape == BRATS_SHAPE and np.array_equal(phantom.affine, BRATS_AFFINE)
    assert nib.aff2axcodes(phantom.affine) == ("L", "A", "S")
    anatomy = load_anatomy(BRATS_SHAPE)
    _check_labels_and_background(phantom, anatomy.brain_mask)
    _check_contrasts(phantom, anatomy.classes)


def test_fallback_to_a_procedural_head_without_the_atlas(no_atlas, caplog):
    with caplog.at_level(logging.WARNING, logger="brats_ugrip.synthetic.anatomy"):
        anatomy = load_anatomy((48,) * 3)
    assert anatomy.source == "procedural"
    assert len(caplog.records) == 1 and "fetch" in caplog.records[0].getMessage()
    fractions = np.bincount(anatomy.classes.ravel(), minlength=4)[1:] / anatomy.brain_mask.sum()
    assert (fractions > 0.05).all(), fractions
    phantom = make_phantom((48,) * 3, seed=3)
    _check_labels_and_background(phantom, anatomy.brain_mask)
    _check_contrasts(phantom, anatomy.classes)


def test_unreadable_atlas_falls_back_instead_of_crashing(no_atlas, caplog):
    atlas = atlas_path(no_atlas)
    atlas.parent.mkdir(parents=True)
    atlas.write_bytes(b"not a NIfTI file")
    with caplog.at_level(logging.WARNING, logger="brats_ugrip.synthetic.anatomy"):
        assert load_anatomy((32,) * 3).source == "procedural"
    assert str(atlas) in caplog.text


@pytest.mark.skipif(not HAS_ATLAS, reason="atlas not fetched (python synthetic/anatomy.py fetch)")
def test_atlas_anatomy_has_real_tissue_proportions_and_is_cached(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    atlas_path(cache).parent.mkdir(parents=True)
    atlas_path(cache).symlink_to(atlas_path())
    monkeypatch.setenv("BRATS_UGRIP_CACHE", str(cache))
    anatomy = load_anatomy((64,) * 3)
    assert anatomy.source == "atlas"
    fractions = np.bincount(anatomy.classes.ravel(), minlength=4)[1:] / anatomy.brain_mask.sum()
    assert np.all((fractions > 0.1) & (fractions < 0.6)), fractions  # CSF, GM, WM all present, none dominant
    # Brain volume at 3 mm voxels ≈ the atlas brain (1.45 l at 1 mm).
    assert abs(anatomy.brain_mask.sum() * 27 / 1e6 - 1.45) < 0.15
    cached = list((cache / "anatomy").glob("*64x64x64.npy"))
    assert len(cached) == 1 and np.array_equal(np.load(cached[0]), anatomy.tissue)
