"""Add a folder of extra labelled cases (synthetic or external) to a datalist's training-only fold −1.

    python tools/integrate_cases.py --datalist F --cases DIR --tag synthetic [--prefix BraTS-SYN] [--data-root R]

Each case of DIR (BraTS 2023 or 2021 naming, e.g. the output of ``synthetic/synthesize.py`` or of any external
generator writing that layout) is checked with the case validator, copied into the datalist's data root as
``<tag>/<prefix>-NNNNN-000/`` in the datalist's naming (labels converted to its scheme when they differ; the
``<tag>`` folder keeps ``tools/make_datalist.py`` on the data root from taking them for original cases) and
appended to fold −1 with ``"source": TAG``, its origin (the folder name in DIR), and the generator, seed and source case
from its ``synthesis.json`` when there is one. Running it again adds nothing: a case whose (tag, origin,
generator, seed) is already in the datalist is skipped. Folds ≥ 0 are never touched. Exits 1 when some cases
were rejected by the validator (the others are still added).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brats_ugrip.cli import console, run, track
from brats_ugrip.data import NAMINGS, Case, CaseReport, Datalist, cases_from_dir, check_case, detect_naming, save_datalist
from brats_ugrip.errors import DataError
from brats_ugrip.io import read_volume, write_volume
from brats_ugrip.labels import get_scheme
from brats_ugrip.tools.check_data import print_case_problems
from brats_ugrip.training_cases import ORIGINAL, append_training_only, entry_key

PROVENANCE_FILE = "synthesis.json"


def read_provenance(case: Case) -> dict[str, Any]:
    """``synthesis.json`` next to the case's images (generator, seed, source case...), or ``{}``."""
    path = case.images[0].parent / PROVENANCE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error


def default_prefix(tag: str) -> str:
    """``BraTS-`` and the first three letters of the tag: ``synthetic`` → ``BraTS-SYN``."""
    letters = re.sub(r"[^A-Za-z]", "", tag).upper()[:3]
    if not letters:
        raise DataError(f"--tag {tag!r} has no letters to make a case prefix from; pass --prefix")
    return f"BraTS-{letters}"


def next_number(ids: Sequence[str], prefix: str) -> int:
    """The first free ``NNNNN`` after every ``<prefix>-NNNNN-000`` id in ``ids``."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{5}})-\d{{3}}$")
    numbers = [int(m.group(1)) for m in map(pattern.match, ids) if m]
    return max(numbers, default=0) + 1


def copy_case(case: Case, scheme: str, folder: Path, case_id: str, naming_name: str, target_scheme: str) -> None:
    """Copy ``case`` to ``folder/case_id`` under a new name; labels are rewritten only when schemes differ.

    The folder is assembled next to its destination and renamed into place, so a killed run leaves no half case.
    """
    naming = NAMINGS[naming_name]
    staging = folder / f".{case_id}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for source, name in zip(case.images, naming.image_names(case_id)):
        shutil.copyfile(source, staging / Path(name).name)
    label_target = staging / Path(naming.label_name(case_id)).name
    if scheme == target_scheme:
        shutil.copyfile(case.label, label_target)
    else:
        label, affine = read_volume(case.label, np.int16)
        regions = get_scheme(scheme).to_regions(label, source=str(case.label))
        write_volume(label_target, get_scheme(target_scheme).to_labels(regions), affine)
    provenance = case.images[0].parent / PROVENANCE_FILE
    if provenance.is_file():
        shutil.copyfile(provenance, staging / PROVENANCE_FILE)
    destination = folder / case_id
    shutil.rmtree(destination, ignore_errors=True)  # left by a run killed before it saved the datalist
    staging.rename(destination)


def integrate_cases(datalist: Datalist, cases_dir: str | Path, tag: str, prefix: str | None = None,
                    generator: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]], list[CaseReport]]:
    """Copy the new cases of ``cases_dir`` into ``datalist.data_root`` and append them to fold −1.

    Args:
        generator: recorded for cases without a ``synthesis.json`` (e.g. ``"med-ddpm"``).

    Returns:
        (the new datalist dict — not yet saved, the added entries, reports of the cases rejected).
    """
    if tag == ORIGINAL:
        raise DataError(f"--tag {ORIGINAL!r} is reserved for the datalist's own cases; use e.g. synthetic")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", tag):
        raise DataError(f"--tag {tag!r}: use letters, digits, '_', '.' or '-' (it names a folder of the data root)")
    prefix = prefix or default_prefix(tag)
    naming_name = datalist.raw.get("naming", "brats2023")
    present = {entry_key(e) for e in datalist.raw["training"]}
    taken = [c.case_id for c in datalist.training + datalist.testing]
    number = next_number(taken, prefix)
    entries, rejected = [], []
    for case in track(cases_from_dir(cases_dir), "integrating cases"):
        provenance = read_provenance(case)
        record = {"source": tag, "origin": case.case_id, "generator": provenance.get("generator", generator),
                  "seed": provenance.get("seed"), "source_case": provenance.get("source_case")}
        record = {k: v for k, v in record.items() if v is not None}
        if entry_key(record) in present:
            continue
        if case.label is None:
            rejected.append(CaseReport(case.case_id, ["seg: no label map; training cases need one"]))
            continue
        scheme = provenance.get("label_scheme") or detect_naming(case.images[0].parent).label_scheme
        report = check_case(case, scheme)
        if not report.ok:
            rejected.append(report)
            continue
        case_id = f"{prefix}-{number:05d}-000"
        number += 1
        copy_case(case, scheme, datalist.data_root / tag, case_id, naming_name, datalist.label_scheme)
        naming = NAMINGS[naming_name]
        entries.append({"case_id": case_id, "image": [f"{tag}/{name}" for name in naming.image_names(case_id)],
                        "label": f"{tag}/{naming.label_name(case_id)}", **record})
    raw, added = append_training_only(datalist.raw, entries)
    return raw, added, rejected


def print_rejected(rejected: Sequence[CaseReport]) -> None:
    print_case_problems(rejected, f"{len(rejected)} cases rejected (not added)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", type=Path, required=True,
                        help="datalist to extend (rewritten in place, atomically)")
    parser.add_argument("--cases", type=Path, required=True, help="folder of case folders to add")
    parser.add_argument("--tag", required=True, help="the cases' source, e.g. synthetic")
    parser.add_argument("--prefix", default=None,
                        help="new case id prefix (default BraTS- and the tag's first 3 letters)")
    parser.add_argument("--generator", default=None, help="generator name for cases without a synthesis.json")
    parser.add_argument("--data-root", type=Path, default=None, help="override the datalist's data_root")
    args = parser.parse_args(argv)
    datalist = Datalist.load(args.datalist, args.data_root)
    raw, added, rejected = integrate_cases(datalist, args.cases, args.tag, args.prefix, args.generator)
    if added:
        save_datalist(raw, args.datalist)
    if rejected:
        print_rejected(rejected)
    console.print(f"{args.datalist}: added {len(added)} cases to fold -1 as source {args.tag!r}"
                  + (f" ({added[0]['case_id']} … {added[-1]['case_id']})" if added else " (nothing new)"))
    return 1 if rejected else 0


if __name__ == "__main__":
    run(main)
