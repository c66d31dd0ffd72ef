"""Model registry: networks built by name, timm-style (``create_model("mednext_b", kernel_size=5)``).

Every model takes the four modalities (``t1c, t1n, t2f, t2w``) and returns three region logits (TC, WT, ET;
apply a sigmoid). A MedNeXt built with ``deep_supervision=True`` returns, in train mode, a tuple of 5 logits
tensors from full to 1/16 resolution; in eval mode always one tensor.

Also here: the model surgery fine-tuning needs (parameters in forward order, freezing, re-initialising the last
convolutions) and UpKern (a kernel-5 MedNeXt initialised from a kernel-3 one by trilinear upsampling).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet, MedNeXt, SegResNet
from torch import nn

from brats_ugrip.errors import CheckpointError, ConfigError
from brats_ugrip.model_specs import (  # noqa: F401 (re-exported)
    IN_CHANNELS,
    OUT_CHANNELS,
    ModelSpec,
    check_model_config,
    config_model_kwargs,
    get_spec,
    list_models,
    resolve_kwargs,
)

BUILDERS: dict[str, Callable[..., nn.Module]] = {}
"""The builder of each network of ``brats_ugrip.model_specs.MODEL_SPECS``, taking exactly its ``defaults``' keys."""


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``build(**kwargs)`` as the builder of the spec ``name``."""

    def decorator(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        BUILDERS[name] = build
        return build

    return decorator


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered network (4 input channels, 3 region logits)."""
    return BUILDERS[get_spec(name).name](**resolve_kwargs(name, **kwargs))


# --- the networks -------------------------------------------------------------------------------------------

# MedNeXt variants (Roy et al. 2023, arXiv:2303.09975), as in MONAI's ``create_mednext`` but with a configurable
# width so that tests and demos can build tiny ones; a test checks the parameter count against MONAI's factory.
MEDNEXT_VARIANTS: dict[str, dict[str, Any]] = {
    "s": dict(encoder_expansion_ratio=2, decoder_expansion_ratio=2, bottleneck_expansion_ratio=2,
              blocks_down=(2, 2, 2, 2), blocks_bottleneck=2, blocks_up=(2, 2, 2, 2)),
    "b": dict(encoder_expansion_ratio=(2, 3, 4, 4), decoder_expansion_ratio=(4, 4, 3, 2), bottleneck_expansion_ratio=4,
              blocks_down=(2, 2, 2, 2), blocks_bottleneck=2, blocks_up=(2, 2, 2, 2)),
    "m": dict(encoder_expansion_ratio=(2, 3, 4, 4), decoder_expansion_ratio=(4, 4, 3, 2), bottleneck_expansion_ratio=4,
              blocks_down=(3, 4, 4, 4), blocks_bottleneck=4, blocks_up=(4, 4, 4, 3)),
    "l": dict(encoder_expansion_ratio=(3, 4, 8, 8), decoder_expansion_ratio=(8, 8, 4, 3), bottleneck_expansion_ratio=8,
              blocks_down=(3, 4, 8, 8), blocks_bottleneck=8, blocks_up=(8, 8, 4, 3)),
}


def _mednext_builder(variant: str) -> Callable[..., nn.Module]:
    def build(kernel_size: int = 3, deep_supervision: bool = False, init_filters: int = 32) -> nn.Module:
        return MedNeXt(spatial_dims=3, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, init_filters=init_filters,
                       kernel_size=kernel_size, deep_supervision=deep_supervision, use_residual_connection=True,
                       norm_type="group", global_resp_norm=False, **MEDNEXT_VARIANTS[variant])

    return build


for _variant in MEDNEXT_VARIANTS:
    register_model(f"mednext_{_variant}")(_mednext_builder(_variant))


@register_model("segresnet")
def _segresnet(init_filters: int = 16, dropout: float = 0.0) -> nn.Module:
    return SegResNet(spatial_dims=3, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, init_filters=init_filters,
                     dropout_prob=dropout or None, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))


@register_model("unet")
def _unet(init_filters: int = 32) -> nn.Module:
    f = init_filters
    return BasicUNet(spatial_dims=3, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, features=(f, f, 2 * f, 4 * f,
                                                                                                   8 * f, f))


# --- fine-tuning surgery ------------------------------------------------------------------------------------


def _forward_order(model: nn.Module, input_size: int) -> list[nn.Module]:
    """Leaf modules in the order a forward pass runs them (registration order can differ, e.g. MedNeXt's
    final output block is registered before its deep-supervision heads)."""
    order: list[nn.Module] = []

    def record(module: nn.Module, *_: Any) -> None:
        if all(module is not seen for seen in order):
            order.append(module)

    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, IN_CHANNELS, input_size, input_size, input_size,
                              device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return order


def parameters_in_forward_order(model: nn.Module, input_size: int = 32) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` from the input side to the output side. ``input_size``: a cube side the network
    accepts (its divisor)."""
    names = {id(p): n for n, p in model.named_parameters()}
    ordered: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for module in _forward_order(model, input_size):
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                ordered.append((names[id(param)], param))
    # Parameters used outside leaf modules' forward (rare) go first, so they count as far from the output.
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in seen]
    return rest + ordered


def freeze_all_but_last(model: nn.Module, count: int, input_size: int = 32) -> int:
    """Freeze every parameter tensor except the last ``count`` (forward order); returns the trainable count."""
    ordered = parameters_in_forward_order(model, input_size)
    for i, (_, param) in enumerate(ordered):
        param.requires_grad_(i >= len(ordered) - count)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def reset_last_convolutions(model: nn.Module, count: int, input_size: int = 32) -> list[nn.Module]:
    """Re-initialise the last ``count`` convolution layers (forward order); returns them."""
    convs = [m for m in _forward_order(model, input_size) if isinstance(m, nn.modules.conv._ConvNd)]
    if count > len(convs):
        raise ConfigError("finetune.reset_last", f"the model has {len(convs)} convolution layers, cannot reset {count}")
    chosen = convs[len(convs) - count:] if count else []
    for conv in chosen:
        conv.reset_parameters()
    return chosen


def upkern_state_dict(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """UpKern: adapt ``source`` weights to ``target``, trilinearly upsampling convolution kernels whose spatial
    size differs (e.g. a kernel-3 MedNeXt into a kernel-5 one). Any other mismatch is a :class:`CheckpointError`."""
    result: dict[str, torch.Tensor] = {}
    target_state = target.state_dict()
    for key, wanted in target_state.items():
        if key not in source:
            raise CheckpointError(f"UpKern: the source checkpoint has no tensor {key!r}; is it the same architecture?")
        tensor = source[key]
        if tensor.shape != wanted.shape:
            if tensor.ndim != 5 or tensor.shape[:2] != wanted.shape[:2]:
                raise CheckpointError(f"UpKern: {key} has shape {tuple(tensor.shape)} in the source and "
                                      f"{tuple(wanted.shape)} in the model; only kernel sizes may differ")
            tensor = F.interpolate(tensor.float(), size=wanted.shape[2:], mode="trilinear").to(wanted.dtype)
        result[key] = tensor
    return result
