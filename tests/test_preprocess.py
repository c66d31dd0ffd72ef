import shutil
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_ugrip.data import cases_from_dir
from brats_ugrip.errors import DataError
from brats_ugrip.io import read_volume
from brats_ugrip.labels import get_scheme
from brats_ugrip.loaders import TrainDataset, ValDataset, training_batch
from brats_ugrip.preprocess import CaseCache, preprocess_case


@pytest.fixture(scope="module")
def cases(phantom_dir):
    return cases_from_dir(phantom_dir)


def test_crop_normalise_and_restore_round_trip(cases):
    case = cases[0]
    pre = preprocess_case(case.images, case.label, "brats2023", case_id=case.case_id)
    full_shape = nib.load(str(case.images[0])).shape
    assert pre.image.shape[0] == 4 and pre.image.shape[1:] == pre.regions.shape[1:]
    assert np.prod(pre.image.shape[1:]) < np.prod(full_shape)  # cropped to the brain
    for channel in pre.image:
        brain = channel != 0
        assert abs(channel[brain].mean()) < 1e-3 and abs(channel[brain].std() - 1) < 1e-2
    labels = get_scheme("brats2023").to_labels(pre.restore(pre.regions).astype(bool))
    reference, _ = read_volume(case.label, np.uint8)
    np.testing.assert_array_equal(labels, reference)


def test_restore_handles_other_orientations(cases, tmp_path):
    case = cases[1]
    flipped = []
    for path in (*case.images, case.label):
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)[::-1, :, ::-1].copy()
        affine = image.affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0],
                                          [0, 0, -1, data.shape[2] - 1], [0, 0, 0, 1]])
        target = tmp_path / path.name
        nib.save(nib.Nifti1Image(data, affine), str(target))
        flipped.append(target)
    a = preprocess_case(case.images, case.label)
    b = preprocess_case(flipped[:4], flipped[4])
    # Same anatomy in RAS, whatever the file's axis order.
    np.testing.assert_allclose(a.image, b.image, atol=1e-5)
    restored = b.restore(b.regions)
    np.testing.assert_array_equal(get_scheme("brats2023").to_labels(restored.astype(bool)),
                                  np.asanyarray(nib.load(str(flipped[4])).dataobj))


def test_shape_mismatch_is_named(cases, tmp_path):
    case = cases[0]
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(small))
    with pytest.raises(DataError, match=f"{case.case_id}: t1n shape"):
        preprocess_case([case.images[0], small, *case.images[2:]], case_id=case.case_id)


def test_cache_serves_same_arrays_faster_and_detects_edits(cases, tmp_path):
    cache = CaseCache(tmp_path / "cache")
    shutil.copytree(cases[2].images[0].parent, tmp_path / cases[2].case_id)
    case = cases_from_dir(tmp_path / cases[2].case_id)[0]
    t0 = time.perf_counter()
    first = cache.get(case)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = cache.get(case)
    warm = time.perf_counter() - t0
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.regions, second.regions)
    assert second.image.dtype == np.float16 and second.geometry == first.geometry
    assert warm < cold
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    # A rewritten input changes the key: the cache recomputes instead of serving stale data.
    image = nib.load(str(case.images[0]))
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj) * 2, image.affine), str(tmp_path / "x.nii.gz"))
    case.images[0].write_bytes((tmp_path / "x.nii.gz").read_bytes())
    cache.get(case)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_datasets_yield_patches_and_whole_crops(cases, tmp_path):
    cache = CaseCache(tmp_path / "cache")
    train = TrainDataset(cases[:3], "brats2023", (32, 32, 32), cache, samples_per_case=2)
    assert len(train) == 6
    item = train[0]
    assert item["image"].shape == (4, 32, 32, 32) and item["label"].shape == (3, 32, 32, 32)
    assert set(np.unique(item["label"].numpy())) <= {0.0, 1.0}
    assert (item["image"].dtype, item["label"].dtype, item["jitter"].shape) == (torch.float16, torch.uint8, (2, 4))
    # Tumour-biased sampling: most patches contain tumour.
    hits = sum(bool(train[i % 6]["label"][1].any()) for i in range(12))
    assert hits >= 4

    # The batch becomes float32 with the drawn intensity jitter applied to brain voxels only.
    batch = torch.utils.data.default_collate([train[i] for i in range(2)])
    inputs = training_batch(batch)
    assert inputs["image"].dtype == inputs["label"].dtype == torch.float32
    torch.testing.assert_close(inputs["label"], batch["label"].float())
    image, (scale, shift) = batch["image"][1].float(), batch["jitter"][1].view(2, 4, 1, 1, 1)
    brain = image != 0
    assert brain.any() and (~brain).any() and scale.abs().max() <= 0.1 and shift.abs().max() > 0
    torch.testing.assert_close(inputs["image"][1], torch.where(brain, image * (1 + scale) + shift, 0.0))
    val = ValDataset(cases[:2], "brats2023", cache)
    item = val[1]
    assert item["case_id"] == cases[1].case_id and item["image"].shape[1:] == item["label"].shape[1:]
