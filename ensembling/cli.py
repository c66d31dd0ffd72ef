"""Run (and fit) a per-channel weighted ensemble of segmentation models.

    python ensembling/cli.py --models a.ckpt b.ckpt ... [--weights W.yaml | --fit --datalist F --fold K
        [--test-fold K2] [--method fitted|dice|equal]] --input CASES --out DIR [--save-spec ensemble.yaml]
        [--probabilities] [--uncertainty [entropy|disagreement]] [--overlays]
    python ensembling/cli.py --spec ensemble.yaml --input CASES --out DIR

``--input`` is a case folder, a folder of case folders or a datalist JSON (``--section``). Each case gives
``DIR/<ID>.nii.gz`` (labels in the input geometry) and, when asked, ``DIR/probabilities/<ID>.nii.gz`` (TC, WT, ET
on a 4th axis), ``DIR/uncertainty/<ID>.nii.gz`` and ``DIR/overlays/<ID>.png``.

Without ``--weights``, ``--fit`` or ``--spec`` every model weighs 1. ``--fit`` chooses weights (``--method``),
thresholds and post-processing on the validation cases of ``--fold`` (see ``ensembling/fit.py``), and scores the
result on the datalist's test split when it has one (``--test-fold`` for another fold, ``--no-test-split`` for
none). A test case that a model trained or validated on is refused unless ``--allow-seen-test-cases``; then the
console table, the spec's fit record and the fit report all say so. The spec used is always saved
(``--save-spec``, default ``DIR/ensemble.yaml``), with the fit report next to it (``<spec>.fit.json``).

The fit is :func:`brats_ugrip.ensembling.api.fit_ensemble_from_checkpoints`; this command parses and calls it.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from brats_ugrip.atomic import atomic_write_json
from brats_ugrip.cli import console, progress_bar, run
from brats_ugrip.errors import ConfigError

if TYPE_CHECKING:
    from brats_ugrip.data import Case
    from brats_ugrip.ensembling.fit import FitResult
    from brats_ugrip.ensembling.predict import EnsemblePrediction
    from brats_ugrip.inference import CaseResult


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brats-ugrip ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument("--models", nargs="+", metavar="CKPT", help="checkpoints to ensemble")
    models.add_argument("--spec", help="an ensemble spec (ensemble.yaml) to run or to refit")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="YAML with per-model (TC, WT, ET) weights, optional thresholds, post-processing")
    weights.add_argument("--fit", action="store_true", help="choose weights, thresholds, post-processing on --fold")
    fit = parser.add_argument_group("fitting (--fit)")
    fit.add_argument("--datalist", help="datalist JSON holding the folds")
    fit.add_argument("--data-root", help="folder the datalist's paths are relative to (default: the datalist's)")
    fit.add_argument("--fold", type=int, help="validation fold the weights are fitted on")
    fit.add_argument("--test-fold", type=int, help="score on this fold instead of the datalist's test split")
    fit.add_argument("--no-test-split", dest="test_split", action="store_false",
                     help="do not score on the datalist's test split")
    fit.add_argument("--allow-seen-test-cases", action="store_true", help="score test cases that a model trained or "
                     "validated on (refused otherwise); every score label then says so")
    fit.add_argument("--method", choices=("fitted", "dice", "equal"), default="fitted",
                     help="fitted: simplex × threshold search; dice: proportional to each model's Dice; equal")
    fit.add_argument("--no-postprocessing", action="store_true", help="do not evaluate post-processing rules")
    fit.add_argument("--cache-dir", help="preprocessed-case cache (e.g. the runs' data.cache_dir) for loading folds")
    parser.add_argument("--input", help="case folder, folder of case folders, or datalist JSON (omit to only fit)")
    parser.add_argument("--section", choices=("testing", "training", "all"), default="testing",
                        help="datalist section of --input to predict (default testing)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--save-spec", type=Path, help="where to save the ensemble spec (default OUT/ensemble.yaml)")
    parser.add_argument("--probabilities", action="store_true", help="also write the averaged probability maps")
    parser.add_argument("--uncertainty", nargs="?", const="entropy", choices=("entropy", "disagreement"),
                        help="also write an uncertainty map (default kind: entropy)")
    parser.add_argument("--overlays", action="store_true", help="also write a PNG overlay per case")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="flip TTA for every model")
    parser.add_argument("--overlap", type=float, help="sliding-window overlap for every model")
    parser.add_argument("--sw-batch-size", type=int, help="windows per forward pass for every model")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available, else cpu)")
    return parser


def _check_fit_arguments(args: argparse.Namespace) -> None:
    if args.fit:
        if not args.datalist or args.fold is None:
            raise ConfigError("--fit", "needs --datalist F and --fold K (the held-out fold to fit on)")
        if args.test_fold is not None and args.test_fold == args.fold:
            raise ConfigError("--test-fold", f"must differ from --fold ({args.fold}): test cases are never fitted on")
    elif args.test_fold is not None or args.datalist or args.fold is not None or args.allow_seen_test_cases:
        raise ConfigError("--fold", "--datalist, --fold, --test-fold and --allow-seen-test-cases are options of --fit")


def score_table(result: FitResult, names: Sequence[str], test_label: str | None = None) -> Table:
    """Mean Dice of each model alone and of the ensemble, on the fitting cases (and the test cases, under
    ``test_label``, the label the fit record carries)."""
    title = "mean Dice (selection: the cases the ensemble was fitted on)"
    table = Table(title=title + (f"; test: {test_label}" if test_label else ""))
    table.add_column("model")
    sets = [("selection", result.singles, result.selection)]
    if result.test is not None:
        sets.append(("test", result.test_singles, result.test))
    for name, _, _ in sets:
        for region in ("TC", "WT", "ET", "mean"):
            table.add_column(f"{name} {region}", justify="right")
    rows = [(n, [s[i] for _, s, _ in sets]) for i, n in enumerate(names)] + [("ensemble", [e for _, _, e in sets])]
    for label, scores in rows:
        table.add_row(label, *(f"{s.dice[r]:.4f}" for s in scores for r in ("TC", "WT", "ET", "mean")))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_fit_arguments(args)

    import torch

    from brats_ugrip.ensembling.predict import Ensemble, write_prediction
    from brats_ugrip.ensembling.spec import EnsembleSpec, spec_from_checkpoints
    from brats_ugrip.infer import input_cases
    from brats_ugrip.inference import predict_cases

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    changes = {"tta": args.tta, "overlap": args.overlap, "sw_batch_size": args.sw_batch_size}
    changes = {k: v for k, v in changes.items() if v is not None}
    spec = EnsembleSpec.load(args.spec) if args.spec else None
    spec_path = args.save_spec or args.out / "ensemble.yaml"
    report = None
    if args.fit:
        from brats_ugrip.ensembling.api import fit_ensemble_from_checkpoints

        fitted = fit_ensemble_from_checkpoints(
            None if spec else args.models, spec=spec, datalist=args.datalist, fold=args.fold, data_root=args.data_root,
            test_fold=args.test_fold, test_split=args.test_split, allow_seen_test_cases=args.allow_seen_test_cases,
            method=args.method, postprocessing=not args.no_postprocessing, cache_dir=args.cache_dir, device=device,
            inference=changes)
        for warning in fitted.warnings:
            console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        if fitted.result.spec.fit.get("test_notice"):
            console.print(f"[bold yellow]{fitted.result.spec.fit['test_notice']}[/]", highlight=False)
        ensemble = fitted.ensemble
        console.print(score_table(fitted.result, [m.path.name for m in ensemble.members], fitted.test_label))
        report = fitted.result.report()
    else:
        spec = spec or spec_from_checkpoints(args.models, args.weights)
        if changes:
            spec.members = [dataclasses.replace(m, inference={**m.inference, **changes}) for m in spec.members]
        ensemble = Ensemble(spec, device)
    ensemble.spec.save(spec_path)
    if report is not None:
        atomic_write_json(spec_path.with_name(spec_path.name.removesuffix(".yaml") + ".fit.json"), report)
    console.print(f"wrote the ensemble spec {spec_path}")

    if args.input is None:
        if not args.fit:
            raise ConfigError("--input", "required unless --fit (cases to predict)")
        return 0
    cases = input_cases(args.input, args.section)
    with progress_bar() as bar:
        task = bar.add_task(f"ensembling {len(cases)} cases × {len(ensemble.active)} models",
                            total=len(cases) * len(ensemble.active))

        def overlay(case: Case, result: CaseResult, prediction: EnsemblePrediction | None) -> None:
            from brats_ugrip.ensembling.overlay import write_case_overlay

            if prediction is not None:
                write_case_overlay(args.out / "overlays" / f"{case.case_id}.png", case.images, prediction, ensemble.scheme)

        predict_cases(ensemble, cases, args.out, write=write_prediction, on_case=overlay if args.overlays else None,
                      probabilities=args.probabilities, uncertainty=args.uncertainty,
                      on_model=lambda: bar.advance(task))
    console.print(f"wrote {len(cases)} label maps to {args.out}")
    return 0


if __name__ == "__main__":
    run(main)
