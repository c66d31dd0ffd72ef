"""evaluate_case, worst_case and the tools/evaluate.py command end to end on tiny NIfTI cases."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from brats_ugrip.cli import run
from brats_ugrip.errors import ConfigError, DataError
from brats_ugrip.io import write_volume
from brats_ugrip.labels import get_scheme
from brats_ugrip.metrics import METRIC_SETS, evaluate_case, evaluate_dirs, find_reference_cases, worst_case
from brats_ugrip.metrics.regions import BRATS_MAX_HD95
from brats_ugrip.tools.evaluate import main

SCHEME = get_scheme("brats2023")
SPACING = (1.2, 1.2, 1.2)
AFFINE = np.diag([*SPACING, 1.0])


def tumour(shape=(24, 24, 24), shift: int = 0) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    labels[4:16, 4:16, 4:16] = SCHEME.edema
    labels[6:14, 6:14, 6:14] = SCHEME.core
    labels[8:12, 8:12, 8:12] = SCHEME.enhancing
    return np.roll(labels, shift, axis=0)


def test_metric_sets_give_flat_columns():
    ref, pred = tumour(), tumour(shift=1)
    regions = evaluate_case(pred, ref, "brats2023", "regions")
    assert set(regions) == {f"{m}_{r}" for m in ("dice", "hd95") for r in ("TC", "WT", "ET")}
    lesionwise = evaluate_case(pred, ref, SCHEME, "brats2024-ssa", SPACING)
    assert set(regions) < set(lesionwise) and {"lw_dice_WT", "lw_hd95_ET", "lw_fp_TC"} <= set(lesionwise)
    # One lesion per region, found: lesion-wise equals the region score.
    assert lesionwise["lw_dice_ET"] == pytest.approx(lesionwise["dice_ET"])
    panoptic = evaluate_case(pred, ref, SCHEME, "brats2025")
    assert panoptic["pan_tp_WT"] == 1 and panoptic["pan_dice_WT"] == pytest.approx(regions["dice_WT"], rel=1e-6)
    with pytest.raises(ConfigError, match="brats2024-ssa"):
        evaluate_case(pred, ref, SCHEME, "brats2099")
    assert {"regions", "brats2023-gli", "brats2024-met", "brats2025"} <= set(METRIC_SETS)


def test_worst_case_scores_zero_and_max_hd95_even_for_empty_regions():
    ref = tumour()
    ref[ref == SCHEME.enhancing] = SCHEME.core  # no ET: an empty prediction would score ET 1 / 0
    row = worst_case(ref, SCHEME, "brats2023-gli")
    assert row["dice_ET"] == row["lw_dice_ET"] == row["dice_WT"] == 0.0
    assert row["hd95_ET"] == row["lw_hd95_WT"] == BRATS_MAX_HD95
    assert (row["lw_tp_WT"], row["lw_fn_WT"], row["lw_fp_WT"]) == (0, 1, 0)
    assert worst_case(ref, SCHEME, "brats2025")["pan_hd95_ET"] == 373.0


def write_cases(root, pred_shapes: dict[str, tuple[int, int, int]]):
    """References in the three accepted layouts; predictions for the cases in ``pred_shapes`` (case C has none)."""
    ref = tumour()
    write_volume(root / "ref" / "A" / "A-seg.nii.gz", ref, AFFINE)
    write_volume(root / "ref" / "B-seg.nii.gz", ref, AFFINE)
    write_volume(root / "ref" / "C.nii.gz", ref, AFFINE)
    for case_id, shape in pred_shapes.items():
        pred = tumour(shape, shift={"A": 0, "B": 2}[case_id])
        write_volume(root / "pred" / f"{case_id}.nii.gz", pred, AFFINE)
    return root / "pred", root / "ref"


def test_cli_scores_every_reference_case_and_reports_the_missing_one(tmp_path, capsys):
    pred_dir, ref_dir = write_cases(tmp_path, {"A": (24, 24, 24), "B": (24, 24, 24)})
    assert sorted(find_reference_cases(ref_dir)) == ["A", "B", "C"]
    out = tmp_path / "metrics.csv"
    with pytest.raises(SystemExit) as exit_info:
        run(main, ["--pred", str(pred_dir), "--ref", str(ref_dir), "--metrics", "brats2023-gli",
                   "--out", str(out), "--workers", "2"])
    assert exit_info.value.code == 0
    stderr = capsys.readouterr().err
    assert re.search(r"1 case\(s\) have no prediction.*worst\s+case:\s+C\b", stderr, re.DOTALL)
    assert "lw_dice" in stderr  # the mean table
    assert "reproduces: rachitsaluja/BraTS-2023-Metrics metrics.py (BraTS-GLI, 2023)" in " ".join(stderr.split())

    table = pd.read_csv(out).set_index("case_id")
    assert list(table.index) == ["A", "B", "C"]
    assert table["prediction_missing"].tolist() == [False, False, True]
    assert table.loc["A", ["dice_ET", "dice_TC", "dice_WT", "lw_dice_ET"]].tolist() == [1.0] * 4
    expected_b = evaluate_case(tumour(shift=2), tumour(), SCHEME, "brats2023-gli", SPACING)  # spacing from the header
    assert table.loc["B", "hd95_WT"] == pytest.approx(expected_b["hd95_WT"]) == pytest.approx(2 * 1.2)
    assert table.loc["B", "lw_dice_TC"] == pytest.approx(expected_b["lw_dice_TC"])
    assert table.loc["C", ["dice_ET", "lw_dice_WT"]].tolist() == [0.0, 0.0]
    assert table.loc["C", ["hd95_TC", "lw_hd95_ET"]].tolist() == [BRATS_MAX_HD95] * 2


def test_cli_help_names_the_official_code_and_year_of_every_metric_set(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "brats2024-gli  rachitsaluja/BraTS-2024-Metrics metrics_GLI.py (BraTS-GLI, 2024)" in help_text
    assert "brats2023-met  rachitsaluja/BraTS-2023-Metrics metrics.py (BraTS-MET, 2023)" in help_text
    assert all(name in help_text for name in METRIC_SETS)


def test_cli_shape_mismatch_exits_non_zero_naming_the_case(tmp_path, capsys):
    pred_dir, ref_dir = write_cases(tmp_path, {"A": (24, 24, 24), "B": (24, 24, 20)})
    out = tmp_path / "metrics.csv"
    with pytest.raises(SystemExit) as exit_info:
        run(main, ["--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out)])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "case B" in stderr and "(24, 24, 20)" in stderr
    assert not out.exists()


def test_probability_map_prediction_is_rejected_naming_the_file(tmp_path):
    pred_dir, ref_dir = write_cases(tmp_path, {"A": (24, 24, 24)})
    write_volume(pred_dir / "A.nii.gz", tumour().astype(np.float32) / 4, AFFINE)
    with pytest.raises(DataError, match=r"A\.nii\.gz.*non-integer"):
        evaluate_dirs(pred_dir, ref_dir, "brats2023", "regions")
