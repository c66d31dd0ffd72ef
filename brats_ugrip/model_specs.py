"""What each registered network is, as plain data: its name, hyper-parameters with defaults, downsampling
divisor and description, and the config-time checks built on them.

This module imports no torch: config validation (``train --check``, ``launch --dry-run``) and the CLIs use it to
answer at once. ``brats_ugrip.models`` holds the builders, one per name here (a test checks that each builder's
keyword defaults are exactly these).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from brats_ugrip.errors import ConfigError

if TYPE_CHECKING:
    from brats_ugrip.config import RunConfig

IN_CHANNELS = 4
"""Every model takes the four modalities, ordered t1c, t1n, t2f, t2w."""
OUT_CHANNELS = 3
"""Every model returns three region logits, ordered TC, WT, ET."""


@dataclass(frozen=True)
class ModelSpec:
    """A registered network.

    Attributes:
        name: registry name.
        defaults: every hyper-parameter with its default; checkpoints store the resolved dict.
        divisor: spatial sizes fed to the network must be multiples of it (2 ** number of downsamplings).
        description: one line for ``list_models``.
    """

    name: str
    defaults: dict[str, Any]
    divisor: int
    description: str


_MEDNEXT_DEFAULTS = {"kernel_size": 3, "deep_supervision": False, "init_filters": 32}
MODEL_SPECS: dict[str, ModelSpec] = {
    **{f"mednext_{v}": ModelSpec(f"mednext_{v}", _MEDNEXT_DEFAULTS, 16,
                                 f"MedNeXt-{v.upper()} (MONAI), kernel 3 or 5, optional deep supervision")
       for v in "sbml"},
    "segresnet": ModelSpec("segresnet", {"init_filters": 16, "dropout": 0.0}, 8,
                           "SegResNet (MONAI), blocks (1, 2, 2, 4) / (1, 1, 1)"),
    "unet": ModelSpec("unet", {"init_filters": 32}, 16, "3-D U-Net (MONAI BasicUNet), widths f, f, 2f, 4f, 8f"),
}


def list_models() -> list[str]:
    return sorted(MODEL_SPECS)


def get_spec(name: str) -> ModelSpec:
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise ConfigError("model.name", f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def resolve_kwargs(name: str, **kwargs: Any) -> dict[str, Any]:
    """Every hyper-parameter of ``name``: the registry defaults updated with ``kwargs`` (unknown keys rejected)."""
    spec = get_spec(name)
    unknown = sorted(set(kwargs) - set(spec.defaults))
    if unknown:
        raise ConfigError(f"model.{unknown[0]}", f"{name} has no such setting; its settings are "
                          f"{', '.join(sorted(spec.defaults))}")
    return {**spec.defaults, **kwargs}


def config_model_kwargs(config: RunConfig) -> dict[str, Any]:
    """The model settings a run config sets explicitly (``None`` means the registry default)."""
    model = config.model
    return {key: value for key, value in (("kernel_size", model.kernel_size),
                                          ("deep_supervision", model.deep_supervision),
                                          ("init_filters", model.init_filters)) if value is not None}


def check_model_config(config: RunConfig) -> None:
    """Config-time checks: the model exists, takes the given settings, and the patch sizes fit its downsampling."""
    spec = get_spec(config.model.name)
    kwargs = resolve_kwargs(spec.name, **config_model_kwargs(config))
    if "kernel_size" in kwargs and (kwargs["kernel_size"] < 3 or kwargs["kernel_size"] % 2 == 0):
        raise ConfigError("model.kernel_size", f"must be an odd size ≥ 3 (3 or 5 for MedNeXt), got {kwargs['kernel_size']}")
    if kwargs.get("init_filters", 1) < 1:
        raise ConfigError("model.init_filters", f"must be > 0, got {kwargs['init_filters']}")
    if spec.name == "segresnet" and kwargs["init_filters"] % 8:
        raise ConfigError("model.init_filters",
                          f"SegResNet uses group norm with 8 groups; use a multiple of 8, got {kwargs['init_filters']}")
    for key, roi in (("data.roi_size", config.data.roi_size), ("inference.roi_size", config.inference.roi_size)):
        if roi is not None and any(size % spec.divisor for size in roi):
            raise ConfigError(key, f"{spec.name} downsamples by {spec.divisor}: every size must be a multiple of "
                              f"{spec.divisor}, got {list(roi)}")
