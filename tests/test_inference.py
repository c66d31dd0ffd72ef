import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_ugrip.checkpoints import save_model_checkpoint
from brats_ugrip.config import InferenceConfig, load_config
from brats_ugrip.data import cases_from_dir
from brats_ugrip.inference import ALL_FLIPS, FlipTTA, predict_case, sliding_window_probabilities
from brats_ugrip.labels import get_scheme
from brats_ugrip.models import create_model, resolve_kwargs
from brats_ugrip.preprocess import preprocess_case

SETTINGS = InferenceConfig(roi_size=(32, 32, 32), overlap=0.25, sw_batch_size=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("segresnet", init_filters=8).eval()


def test_prediction_is_in_the_input_geometry(phantom_dir, model, tmp_path):
    case = cases_from_dir(phantom_dir)[0]
    shape = nib.load(str(case.images[0])).shape
    prediction = predict_case(model, case.images, SETTINGS)
    assert prediction.probabilities.shape == (3, *shape) and prediction.labels.shape == shape
    assert set(np.unique(prediction.labels)) <= {0, 1, 2, 3}
    pre = preprocess_case(case.images)
    box = pre.restore(np.ones((1, *pre.geometry.crop_shape), dtype=bool))[0]
    assert not box.all() and np.all(prediction.probabilities[:, ~box] == 0)  # nothing outside the brain box
    # Labelled on the crop and pasted back = pasted back and labelled.
    np.testing.assert_array_equal(prediction.labels, get_scheme("brats2023").to_labels(
        prediction.probabilities > SETTINGS.threshold))

    # The same case stored in another orientation gives the same prediction, in that orientation.
    flipped = []
    for path in case.images:
        image = nib.load(str(path))
        flip = np.diag([-1.0, 1.0, -1.0, 1.0])
        flip[:3, 3] = [shape[0] - 1, 0, shape[2] - 1]
        target = tmp_path / path.name
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::-1, :, ::-1].copy(), image.affine @ flip), target)
        flipped.append(target)
    reoriented = predict_case(model, flipped, SETTINGS)
    np.testing.assert_array_equal(reoriented.labels, prediction.labels[::-1, :, ::-1])


def test_flip_tta_unflips_before_averaging():
    torch.manual_seed(0)
    pointwise = torch.nn.Conv3d(4, 3, kernel_size=1)  # commutes with flips: TTA must change nothing
    windows = torch.randn(2, 4, 8, 8, 8)
    with torch.no_grad():
        plain = FlipTTA(pointwise)(windows)
        averaged = FlipTTA(pointwise, ALL_FLIPS)(windows)
    assert len(ALL_FLIPS) == 8
    torch.testing.assert_close(averaged, plain, atol=1e-6, rtol=0)
    assert torch.allclose(plain, torch.sigmoid(pointwise(windows)))
    # Forward passes of at most 3 windows (memory bounded by sw_batch_size) give the same average.
    spatial = torch.nn.Conv3d(4, 3, kernel_size=3, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(FlipTTA(spatial, ALL_FLIPS, max_batch=3)(windows), FlipTTA(spatial, ALL_FLIPS)(windows))


def test_tta_and_full_volume_keep_shapes(phantom_dir, model):
    case = cases_from_dir(phantom_dir)[1]
    image = torch.randn(1, 4, 36, 32, 28)
    with_tta = sliding_window_probabilities(model, image, InferenceConfig(roi_size=(32, 32, 32), tta=True))
    assert with_tta.shape == (1, 3, 36, 32, 28) and 0 <= float(with_tta.min()) and float(with_tta.max()) <= 1
    cropped = predict_case(model, case.images, SETTINGS)
    full = predict_case(model, case.images, SETTINGS, margin=10_000)  # the whole volume, no brain crop
    assert full.labels.shape == cropped.labels.shape


def test_brain_box_loses_nothing_a_context_free_network_predicts(phantom_dir):
    """Crop, windows, blending and paste-back are exact: a network whose output at a voxel depends on that voxel
    only predicts the same on the brain box as on the whole volume (so any difference a real network shows
    comes from its own sensitivity to window content, not from the crop)."""
    pointwise = torch.nn.Conv3d(4, 3, kernel_size=1)
    with torch.no_grad():
        pointwise.weight.copy_(torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0]]).view(3, 4, 1, 1, 1))
        pointwise.bias.fill_(-1.0)
    case = cases_from_dir(phantom_dir)[2]
    cropped = predict_case(pointwise, case.images, SETTINGS)
    full = predict_case(pointwise, case.images, SETTINGS, margin=10_000)
    assert full.labels.any() and (full.labels == 0).any()  # a real segmentation, not all or nothing
    np.testing.assert_allclose(cropped.probabilities, full.probabilities * (cropped.probabilities > 0), atol=1e-5)
    np.testing.assert_array_equal(cropped.labels, full.labels)


def test_infer_cli_writes_label_maps_with_the_input_affine(phantom_dir, model, tmp_path):
    config = load_config(base={"data": {"datalist": "d.json", "roi_size": [32, 32, 32]},
                               "model": {"name": "segresnet", "init_filters": 8},
                               "inference": {"overlap": 0.25, "sw_batch_size": 2}})
    ckpt = save_model_checkpoint(tmp_path / "m.ckpt", model.state_dict(),
                                 {"model": {"name": "segresnet", "kwargs": resolve_kwargs("segresnet", init_filters=8)},
                                  "config": config.to_dict()})
    cases = cases_from_dir(phantom_dir)[:1]
    data = tmp_path / "cases"
    for case in cases:
        (data / case.case_id).mkdir(parents=True)
        for path in case.images:
            (data / case.case_id / path.name).symlink_to(path)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "brats_ugrip.infer", "--ckpt", str(ckpt), "--input", str(data),
                             "--out", str(out), "--tta"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for case in cases:
        written, reference = nib.load(str(out / f"{case.case_id}.nii.gz")), nib.load(str(case.images[0]))
        assert written.shape == reference.shape and np.allclose(written.affine, reference.affine)
        assert written.get_data_dtype() == np.uint8
    missing = subprocess.run([sys.executable, "-m", "brats_ugrip.infer", "--ckpt", str(tmp_path / "nope.ckpt"),
                              "--input", str(data), "--out", str(out)], capture_output=True, text=True)
    assert missing.returncode == 2 and "checkpoint not found" in " ".join(missing.stderr.split())
