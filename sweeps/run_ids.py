"""Readable, stable run ids from the values a sweep varies, and the short key names the monitor shows.

``run_ids([{"optim.lr": 0.001, "data.fold": 0}])`` → ``["fold=0-lr=0.001"]``: keys by their last dotted part
(the whole key where two share it), values as :func:`format_value` writes them, sorted by name, so the same
values give the same id whatever the grid's order.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

MAX_RUN_ID_LENGTH = 150
MAX_TAG_LENGTH = 64  # W&B's limit for a tag
UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._+]+")
"""What a run id may not contain (ids are folder names and SLURM job names)."""

def short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key's last part, or the whole key where two keys share their last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def format_value(value: Any, path_like_as_stem: bool = True) -> str:
    """A value as it appears in a run id: ``0.0027``, ``true``, ``mednext_b``, ``64x64x64``, a path's stem."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        parts = [format_value(v, path_like_as_stem) for v in value]
        return ("x" if all(isinstance(v, int) and not isinstance(v, bool) for v in value) else "+").join(parts)
    if isinstance(value, dict):
        return "+".join(f"{k}.{format_value(v, path_like_as_stem)}" for k, v in sorted(value.items()))
    text = str(value)
    if path_like_as_stem and "/" in text:
        text = Path(text).name.split(".")[0] or text
    return UNSAFE_CHARACTERS.sub("_", text).strip("_") or "_"


def run_ids(combos: list[dict[str, Any]]) -> list[str]:
    """Readable, stable ids for combinations of varied values (same values → same id, whatever the order)."""
    if not combos:
        return []
    keys = list(combos[0])
    if not keys:
        return ["run"] * len(combos)
    names = short_keys(keys)
    formatted: dict[str, list[str]] = {}
    for key in keys:
        # Paths shown by their stem unless two different paths share a stem: then the whole (sanitised) path.
        values = [c[key] for c in combos]
        texts = [format_value(v) for v in values]
        distinct = {json.dumps(v, sort_keys=True, default=str) for v in values}
        if len(set(texts)) < len(distinct):
            texts = [format_value(v, path_like_as_stem=False) for v in values]
        formatted[key] = texts
    ordered = sorted(keys, key=lambda k: names[k])
    ids = []
    for i in range(len(combos)):
        run_id = "-".join(f"{names[k]}={formatted[k][i]}" for k in ordered)
        if len(run_id) > MAX_RUN_ID_LENGTH:
            run_id = f"{run_id[:MAX_RUN_ID_LENGTH - 9]}-{hashlib.sha1(run_id.encode()).hexdigest()[:8]}"
        ids.append(run_id)
    return ids


def param_tags(params: dict[str, Any]) -> list[str]:
    """The varied values as W&B tags, ``key=value`` with the whole dotted key (``optim.lr=0.001``), values as in
    run ids; a tag longer than W&B's 64 characters keeps its start and gets a hash of the whole."""
    tags = []
    for key, value in params.items():
        tag = f"{key}={format_value(value)}"
        if len(tag) > MAX_TAG_LENGTH:
            tag = f"{tag[:MAX_TAG_LENGTH - 9]}-{hashlib.sha1(tag.encode()).hexdigest()[:8]}"
        tags.append(tag)
    return tags
