"""Which cases a checkpoint has seen, recorded inside it, and the guard that keeps them out of test scores.

A checkpoint written by training records, in its metadata, the ids of the cases its run trained and validated on,
and those its initialisation had seen (a fine-tuned run inherits its base's)::

    cases: {"train": [ids], "val": [ids], "init": [ids]}

``train`` includes the ``source_case`` of derived training cases (a synthetic case made from a real one counts as
that one). A soup records the union of its ingredients' cases, so it can be checked in turn. The record travels
with the checkpoint: moving or deleting the datalist does not change what the check sees.

:func:`check_test_cases` refuses test cases that any checkpoint has seen (naming the case and the checkpoint),
unless the caller allows them; then it returns the line that every report must start with. A checkpoint without a
record (written before this existed) is checked against the datalist its config names, when that file can still
be read; when it cannot, the check cannot be made and is refused the same way. Plain data only: no torch.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from brats_ugrip.data import Case, Datalist
from brats_ugrip.errors import BratsUgripError, DataError

CASES_KEY = "cases"
ALLOW_FLAG = "--allow-seen-test-cases"


def case_record(train: Iterable[Case], val: Iterable[Case], init: Iterable[str] = ()) -> dict[str, list[str]]:
    """The ``cases`` metadata of a run: ids of its training cases (with their ``source_case``), its validation
    cases, and the cases its initialisation had seen."""
    trained = set()
    for case in train:
        trained.add(case.case_id)
        if case.extra.get("source_case"):
            trained.add(str(case.extra["source_case"]))
    return {"train": sorted(trained), "val": sorted({c.case_id for c in val}), "init": sorted(set(init))}


def recorded_cases(meta: dict[str, Any]) -> set[str] | None:
    """Every case id a checkpoint's metadata records as seen (trained, validated, or seen by its init), or None
    when it records none."""
    record = meta.get(CASES_KEY)
    if not isinstance(record, dict):
        return None
    return {str(i) for part in ("train", "val", "init") for i in record.get(part) or ()}


def _legacy_seen(meta: dict[str, Any]) -> set[str] | None:
    """Cases seen by a checkpoint written before records existed: its run's training and validation folds, read
    from the datalist its config names; None when that datalist (or the fold) cannot be read any more."""
    data = (meta.get("config") or {}).get("data") or {}
    try:
        datalist = Datalist.load(data["datalist"], data.get("data_root"))
        train, val = datalist.split(meta["fold"])
    except (BratsUgripError, KeyError, TypeError):
        return None
    return {i for c in train + val for i in (c.case_id, c.extra.get("source_case")) if i}


def seen_cases(meta: dict[str, Any]) -> set[str] | None:
    """The cases a checkpoint has seen: its record, else (old checkpoints) its datalist's folds, else None."""
    recorded = recorded_cases(meta)
    return recorded if recorded is not None else _legacy_seen(meta)


def union_record(metas: Iterable[dict[str, Any]]) -> dict[str, list[str]] | None:
    """The ``cases`` record of a model made from several checkpoints (a soup): the union of theirs; None when
    one of them has none that can be known."""
    seen: set[str] = set()
    for meta in metas:
        cases = seen_cases(meta)
        if cases is None:
            return None
        seen |= cases
    return {"train": [], "val": [], "init": sorted(seen)}


def check_test_cases(test_ids: Sequence[str], checkpoints: Sequence[tuple[str, dict[str, Any]]],
                     allow_seen: bool = False) -> str | None:
    """Refuse test cases a checkpoint has seen.

    Args:
        test_ids: the test cases' ids.
        checkpoints: ``(name, metadata)`` of every model scored on them.
        allow_seen: score them anyway; the returned line says so.

    Returns:
        None when every test case is unseen; with ``allow_seen``, the warning line a report must start with.

    Raises:
        DataError: naming the first seen case and the checkpoint that saw it (or the checkpoint whose cases
            cannot be known), when not ``allow_seen``.
    """
    wanted = set(test_ids)
    seen: dict[str, str] = {}
    unknown: list[str] = []
    for name, meta in checkpoints:
        cases = seen_cases(meta)
        if cases is None:
            unknown.append(name)
            continue
        for case_id in sorted(cases & wanted):
            seen.setdefault(case_id, name)
    if not seen and not unknown:
        return None
    if seen:
        first = sorted(seen)[0]
        problem = (f"{len(seen)} of the {len(wanted)} test cases were in a model's training or validation data "
                   f"(e.g. {first}, seen by {seen[first]})")
    else:
        problem = (f"{unknown[0]} records no training or validation cases and its datalist cannot be read, so the "
                   f"{len(wanted)} test cases cannot be checked against it")
    if not allow_seen:
        raise DataError(f"{problem}; test scores must come from cases no model trained, validated or was selected "
                        f"on. Use the datalist's test split, or pass {ALLOW_FLAG} to score them anyway (the report "
                        "will say so)")
    return f"NOT A TEST SCORE ({ALLOW_FLAG}): {problem}; the 'test' scores below are optimistic."
