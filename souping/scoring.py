"""What the soup commands share: the held-out cases, scoring ingredients and soups, and the soup's metadata.

A :class:`SoupSession` holds the selection cases (by default the fold the ingredients were validated on, from
their metadata) and the test cases (by default the datalist's test split, when it has one; see
:class:`~brats_ugrip.souping.soup_cli.SoupData`), each loaded once as a :class:`~brats_ugrip.heldout.HeldOutSet`,
one network of the ingredients' architecture into which every state dict is loaded for scoring, and the count of
evaluations per set. Test cases an ingredient trained or validated on are refused, by the case ids each checkpoint
records (:func:`brats_ugrip.seen_cases.check_test_cases`), unless ``allow_seen_test_cases``.
"""
from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from brats_ugrip.case_policy import choose_test_cases
from brats_ugrip.checkpoints import build_model, git_commit
from brats_ugrip.config import InferenceConfig, config_from_dict
from brats_ugrip.data import Case, Datalist
from brats_ugrip.errors import CheckpointError, ConfigError, DataError
from brats_ugrip.heldout import FINGERPRINT_SETTINGS, HeldOutScore, HeldOutSet, checkpoint_settings, stored_score
from brats_ugrip.loaders import TrainDataset, training_batch
from brats_ugrip.preprocess import CaseCache
from brats_ugrip.seen_cases import union_record
from brats_ugrip.souping.ingredients import Ingredients, SoupWarning
from brats_ugrip.souping.report import ReportRow, ScoreTable
from brats_ugrip.souping.soup_cli import SoupData
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
    per_case: dict[str, dict[str, float]] | None = None
    """``{case_id: {dice_TC, ..., hd95_ET}}`` when evaluated here (a comparison needs the cases, not the means)."""

    @classmethod
    def of(cls, score: HeldOutScore) -> Scores:
        return cls(score.dice, score.hd95, per_case=dict(zip(score.case_ids, score.per_case)))

    def row(self, model: str) -> ReportRow:
        return ReportRow(model, self.dice, self.hd95, self.per_case)


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
    """Where the run cached its preprocessed cases, if that folder exists: the folder training recorded in the
    checkpoint (``case_cache``), else the one rule applied to its config (checkpoints written before the record)."""
    from brats_ugrip.preprocess import case_cache_dir  # the one rule for where a run's cache lives

    config = meta.get("config") or {}
    recorded = meta.get("case_cache")
    candidate = Path(recorded) if recorded else case_cache_dir(((config.get("data") or {}).get("cache_dir")),
                                                              config.get("run_dir"))
    return str(candidate) if candidate is not None and candidate.is_dir() else None


class SoupSession:
    """Held-out sets, a network to score state dicts with, and evaluation counts, for one folder of ingredients.

    Args:
        ingredients: the checked ingredients.
        data: where selection and test cases come from, and how they are scored.

    Attributes:
        on_evaluation: called after every evaluation (e.g. to advance a progress bar).
    """

    def __init__(self, ingredients: Ingredients, data: SoupData = SoupData()):
        self.ingredients = ingredients
        self.reference = ingredients[0]
        self.settings = _settings(ingredients)
        if data.sw_batch_size:
            self.settings = replace(self.settings, sw_batch_size=data.sw_batch_size)
        self.datalist, self.fold = self._selection_datalist(data)
        self.cache_dir = data.cache_dir or default_cache_dir(self.reference.meta)
        self.device = torch.device(data.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.notes: list[str] = []
        self.seen_notice: str | None = None
        self.evaluations: Counter[str] = Counter()
        self.on_evaluation: Callable[[], None] | None = None
        # The scheme the networks were trained with (what their channels mean), as validation used it.
        self.scheme = (self.reference.config.get("data") or {}).get("scheme") or self.datalist.label_scheme
        self.selection = HeldOutSet.from_fold(self.datalist, self.fold, scheme=self.scheme, cache_dir=self.cache_dir,
                                              device=self.device)
        self.fingerprint = self.selection.fingerprint(self.settings)
        test_cases, self.test_description = self._test_cases(data)
        self.test = HeldOutSet(test_cases, self.scheme, self.cache_dir, self.device) if test_cases else None
        self.model = build_model(self.reference.meta).to(self.device)
        self.recalibrate = self._recalibration(data.bn_batches) if data.recalibrate_bn else None
        if ingredients.running_stats_keys and not data.recalibrate_bn:
            warnings.warn("the ingredients have BatchNorm running statistics; the soup's are the mean of theirs, "
                          "which rarely fits the averaged weights: pass --recalibrate-bn", SoupWarning, stacklevel=2)

    # --- data ---------------------------------------------------------------------------------------------

    def _selection_datalist(self, data: SoupData) -> tuple[Datalist, int]:
        trained = self.reference.config.get("data") or {}
        path = data.datalist or trained.get("datalist")
        if not path:
            raise DataError(f"{self.reference.path}: its metadata names no datalist; pass --datalist")
        root = data.data_root or (None if data.datalist else trained.get("data_root"))
        datalist = Datalist.load(path, root)
        fold = data.fold
        if fold is None:
            folds = sorted({str(ingredient.meta.get("fold")) for ingredient in self.ingredients})
            if len(folds) != 1 or folds[0] == "None":
                raise DataError(f"the ingredients were validated on folds {', '.join(folds)}; choose the selection "
                                "fold with --fold")
            fold = int(folds[0])
        return datalist, fold

    def _test_cases(self, data: SoupData) -> tuple[list[Case], str]:
        """The test cases and their description (the one policy: :func:`brats_ugrip.case_policy.choose_test_cases`)."""
        chosen = choose_test_cases(self.datalist, self.fold, [(i.name, i.meta) for i in self.ingredients],
                                   test_fold=data.test_fold, test_split=data.test_split,
                                   test_datalist=data.test_datalist, allow_seen=data.allow_seen_test_cases)
        self.seen_notice = chosen.notice
        return chosen.cases, chosen.description

    @property
    def selection_description(self) -> str:
        return f"fold {self.fold} of {Path(self.datalist.path or 'datalist').name}, {len(self.selection)} cases"

    def _recalibration(self, bn_batches: int) -> Callable[[torch.nn.Module], None] | None:
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
                                              for batch, _ in zip(loader, range(bn_batches))))

        self.notes.append(f"BatchNorm statistics of every soup recomputed on {bn_batches} training batches.")
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
                                     [tested[id(load)].row(label) for label, load, _ in models], self.seen_notice))
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
    cases = union_record(i.meta for i in ingredients)  # so the soup, used as a model in turn, can be checked too
    if cases is not None:
        meta["cases"] = cases
    if soup_score is not None and session is not None:
        meta.update(val_metrics=dict(soup_score.dice), val_fingerprint=session.fingerprint)
    return meta
