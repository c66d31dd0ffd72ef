"""What the soup commands share: the held-out cases, scoring ingredients and soups, and the soup's metadata.

A :class:`SoupSession` holds the selection cases (by default the fold the ingredients were validated on, from
their metadata) and optionally test cases (``--test-fold``), each loaded once as a
:class:`~brats_ugrip.heldout.HeldOutSet`, one network of the ingredients' architecture into which every state dict
is loaded for scoring, and the count of evaluations per set.
"""
from __future__ import annotations

import argparse
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from brats_ugrip.checkpoints import build_model, git_commit
from brats_ugrip.cli import console
from brats_ugrip.config import InferenceConfig, config_from_dict
from brats_ugrip.data import Case, Datalist
from brats_ugrip.datasets import TrainDataset, training_batch
from brats_ugrip.errors import BratsUgripError, CheckpointError, ConfigError, DataError
from brats_ugrip.heldout import FINGERPRINT_SETTINGS, HeldOutScore, HeldOutSet, checkpoint_settings, stored_score
from brats_ugrip.preprocess import CaseCache
from brats_ugrip.souping.ingredients import Ingredients, SoupWarning
from brats_ugrip.souping.report import ReportRow, ScoreTable
from brats_ugrip.souping.soups import StateDict, recalibrate_batchnorm

SOUP_META_KEYS = ("config", "model", "fold", "init_id")
"""Metadata a soup inherits from its reference ingredient (epoch, step and run hashes describe one run only)."""


@dataclass
class Scores:
    """Mean scores of one model on one set: ``dice`` and ``hd95`` as ``{"TC", "WT", "ET", "mean"}``.

    ``source`` is ``"metadata"`` for an ingredient score read from its checkpoint, ``"evaluated"`` otherwise."""

    dice: dict[str, float]
    hd95: dict[str, float] | None = None
    source: str = "evaluated"

    @classmethod
    def of(cls, score: HeldOutScore) -> Scores:
        return cls(score.dice, score.hd95)

    def row(self, model: str) -> ReportRow:
        return ReportRow(model, self.dice, self.hd95)


def soup_parser(description: str | None) -> argparse.ArgumentParser:
    """The options both soup commands take: ``--ckpts``, ``--out`` and how to choose and read the held-out cases
    (the ``args`` of :class:`SoupSession`); each command adds its own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpts", required=True, type=Path, help="folder of checkpoints (*.ckpt, *.pt, *.pth)")
    parser.add_argument("--out", required=True, type=Path, help="soup checkpoint to write")
    group = parser.add_argument_group("held-out data")
    group.add_argument("--datalist", help="datalist JSON (default: the one the ingredients were trained with)")
    group.add_argument("--data-root", help="folder the datalist's paths are relative to (default: the datalist's)")
    group.add_argument("--fold", type=int, help="selection fold (default: the fold the ingredients were validated on)")
    group.add_argument("--test-fold", type=int, help="score best ingredient, uniform and greedy soups on this fold too: "
                       "cases never used for selection")
    group.add_argument("--test-datalist", help="take the test cases from this datalist (its --test-fold, or all of "
                       "its labelled cases)")
    group.add_argument("--cache-dir", help="preprocessed-case cache (default: the runs' cache when there is one)")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="device for inference (default: %(default)s); held-out cases are kept there when they fit")
    group.add_argument("--sw-batch-size", type=int, help="sliding-window batch (changes speed only)")
    group.add_argument("--rescore", action="store_true", help="recompute the ingredients' scores even when their "
                       "checkpoints hold scores measured on the same cases with the same settings")
    group.add_argument("--no-hd95", dest="hd95", action="store_false",
                       help="skip HD95 in the report (saves the report-only evaluations)")
    group.add_argument("--recalibrate-bn", action="store_true", help="recompute BatchNorm running statistics of each "
                       "soup on training patches (BatchNorm models only; GroupNorm models need none)")
    group.add_argument("--bn-batches", type=int, default=16, help="training batches for --recalibrate-bn")
    group.add_argument("--report-dir", help="where report.md/.csv/.png go (default: next to --out, <name>_report)")
    return parser


def report_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    return Path(args.report_dir) if args.report_dir else out.with_name(f"{out.stem}_report")


def print_warnings_on_console() -> None:
    """Show :class:`SoupWarning` messages as one readable line each (no file and line of the library)."""
    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        console.print(f"[yellow]warning:[/] {message}", highlight=False)

    warnings.showwarning = show
    warnings.simplefilter("always", SoupWarning)


def _settings(ingredients: Ingredients) -> InferenceConfig:
    """The reference ingredient's inference settings; a warning when others were validated with other settings."""
    settings = []
    for ingredient in ingredients:
        try:
            settings.append(checkpoint_settings(ingredient.meta))
        except (KeyError, ConfigError) as error:
            raise CheckpointError(f"{ingredient.path}: its metadata holds no valid run config, so its inference "
                                  f"settings are unknown ({error})") from error
    key = [tuple(str(getattr(s, name)) for name in FINGERPRINT_SETTINGS) for s in settings]
    if len(set(key)) > 1:
        warnings.warn(f"the ingredients were validated with different inference settings; all are scored with "
                      f"{ingredients[0].name}'s ({settings[0]})", SoupWarning, stacklevel=2)
    return settings[0]


def default_cache_dir(meta: dict[str, Any]) -> str | None:
    """Where the run cached its preprocessed cases (as training chooses it), if that folder exists."""
    from brats_ugrip.preprocess import case_cache_dir  # the one rule for where a run's cache lives

    config = meta.get("config") or {}
    candidate = case_cache_dir(((config.get("data") or {}).get("cache_dir")), config.get("run_dir"))
    return str(candidate) if candidate is not None and candidate.is_dir() else None


def _ingredient_datalist(ingredient_config: dict[str, Any]) -> Datalist | None:
    try:
        data = ingredient_config["data"]
        return Datalist.load(data["datalist"], data.get("data_root"))
    except (BratsUgripError, KeyError, TypeError):
        return None


class SoupSession:
    """Held-out sets, a network to score state dicts with, and evaluation counts, for one folder of ingredients.

    Args:
        ingredients: the checked ingredients.
        args: the options of :func:`soup_parser`.

    Attributes:
        on_evaluation: called after every evaluation (e.g. to advance a progress bar).
    """

    def __init__(self, ingredients: Ingredients, args: argparse.Namespace):
        self.ingredients = ingredients
        self.reference = ingredients[0]
        self.settings = _settings(ingredients)
        if args.sw_batch_size:
            self.settings = replace(self.settings, sw_batch_size=args.sw_batch_size)
        self.datalist, self.fold = self._selection_datalist(args)
        self.cache_dir = args.cache_dir or default_cache_dir(self.reference.meta)
        self.device = torch.device(args.device)
        self.notes: list[str] = []
        self.evaluations: Counter[str] = Counter()
        self.on_evaluation: Callable[[], None] | None = None
        # The scheme the networks were trained with (what their channels mean), as validation used it.
        self.scheme = (self.reference.config.get("data") or {}).get("scheme") or self.datalist.label_scheme
        self.selection = HeldOutSet.from_fold(self.datalist, self.fold, scheme=self.scheme, cache_dir=self.cache_dir,
                                              device=self.device)
        self.fingerprint = self.selection.fingerprint(self.settings)
        test_cases = self._test_cases(args)
        self.test = HeldOutSet(test_cases, self.scheme, self.cache_dir, self.device) if test_cases else None
        self.test_description = self._describe_test(args) if test_cases else ""
        self.model = build_model(self.reference.meta).to(self.device)
        self.recalibrate = self._recalibration(args) if args.recalibrate_bn else None
        if ingredients.running_stats_keys and not args.recalibrate_bn:
            warnings.warn("the ingredients have BatchNorm running statistics; the soup's are the mean of theirs, "
                          "which rarely fits the averaged weights: pass --recalibrate-bn", SoupWarning, stacklevel=2)

    # --- data ---------------------------------------------------------------------------------------------

    def _selection_datalist(self, args: argparse.Namespace) -> tuple[Datalist, int]:
        data = self.reference.config.get("data") or {}
        path = args.datalist or data.get("datalist")
        if not path:
            raise DataError(f"{self.reference.path}: its metadata names no datalist; pass --datalist")
        root = args.data_root or (None if args.datalist else data.get("data_root"))
        datalist = Datalist.load(path, root)
        fold = args.fold
        if fold is None:
            folds = sorted({str(ingredient.meta.get("fold")) for ingredient in self.ingredients})
            if len(folds) != 1 or folds[0] == "None":
                raise DataError(f"the ingredients were validated on folds {', '.join(folds)}; choose the selection "
                                "fold with --fold")
            fold = int(folds[0])
        return datalist, fold

    def _test_cases(self, args: argparse.Namespace) -> list[Case]:
        if args.test_fold is None and args.test_datalist is None:
            return []
        source = Datalist.load(args.test_datalist) if args.test_datalist else self.datalist
        cases = source.fold_cases(args.test_fold) if args.test_fold is not None else [
            case for case in source.training if case.label is not None]
        shared = sorted({c.case_id for c in cases} & set(self.selection.case_ids))
        if shared:
            raise DataError(f"{len(shared)} test case(s) are also selection cases (e.g. {shared[0]}); test cases must "
                            "be cases the selection never sees")
        seen = self._seen_in_training({c.case_id for c in cases})
        if seen:
            self.notes.append(f"{len(seen)} of the {len(cases)} test cases were in an ingredient's training data "
                              f"(e.g. {sorted(seen)[0]}): the test scores are optimistic for every model alike.")
        return cases

    def _seen_in_training(self, case_ids: set[str]) -> set[str]:
        """Test cases some ingredient may have trained on: in its datalist's training split, or the source of a
        training case derived from them (synthetic data)."""
        seen: set[str] = set()
        for ingredient in self.ingredients:
            datalist = _ingredient_datalist(ingredient.config)
            if datalist is None or ingredient.meta.get("fold") not in datalist.folds:
                continue
            for case in datalist.split(ingredient.meta["fold"])[0]:
                seen |= {case.case_id, str(case.extra.get("source_case"))} & case_ids
        return seen

    def _describe_test(self, args: argparse.Namespace) -> str:
        name = Path(args.test_datalist).name if args.test_datalist else Path(self.datalist.path or "datalist").name
        where = f"fold {args.test_fold} of {name}" if args.test_fold is not None else f"the labelled cases of {name}"
        return f"{where}, {len(self.test)} cases"

    @property
    def selection_description(self) -> str:
        return f"fold {self.fold} of {Path(self.datalist.path or 'datalist').name}, {len(self.selection)} cases"

    def _recalibration(self, args: argparse.Namespace) -> Callable[[torch.nn.Module], None] | None:
        if not self.ingredients.running_stats_keys:
            self.notes.append("--recalibrate-bn: the network has no BatchNorm running statistics; nothing to do.")
            return None
        config = config_from_dict(self.reference.config)
        train_cases = self.datalist.split(self.fold)[0]
        dataset = TrainDataset(train_cases, self.scheme, config.data.roi_size, CaseCache(self.cache_dir),
                               augment=False)

        def recalibrate(model: torch.nn.Module) -> None:
            loader = DataLoader(dataset, batch_size=config.data.batch_size, shuffle=False)
            with torch.random.fork_rng():
                torch.manual_seed(0)  # the same patches for every soup: scores stay comparable
                recalibrate_batchnorm(model, (training_batch(batch)["image"]
                                              for batch, _ in zip(loader, range(args.bn_batches))))

        self.notes.append(f"BatchNorm statistics of every soup recomputed on {args.bn_batches} training batches.")
        return recalibrate

    # --- scoring ------------------------------------------------------------------------------------------

    def prepare(self, state: StateDict) -> StateDict:
        """A soup's weights ready to use: with BatchNorm statistics recomputed when ``--recalibrate-bn``."""
        if self.recalibrate is None:
            return state
        self.model.load_state_dict(state)
        self.recalibrate(self.model)
        return {key: value.detach().cpu().clone() for key, value in self.model.state_dict().items()}

    def score(self, state: StateDict, on: str = "selection", with_hd95: bool = False) -> HeldOutScore:
        """Score ``state`` on the selection or the test cases (one evaluation)."""
        heldout = self.selection if on == "selection" else self.test
        assert heldout is not None, "no test cases"
        self.model.load_state_dict(state)
        result = heldout.score(self.model, self.settings, with_hd95)
        self.evaluations[on] += 1
        if self.on_evaluation is not None:
            self.on_evaluation()
        return result

    def stored_scores(self, rescore: bool = False) -> list[Scores | None]:
        """Each ingredient's score from its checkpoint when measured on these cases with these settings."""
        found = [None if rescore else stored_score(i.meta, self.fingerprint) for i in self.ingredients]
        return [Scores(dice, source="metadata") if dice else None for dice in found]

    def ingredient_scores(self, stored: Sequence[Scores | None]) -> list[Scores]:
        """Every ingredient's selection score: the stored one, else evaluated (one evaluation each)."""
        return [found or Scores.of(self.score(ingredient.state_dict()))
                for ingredient, found in zip(self.ingredients, stored)]

    def compare(self, models: Sequence[tuple[str, Callable[[], StateDict], Scores]], with_hd95: bool) -> list[ScoreTable]:
        """The report's tables for ``models`` given as ``(label, load weights, selection scores)``.

        With test cases, each model is scored on them (Dice and, with ``with_hd95``, HD95); models given the same
        ``load`` function share one evaluation. Without, the selection table gains HD95 by scoring again on the
        selection cases the models whose scores lack it (report-only evaluations)."""
        rows = []
        for label, load, scores in models:
            if with_hd95 and self.test is None and scores.hd95 is None:
                scores = Scores.of(self.score(load(), "selection", with_hd95=True))
            rows.append(scores.row(label))
        tables = [ScoreTable("selection", self.selection_description, len(self.selection), rows)]
        if self.test is not None:
            tested: dict[int, Scores] = {}
            for label, load, _ in models:
                if id(load) not in tested:
                    tested[id(load)] = Scores.of(self.score(load(), "test", with_hd95))
            tables.append(ScoreTable("test", self.test_description, len(self.test),
                                     [tested[id(load)].row(label) for label, load, _ in models]))
        return tables

    def report_evaluations(self, models: Sequence[tuple[str, Callable[[], StateDict], Scores]], with_hd95: bool) -> int:
        """How many evaluations :meth:`compare` will run (for a progress bar's total)."""
        if self.test is not None:
            return len({id(load) for _, load, _ in models})
        return sum(with_hd95 and scores.hd95 is None for _, _, scores in models)

    def selection_meta(self) -> dict[str, Any]:
        return {"datalist": str(self.datalist.path), "fold": self.fold, "cases": len(self.selection),
                "fingerprint": self.fingerprint, "evaluations": dict(self.evaluations)}


def soup_meta(ingredients: Ingredients, method: str, reference: int, kept: Sequence[int],
              scores: Sequence[Scores | None] | None = None, soup_score: Scores | None = None,
              session: SoupSession | None = None, **extra: Any) -> dict[str, Any]:
    """Metadata of a soup checkpoint: the reference ingredient's architecture and config, the ingredients (with their
    scores and whether they are in the soup), and, when scored, the soup's selection score as ``val_metrics`` with
    the selection set's fingerprint (so later tools reuse it) and ``extra`` under ``soup``."""
    scores = scores or [None] * len(ingredients)
    meta = {key: ingredients[reference].meta[key] for key in SOUP_META_KEYS if key in ingredients[reference].meta}
    averaged = all(i.meta.get("weights") == "averaged" for i in ingredients)
    listed = [{"name": i.name, "path": str(i.path.resolve()), "init_id": i.meta.get("init_id"),
               "score": scores[n].dice if scores[n] else None, "score_source": scores[n].source if scores[n] else None,
               "kept": n in kept} for n, i in enumerate(ingredients)]
    soup = {"method": method, "ingredients": listed, "kept": len(kept),
            "score": soup_score.dice if soup_score else None,
            "selection": session.selection_meta() if session else None, **extra}
    meta.update(weights="averaged" if averaged else "current", git_commit=git_commit(), soup=soup)
    if soup_score is not None and session is not None:
        meta.update(val_metrics=dict(soup_score.dice), val_fingerprint=session.fingerprint)
    return meta
