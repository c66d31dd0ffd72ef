import pytest
import torch
from monai.networks.nets.mednext import create_mednext

from brats_ugrip.errors import CheckpointError, ConfigError
from brats_ugrip.models import (
    create_model,
    freeze_all_but_last,
    list_models,
    parameters_in_forward_order,
    reset_last_convolutions,
    resolve_kwargs,
    upkern_state_dict,
)

TINY = {"init_filters": 8}


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_family():
    assert {"mednext_s", "mednext_b", "mednext_m", "mednext_l", "segresnet", "unet"} <= set(list_models())


@pytest.mark.parametrize("name", ["mednext_s", "mednext_b", "segresnet", "unet"])
def test_tiny_models_map_four_modalities_to_three_regions(name):
    torch.manual_seed(0)
    model = create_model(name, **TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 32, 32, 32))
    assert out.shape == (1, 3, 32, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("variant", ["s", "b"])
def test_mednext_variants_match_monai_factory(variant):
    # Our table exists only to allow tiny widths; at MONAI's width the networks must be identical.
    ours = create_model(f"mednext_{variant}", kernel_size=5)
    monai = create_mednext(variant.upper(), spatial_dims=3, in_channels=4, out_channels=3, kernel_size=5)
    assert _count(ours) == _count(monai)
    assert [tuple(p.shape) for p in ours.state_dict().values()] == [tuple(p.shape) for p in monai.state_dict().values()]


def test_mednext_deep_supervision_outputs():
    model = create_model("mednext_s", deep_supervision=True, **TINY)
    x = torch.randn(1, 4, 32, 32, 32)
    outputs = model.train()(x)
    assert isinstance(outputs, tuple) and len(outputs) == 5
    assert [o.shape[-1] for o in outputs] == [32, 16, 8, 4, 2]
    with torch.no_grad():
        assert model.eval()(x).shape == (1, 3, 32, 32, 32)


def test_settings_are_checked_per_model():
    assert resolve_kwargs("mednext_b")["kernel_size"] == 3
    with pytest.raises(ConfigError) as info:
        create_model("segresnet", kernel_size=3)
    assert info.value.key_path == "model.kernel_size"
    with pytest.raises(ConfigError, match="available"):
        create_model("mednext_xl")


def test_upkern_upsamples_depthwise_kernels():
    torch.manual_seed(0)
    k3 = create_model("mednext_s", kernel_size=3, **TINY)
    k5 = create_model("mednext_s", kernel_size=5, **TINY)
    state = upkern_state_dict(k3.state_dict(), k5)
    k5.load_state_dict(state)
    name = next(k for k, v in k3.state_dict().items() if v.ndim == 5 and v.shape[-1] == 3)
    assert k5.state_dict()[name].shape[-3:] == (5, 5, 5)
    # Trilinear upsampling keeps a kernel's mean value and copies every other tensor unchanged.
    assert torch.allclose(k5.state_dict()[name].mean(dim=(2, 3, 4)), k3.state_dict()[name].mean(dim=(2, 3, 4)), atol=0.05)
    unchanged = [k for k, v in k3.state_dict().items() if v.shape == k5.state_dict()[k].shape]
    assert unchanged and all(torch.equal(k3.state_dict()[k], k5.state_dict()[k]) for k in unchanged)
    with pytest.raises(CheckpointError, match="only kernel sizes may differ"):
        upkern_state_dict(create_model("mednext_s", init_filters=16).state_dict(), k5)


def test_freeze_counts_from_the_output_side():
    model = create_model("mednext_s", deep_supervision=True, **TINY)
    order = [name for name, _ in parameters_in_forward_order(model)]
    # MedNeXt registers the final output block before the deep-supervision heads; forward order puts it last.
    assert order[-2:] == ["out_0.conv_out.weight", "out_0.conv_out.bias"]
    assert sorted(order) == sorted(name for name, _ in model.named_parameters())
    trainable = freeze_all_but_last(model, 2)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["out_0.conv_out.weight", "out_0.conv_out.bias"]
    assert trainable == model.out_0.conv_out.weight.numel() + model.out_0.conv_out.bias.numel()


def test_reset_last_convolutions_touches_only_those():
    model = create_model("segresnet", **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (last,) = reset_last_convolutions(model, 1)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    last_names = {f"{n}.{p}" for n, m in model.named_modules() if m is last for p, _ in m.named_parameters()}
    assert changed == last_names
    with pytest.raises(ConfigError, match="finetune.reset_last"):
        reset_last_convolutions(model, 10_000)


def test_each_builder_takes_exactly_its_specs_settings():
    """model_specs.py (plain data, read by config validation without torch) and the builders agree."""
    import inspect

    from brats_ugrip.model_specs import MODEL_SPECS
    from brats_ugrip.models import BUILDERS

    assert set(BUILDERS) == set(MODEL_SPECS)
    for name, build in BUILDERS.items():
        signature = {p.name: p.default for p in inspect.signature(build).parameters.values()}
        assert signature == MODEL_SPECS[name].defaults, name
