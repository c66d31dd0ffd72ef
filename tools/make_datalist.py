"""Build a datalist JSON with balanced folds from a folder of BraTS cases.

    python tools/make_datalist.py DATA_DIR --folds 5 --seed 0 --out datalist.json
    python tools/make_datalist.py DATA_DIR --folds 5 --test-fraction 0.2 --out datalist.json

``--test-fraction F`` (or ``--test-cases N``) first holds out that share of the labelled cases as the datalist's
``test`` section, drawn by the same kind of seeded shuffle as the folds; the folds are dealt from the rest. No run
trains or validates on the test split; soups and ensemble fits report on it.

The naming (BraTS 2023+ ``-t1c``/``-t1n``/``-t2f``/``-t2w``/``-seg`` or BraTS 2021 ``_t1ce``/``_t1``/``_flair``/
``_t2``/``_seg``) is detected; channels are always stored in the order t1c, t1n, t2f, t2w and recorded in the file.

Every folder that is not a case is listed with the reason (e.g. ``incomplete case: missing X-t2f.nii.gz``). An
incomplete case (a folder with NIfTI files but not the four modalities) stops the command (exit 2, nothing
written) unless ``--skip-incomplete`` is given: a datalist silently short of a case skews every fold.
"""
from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from brats_ugrip.cli import console, run
from brats_ugrip.data import make_datalist, save_datalist, skipped_folders
from brats_ugrip.errors import DataError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="folder of case folders")
    parser.add_argument("--folds", type=int, default=5, help="number of cross-validation folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    test = parser.add_mutually_exclusive_group()
    test.add_argument("--test-fraction", type=float, help="share of the labelled cases held out as the test split")
    test.add_argument("--test-cases", type=int, help="number of labelled cases held out as the test split")
    parser.add_argument("--out", type=Path, default=Path("datalist.json"), help="output JSON (default datalist.json)")
    parser.add_argument("--skip-incomplete", action="store_true",
                        help="write the datalist without the incomplete cases (they are listed) instead of stopping")
    args = parser.parse_args(argv)
    skipped = skipped_folders(args.data_dir) if args.data_dir.is_dir() else {}
    for name, reason in skipped.items():
        console.print(f"skipped {args.data_dir / name}: {reason}", highlight=False)
    incomplete = sorted(name for name, reason in skipped.items() if reason.startswith("incomplete"))
    if incomplete and not args.skip_incomplete:
        raise DataError(f"{args.data_dir}: {len(incomplete)} incomplete case folder(s) ({', '.join(incomplete[:5])}"
                        f"{', …' if len(incomplete) > 5 else ''}); complete them, or pass --skip-incomplete to leave "
                        "them out of the datalist")
    if args.test_fraction is not None and not 0 <= args.test_fraction < 1:
        parser.error(f"--test-fraction must be in [0, 1), got {args.test_fraction}")
    if args.test_cases is not None and args.test_cases < 0:
        parser.error(f"--test-cases must be ≥ 0, got {args.test_cases}")
    datalist = make_datalist(args.data_dir, args.folds, args.seed, relative_to=args.out.parent,
                             test_fraction=args.test_fraction, test_cases=args.test_cases)
    save_datalist(datalist, args.out)
    sizes = Counter(e["fold"] for e in datalist["training"])
    console.print(f"{args.out}: {len(datalist['training'])} training cases "
                  f"(folds {dict(sorted(sizes.items()))}), {len(datalist.get('test', []))} in the test split, "
                  f"{len(datalist['testing'])} unlabelled (testing), naming {datalist['naming']}, "
                  f"scheme {datalist['label_scheme']}")
    return 0


if __name__ == "__main__":
    run(main)
