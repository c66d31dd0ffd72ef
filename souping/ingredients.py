"""A folder of checkpoints as soup ingredients, checked before anything is averaged.

Checks, each an error (:class:`~brats_ugrip.errors.CheckpointError` naming the files) or a :class:`SoupWarning`:

* an empty folder, or one whose checkpoints are all unreadable: error;
* a corrupt or unreadable checkpoint, or one with NaN or infinite weights (a diverged run, refused by
  :func:`~brats_ugrip.checkpoints.load_checkpoint`): skipped with a warning naming it, the soup goes on with the
  others (one NaN ingredient would make the whole soup NaN);
* a schedule-free run (``optim.name: adamw_sf``) whose checkpoint does not hold the averaged (eval-mode) weights:
  error — averaging the train-mode ``y`` iterates gives a worse model than any ingredient;
* different label schemes or input channels: error;
* different architectures or tensor shapes: error naming the first mismatching key;
* different initialisations: warning (souping runs from different random starts usually fails). Told by the
  ``init_id`` in the metadata; for checkpoints without one, by weight-space distance to the first ingredient: the
  cosine similarity of the convolution weights is near 1 for fine-tunes of one start, near 0 for independent ones;
* running statistics (BatchNorm): reported, so the soup can recompute them (``--recalibrate-bn``).

State dicts are read with :func:`~brats_ugrip.checkpoints.model_state_dict`, which strips Lightning's ``model.``
and ``torch.compile``'s ``_orig_mod.`` prefixes exactly.
"""
from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brats_ugrip.checkpoints import checkpoint_meta, load_checkpoint, model_state_dict
from brats_ugrip.errors import CheckpointError
from brats_ugrip.souping.soups import StateDict

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
SAME_INIT_COSINE = 0.5
"""Below this cosine similarity of convolution weights, two checkpoints are taken to start from different inits."""


class SoupWarning(UserWarning):
    """Something about the ingredients that may spoil the soup, but does not stop it."""


@dataclass
class Ingredient:
    """A readable, checked checkpoint; its weights are read from disk when needed (:meth:`state_dict`)."""

    path: Path
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> dict[str, Any]:
        return self.meta.get("config") or {}

    def state_dict(self) -> StateDict:
        return model_state_dict(load_checkpoint(self.path))


@dataclass
class Ingredients:
    """The checked ingredients of a folder, in file-name order.

    Attributes:
        items: the readable ingredients (at least one).
        skipped: ``(path, reason)`` of the unreadable checkpoints.
        running_stats_keys: keys of running statistics (BatchNorm) in the weights; empty for GroupNorm models.
    """

    directory: Path
    items: list[Ingredient]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    running_stats_keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Ingredient:
        return self.items[index]

    def __iter__(self) -> Iterator[Ingredient]:
        return iter(self.items)


def find_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint files (``*.ckpt``, ``*.pt``, ``*.pth``) directly in ``directory``, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; pass the folder holding the checkpoints to soup")
    paths = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if not paths:
        raise CheckpointError(f"{directory}: no checkpoints ({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}); "
                              "collect the runs' checkpoints into one folder (e.g. SWEEP_DIR/models)")
    return paths


def input_channels(state: StateDict) -> int | None:
    """Input channels of the first 3-D convolution (the network's stem), or None if there is none."""
    return next((int(t.shape[1]) for t in state.values() if t.ndim == 5), None)


def weight_cosine(a: StateDict, b: StateDict) -> float:
    """Cosine similarity of the convolution/linear weights (floating tensors of ≥ 2 dims) of two state dicts.

    Normalisation weights start at 1 in every initialisation, so they are left out."""
    dot = norm_a = norm_b = 0.0
    for key, x in a.items():
        if x.is_floating_point() and x.ndim >= 2:
            x, y = x.double().flatten(), b[key].double().flatten()
            dot += float(x @ y)
            norm_a += float(x @ x)
            norm_b += float(y @ y)
    return dot / math.sqrt(norm_a * norm_b) if norm_a and norm_b else 1.0


def check_averaged_weights(path: Path, meta: dict[str, Any]) -> None:
    """Refuse the train-mode weights of a schedule-free run."""
    optimizer = ((meta.get("config") or {}).get("optim") or {}).get("name")
    if optimizer == "adamw_sf" and meta.get("weights") != "averaged":
        raise CheckpointError(
            f"{path}: a schedule-free (adamw_sf) run's checkpoint holding {meta.get('weights', 'unmarked')!r} weights, "
            "not the averaged (eval-mode) ones; a soup of train-mode iterates is worse than its ingredients. Use "
            "checkpoints written by brats_ugrip training, which always stores the averaged weights")


def _scheme(meta: dict[str, Any]) -> str | None:
    return ((meta.get("config") or {}).get("data") or {}).get("scheme")


def check_compatible(reference: Ingredient, ref_state: StateDict, other: Ingredient, state: StateDict) -> None:
    """Errors when ``other`` cannot be averaged with ``reference``: label scheme, input channels, architecture,
    then keys and shapes (naming the first key that differs)."""
    ref_scheme, scheme = _scheme(reference.meta), _scheme(other.meta)
    if ref_scheme and scheme and ref_scheme != scheme:
        raise CheckpointError(f"{other.path}: trained with label scheme {scheme!r}, but {reference.path} with "
                              f"{ref_scheme!r}; their output channels mean different things, soup one scheme at a time")
    ref_channels, channels = input_channels(ref_state), input_channels(state)
    if ref_channels != channels:
        raise CheckpointError(f"{other.path}: takes {channels} input channels, {reference.path} takes {ref_channels}; "
                              "soup models trained on the same modalities")
    ref_model, model = reference.meta["model"]["name"], other.meta["model"]["name"]
    if ref_model != model:
        raise CheckpointError(f"{other.path}: is a {model}, {reference.path} a {ref_model}; soup one architecture")
    for key, tensor in ref_state.items():
        if key not in state:
            raise CheckpointError(f"{other.path}: has no tensor {key!r} (present in {reference.path}); "
                                  "the architectures differ")
        if state[key].shape != tensor.shape:
            raise CheckpointError(f"{other.path}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                                  f"{tuple(tensor.shape)} in {reference.path}; the architectures differ")
    extra = next((key for key in state if key not in ref_state), None)
    if extra is not None:
        raise CheckpointError(f"{other.path}: has a tensor {extra!r} that {reference.path} lacks; "
                              "the architectures differ")


def _warn_initialisations(items: list[Ingredient], cosines: dict[str, float]) -> None:
    ids = Counter(item.meta["init_id"] for item in items if item.meta.get("init_id"))
    if len(ids) > 1:
        groups = "; ".join(f"{init_id}: {count} checkpoint(s)" for init_id, count in ids.most_common())
        warnings.warn(f"the ingredients start from {len(ids)} different initialisations ({groups}); souping models "
                      "trained from different random starts usually fails — soup runs fine-tuned from one checkpoint",
                      SoupWarning, stacklevel=3)
    far = {name: c for name, c in cosines.items() if c < SAME_INIT_COSINE}
    if far:
        listed = ", ".join(f"{name} ({c:.2f})" for name, c in far.items())
        warnings.warn(f"{listed}: no init_id in the metadata, and the weights are far from {items[0].name}'s (cosine "
                      f"similarity < {SAME_INIT_COSINE}); they look trained from a different random start, which "
                      "usually spoils a soup", SoupWarning, stacklevel=3)


def load_ingredients(directory: str | os.PathLike[str]) -> Ingredients:
    """Read and check every checkpoint of ``directory`` (see the module docstring). The first readable one is the
    reference the others are checked against; weights are not kept in memory (re-read when souping)."""
    paths = find_checkpoints(directory)
    items: list[Ingredient] = []
    skipped: list[tuple[Path, str]] = []
    cosines: dict[str, float] = {}
    ref_state: StateDict = {}
    for path in paths:
        try:
            checkpoint = load_checkpoint(path)
            meta = checkpoint_meta(checkpoint, path)
            state = model_state_dict(checkpoint)
        except CheckpointError as error:
            warnings.warn(f"skipping {path}: {error}", SoupWarning, stacklevel=2)
            skipped.append((path, str(error)))
            continue
        del checkpoint
        ingredient = Ingredient(path, meta)
        check_averaged_weights(path, meta)
        if not items:
            ref_state = state
        else:
            check_compatible(items[0], ref_state, ingredient, state)
            if not meta.get("init_id") or not items[0].meta.get("init_id"):
                cosines[ingredient.name] = weight_cosine(ref_state, state)
        items.append(ingredient)
    if not items:
        raise CheckpointError(f"{directory}: none of the {len(paths)} checkpoints could be read (see the warnings)")
    _warn_initialisations(items, cosines)
    running = [key for key in ref_state if key.endswith(("running_mean", "running_var"))]
    return Ingredients(Path(directory), items, skipped, running)


def shared_base_note(ingredients: Ingredients) -> str:
    """One line saying which initialisation (and fine-tuning base) the ingredients share, for the soup report."""
    ids = Counter(str(item.meta.get("init_id") or "unrecorded") for item in ingredients)
    bases = sorted({str((item.config.get("finetune") or {}).get("init_from")) for item in ingredients
                    if (item.config.get("finetune") or {}).get("init_from")})
    fine_tuned = f", fine-tuned from {', '.join(Path(b).name if len(bases) > 1 else b for b in bases)}" if bases else ""
    if len(ids) == 1:
        (init_id, _), = ids.items()
        return f"All {len(ingredients)} ingredients share the initialisation {init_id}{fine_tuned}."
    groups = "; ".join(f"{init_id}: {count}" for init_id, count in ids.most_common())
    return f"The ingredients start from {len(ids)} different initialisations ({groups}){fine_tuned}."
