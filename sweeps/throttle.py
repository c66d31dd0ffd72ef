"""A sweep-wide cap on runs in flight: the grid key ``max_running``.

``executor.array_parallelism`` caps one job array (SLURM's ``%N``); a grid whose ``executor.*`` values differ makes
several arrays, each with that cap. ``max_running: N`` caps the whole sweep, whatever its arrays: at most ``N`` of
its runs are queued or running at once (states :meth:`RunState.active`). The launcher submits the first runs of
the grid up to the cap; the rest stay PENDING in ``sweep.db``, and the monitor submits them, in grid order, as runs
end (each poll, under its lock). Retries and resumptions of runs already submitted are not held back: they take
the place their own run had.

The cap is a row of ``sweep.db``'s ``meta`` table, so a monitor restarted anywhere applies the same cap.
"""
from __future__ import annotations

from brats_ugrip.errors import ConfigError
from brats_ugrip.sweeps.state import RunRecord, RunState, SweepState

META_KEY = "max_running"


def check_cap(value: object, key_path: str = "max_running") -> int | None:
    """The grid's ``max_running`` (None: no cap); an error names the key when it is not a positive integer."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key_path, f"expected a positive integer (runs of the sweep queued or running at once), "
                          f"got {value!r}")
    return value


def set_cap(state: SweepState, cap: int | None) -> None:
    """Record the sweep's cap (None removes it: a grid relaunched without the key lifts it)."""
    state.set_meta(META_KEY, "" if cap is None else str(cap))


def get_cap(state: SweepState) -> int | None:
    value = state.get_meta(META_KEY)
    return int(value) if value else None


def free_slots(state: SweepState, cap: int | None = None) -> int | None:
    """How many more runs may be submitted now (None: no cap)."""
    cap = get_cap(state) if cap is None else cap
    if cap is None:
        return None
    return max(0, cap - sum(state.counts().get(s, 0) for s in RunState.active()))


def runs_to_release(state: SweepState) -> list[RunRecord]:
    """PENDING runs (never accepted by a scheduler) to submit now, in grid order; empty without a cap."""
    slots = free_slots(state)
    if not slots:
        return []
    return state.runs([RunState.PENDING])[:slots]
