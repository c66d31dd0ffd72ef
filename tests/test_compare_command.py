"""brats-ugrip compare: prediction folders scored against references and ranked by the rules, and the command on
score CSVs."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from brats_ugrip.candidates import from_predictions
from brats_ugrip.comparison import compare
from brats_ugrip.data import Case
from brats_ugrip.errors import DataError
from brats_ugrip.io import write_volume
from brats_ugrip.labels import get_scheme
from brats_ugrip.tools.compare import main

SCHEME = get_scheme("brats2023")
AFFINE = np.eye(4)
CASES = ["P1", "P2", "P3", "P4"]


def tumour(shift: int = 0) -> np.ndarray:
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[4:14, 4:14, 4:14] = SCHEME.edema
    labels[6:12, 6:12, 6:12] = SCHEME.core
    labels[8:11, 8:11, 8:11] = SCHEME.enhancing
    return np.roll(labels, shift, axis=0)


def test_prediction_folders_ranked_by_the_rules(tmp_path):
    cases = []
    for case_id in CASES:
        write_volume(tmp_path / "ref" / f"{case_id}.nii.gz", tumour(), AFFINE)
        write_volume(tmp_path / "exact" / f"{case_id}.nii.gz", tumour(), AFFINE)
        write_volume(tmp_path / "shifted" / f"{case_id}.nii.gz", tumour(1), AFFINE)
        if case_id != "P4":
            write_volume(tmp_path / "gap" / f"{case_id}.nii.gz", tumour(1), AFFINE)
        cases.append(Case(case_id, (), tmp_path / "ref" / f"{case_id}.nii.gz"))
    found = [from_predictions(name, tmp_path / name, cases, "brats2023", "regions", kind="single")
             for name in ("exact", "shifted", "gap")]
    result = compare(found, resamples=200)
    # exact: Dice 1 and HD95 0 everywhere → rank 1 on all 24 (case, metric) pairs. shifted and gap predict the same
    # maps on P1–P3 (tied: 2.5 each); on P4 gap has no prediction, which scores as the worst case: shifted 2, gap 3.
    assert [c.name for c in result.candidates] == ["exact", "shifted", "gap"]
    assert result.result("exact").mean_rank == 1.0
    assert result.result("shifted").mean_rank == pytest.approx((3 * 2.5 + 2) / 4)
    assert result.result("gap").mean_rank == pytest.approx((3 * 2.5 + 3) / 4)
    assert result.baseline == "exact" and result.metrics == ["dice_ET", "dice_TC", "dice_WT", "hd95_ET", "hd95_TC",
                                                             "hd95_WT"]
    with pytest.raises(DataError, match="reference segmentation"):
        from_predictions("x", tmp_path / "exact", [Case("P1", ())], "brats2023", "regions")


def _csv(path, dice):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "dice_WT", "hd95_WT"])
        for i, value in enumerate(dice):
            writer.writerow([f"c{i}", value, 10 * (1 - value)])


def test_command_writes_the_table(tmp_path, capsys):
    _csv(tmp_path / "a.csv", [0.8, 0.7, 0.9])
    _csv(tmp_path / "b.csv", [0.8, 0.7, 0.9])
    assert main(["--scores", f"a={tmp_path / 'a.csv'}", "--scores", f"b={tmp_path / 'b.csv'}", "--baseline", "a",
                 "--resamples", "100", "--out", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert capsys.readouterr().out == table + "\n"  # the file holds exactly the printed table
    assert "not distinguishable on 3 cases" in table and "100 resamples, seed 0" in table
    assert "exact over all 8 sign patterns" in table
    with pytest.raises(DataError, match="at least two"):
        main(["--scores", f"a={tmp_path / 'a.csv'}"])
    with pytest.raises(DataError, match="scores CSV not found"):  # exit code 2 through cli.run, no traceback
        main(["--scores", f"a={tmp_path / 'a.csv'}", "--scores", f"b={tmp_path / 'missing.csv'}"])
