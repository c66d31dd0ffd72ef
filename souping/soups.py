"""Weight soups (Wortsman et al., *Model soups*, ICML 2022): the uniform soup and the greedy soup (Recipe 1).

Both average weights of networks fine-tuned from one initialisation. Floating tensors are averaged in float64
and cast back to their dtype; integer tensors (e.g. BatchNorm's ``num_batches_tracked``) are not averaged: the
soup keeps the first ingredient's. Ingredients are streamed: whatever their number, the soup holds the running
sum (float64, twice a float32 state dict) and one ingredient, never all of them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


class RunningSum:
    """The sum of the state dicts added so far (floating tensors in float64), and their mean."""

    def __init__(self) -> None:
        self.total: StateDict = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.count = 0

    def add(self, state: StateDict) -> None:
        if not self.count:
            self.dtypes = {key: value.dtype for key, value in state.items()}
            self.total = {key: value.to(torch.float64, copy=True) if value.is_floating_point() else value.clone()
                          for key, value in state.items()}
        else:
            for key, value in self.total.items():
                if value.is_floating_point():
                    value.add_(state[key])
        self.count += 1

    def mean(self, extra: StateDict | None = None) -> StateDict:
        """The mean of the added state dicts — with ``extra`` counted too, without adding it — in their dtypes."""
        count = self.count + (extra is not None)
        result: StateDict = {}
        for key, value in self.total.items():
            if value.is_floating_point():
                value = value + extra[key] if extra is not None else value
                result[key] = (value / count).to(self.dtypes[key])
            else:
                result[key] = value.clone()
        return result

    def pop_mean(self) -> StateDict:
        """The mean, freeing the sum tensor by tensor (so the result and the sum are never both whole)."""
        result: StateDict = {}
        for key in list(self.total):
            value = self.total.pop(key)
            result[key] = (value / self.count).to(self.dtypes[key]) if value.is_floating_point() else value
        self.count = 0
        return result


def uniform_soup(states: Iterable[StateDict]) -> StateDict:
    """The element-wise mean of the state dicts, streamed: pass a generator that loads one ingredient at a time."""
    soup = RunningSum()
    for state in states:
        soup.add(state)
        del state  # free this ingredient before the next one is loaded
    if not soup.count:
        raise ValueError("a soup needs at least one ingredient")
    return soup.pop_mean()


@dataclass
class GreedyStep:
    """One ingredient tried by the greedy soup.

    Attributes:
        index: the ingredient's position in the input.
        ingredient_score: its own held-out score.
        soup_score: the held-out score of the soup with it added (for the first, the ingredient's own score).
        kept: whether it stayed in the soup.
        soup_size: ingredients in the soup after this step.
    """

    index: int
    ingredient_score: float
    soup_score: float
    kept: bool
    soup_size: int


@dataclass
class GreedySoup:
    """Result of :func:`greedy_soup`: the weights, the steps in ranking order, and the counts."""

    state_dict: StateDict
    steps: list[GreedyStep] = field(default_factory=list)
    evaluations: int = 0

    @property
    def kept(self) -> list[int]:
        """Input positions of the ingredients in the soup, in ranking order."""
        return [step.index for step in self.steps if step.kept]

    @property
    def score(self) -> float:
        """The held-out score of the final soup."""
        return [step for step in self.steps if step.kept][-1].soup_score


def rank(scores: Sequence[float]) -> list[int]:
    """Input positions from the best score to the worst; ties keep the input order."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def greedy_soup(load: Callable[[int], StateDict], scores: Sequence[float], evaluate: Callable[[StateDict], float],
                strict: bool = False, on_step: Callable[[GreedyStep], None] | None = None,
                keep: Callable[[float, float], bool] | None = None) -> GreedySoup:
    """Greedy soup, Recipe 1: start from the best ingredient; try the others from best to worst, keeping each one
    whose addition scores **≥** the current soup (``strict``: **>**).

    The current soup's score is carried over, never re-evaluated: ``evaluate`` runs exactly ``len(scores) - 1``
    times, once per candidate soup, in ranking order.

    Args:
        load: ``load(i)`` returns the state dict of ingredient ``i`` (called once per ingredient).
        scores: each ingredient's own held-out score (higher is better).
        evaluate: the held-out score of a state dict.
        on_step: called after each step (e.g. to advance a progress bar).
        keep: ``keep(candidate score, current score)`` decides instead of the ≥ / > rule (e.g. the
            ``--significant-gain`` rule of :mod:`brats_ugrip.souping.gains`, which looks at the cases).
    """
    if not scores:
        raise ValueError("a soup needs at least one ingredient")
    order = rank(scores)
    soup = RunningSum()
    soup.add(load(order[0]))
    best = float(scores[order[0]])
    result = GreedySoup(state_dict={}, steps=[GreedyStep(order[0], best, best, True, 1)])
    for index in order[1:]:
        ingredient = load(index)
        candidate = float(evaluate(soup.mean(extra=ingredient)))
        result.evaluations += 1
        if keep is not None:
            kept = bool(keep(candidate, best))
        else:
            kept = candidate > best if strict else candidate >= best
        if kept:
            soup.add(ingredient)
            best = candidate
        del ingredient
        result.steps.append(GreedyStep(index, float(scores[index]), candidate, kept, soup.count))
        if on_step is not None:
            on_step(result.steps[-1])
    result.state_dict = soup.pop_mean()
    return result


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics (GroupNorm and InstanceNorm models have none)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute the running statistics of every BatchNorm layer as the plain average over ``batches``
    (``(B, C, *spatial)`` inputs): averaged weights need statistics of their own, not the ingredients' mean.
    Returns the number of batches used; the model is left in eval mode."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average: every batch weighs the same
    device = next(model.parameters()).device
    model.train()
    count = 0
    for batch in batches:
        model(batch.to(device))
        count += 1
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.eval()
    return count
