import numpy as np
import pytest

from brats_ugrip.errors import DataError
from brats_ugrip.labels import REGIONS, SCHEMES, get_scheme


def _consistent_map(scheme, shape=(12, 10, 8), seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice(np.array(scheme.labels), size=shape).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_round_trip_is_exact(name):
    scheme = get_scheme(name)
    labels = _consistent_map(scheme)
    regions = scheme.to_regions(labels)
    assert regions.shape == (3, *labels.shape) and regions.dtype == bool
    tc, wt, et = regions
    assert np.all(et <= tc) and np.all(tc <= wt)
    np.testing.assert_array_equal(scheme.to_labels(regions), labels)


def test_brats2023_regions_follow_definition():
    scheme = get_scheme("brats2023")
    labels = np.array([0, 1, 2, 3])
    tc, wt, et = scheme.to_regions(labels)
    assert tc.tolist() == [False, True, False, True]
    assert wt.tolist() == [False, True, True, True]
    assert et.tolist() == [False, False, False, True]


def test_brats2021_uses_label_4_for_et_and_rejects_3():
    scheme = get_scheme("brats2021")
    assert scheme.to_regions(np.array([4]))[:, 0].tolist() == [True, True, True]
    with pytest.raises(DataError, match=r"seg.nii.gz.*\[3\]"):
        scheme.to_regions(np.array([0, 3]), source="case/seg.nii.gz")


def test_msd_core_is_non_enhancing_plus_enhancing():
    scheme = get_scheme("msd")
    tc, wt, et = scheme.to_regions(np.array([1, 2, 3]))
    assert tc.tolist() == [False, True, True] and et.tolist() == [False, False, True] and wt.all()


def test_inconsistent_channels_innermost_wins():
    scheme = get_scheme("brats2023")
    # ET without TC/WT → enhancing; TC without WT → core; WT alone → edema.
    regions = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=bool)  # rows TC, WT, ET over 4 voxels
    assert scheme.to_labels(regions).tolist() == [3, 2, 1, 0]
    # Probabilities are thresholded at 0.5.
    probs = np.array([[0.6], [0.7], [0.4]])
    assert scheme.to_labels(probs).tolist() == [1]


def test_float_label_maps_must_be_integral():
    scheme = get_scheme("brats2023")
    assert scheme.to_regions(np.array([0.0, 3.0]))[2].tolist() == [False, True]
    with pytest.raises(DataError, match="non-integer"):
        scheme.to_regions(np.array([0.5]))


def test_unknown_scheme_lists_choices():
    with pytest.raises(DataError, match="brats2021"):
        get_scheme("brats2019")
    assert REGIONS == ("TC", "WT", "ET")
