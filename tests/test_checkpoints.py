import pytest
import torch

from brats_ugrip.checkpoints import (
    checkpoint_meta,
    load_checkpoint,
    load_model,
    model_state_dict,
    save_model_checkpoint,
    weights_hash,
)
from brats_ugrip.config import load_config
from brats_ugrip.errors import CheckpointError
from brats_ugrip.models import create_model
from brats_ugrip.training import SegmentationModule

META = {"model": {"name": "segresnet", "kwargs": {"init_filters": 8, "dropout": 0.0}}, "init_id": "x"}


class NotATensor:
    pass


def test_model_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("segresnet", init_filters=8).eval()
    path = save_model_checkpoint(tmp_path / "m.ckpt", model.state_dict(), META)
    torch.load(path, weights_only=True)  # plain types and tensors only
    loaded, meta = load_model(path)
    assert meta["model"] == META["model"] and meta["format"] == 1 and "created" in meta
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not loaded.training
    assert [p.name for p in tmp_path.iterdir()] == ["m.ckpt"]  # no temporary files left behind


def test_compiled_lightning_checkpoint_loads_into_an_uncompiled_model(tmp_path):
    torch.manual_seed(0)
    config = load_config(base={"data": {"datalist": "d.json", "roi_size": [32, 32, 32]},
                               "model": {"name": "segresnet", "init_filters": 8}, "trainer": {"compile": True}})
    module = SegmentationModule(config)
    state = module.state_dict()
    assert any(k.startswith("model._orig_mod.") for k in state)
    checkpoint = {"pytorch-lightning_version": "2.6.6", "state_dict": state,
                  "brats_ugrip": {"model": {"name": module.model_name, "kwargs": module.model_kwargs}}}
    torch.save(checkpoint, tmp_path / "c.ckpt")
    loaded, _ = load_model(tmp_path / "c.ckpt")
    eager = module.model._orig_mod.eval()
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(eager(x), loaded(x))
    assert set(model_state_dict(checkpoint)) == set(eager.state_dict())


def test_prefix_stripping_is_exact():
    # A parameter whose own name starts with "model" must not lose characters.
    checkpoint = {"pytorch-lightning_version": "2.6.6",
                  "state_dict": {"model.modelx.weight": torch.zeros(1), "loss.weight": torch.zeros(1)}}
    assert list(model_state_dict(checkpoint)) == ["modelx.weight"]
    assert list(model_state_dict({"state_dict": {"_orig_mod.model.w": torch.zeros(1)}})) == ["model.w"]


def test_unreadable_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.ckpt")
    good = save_model_checkpoint(tmp_path / "good.ckpt", create_model("segresnet", init_filters=8).state_dict(), META)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(truncated)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "extra": NotATensor()}, pickled)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(pickled)
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}}, bare)
    with pytest.raises(CheckpointError, match="no brats-ugrip metadata"):
        checkpoint_meta(load_checkpoint(bare), bare)


def test_weights_hash_identifies_weights():
    torch.manual_seed(0)
    a = create_model("segresnet", init_filters=8).state_dict()
    b = {k: v.clone() for k, v in a.items()}
    assert weights_hash(a) == weights_hash(b)
    first = next(k for k, v in b.items() if v.is_floating_point())
    b[first].view(-1)[0] += 1e-3
    assert weights_hash(a) != weights_hash(b)
