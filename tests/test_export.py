"""ONNX export: parity with PyTorch through the shared inference pipeline, sidecars, ensembles, Triton layout."""
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from brats_ugrip.checkpoints import load_checkpoint, load_model, model_state_dict, save_model_checkpoint, weights_hash
from brats_ugrip.cli import run
from brats_ugrip.config import InferenceConfig, load_config
from brats_ugrip.data import cases_from_dir
from brats_ugrip.errors import CheckpointError
from brats_ugrip.inference import predict_case
from brats_ugrip.mlcube.export import export_ensemble, export_onnx, export_triton, triton_config
from brats_ugrip.mlcube.export import main as export_main
from brats_ugrip.models import create_model, resolve_kwargs
from brats_ugrip.onnx_model import load_onnx_model, sidecar_settings

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

# Tiny networks; the MedNeXt is trained with deep supervision (5 outputs in train mode), exported without it.
NETWORKS = {"segresnet": {"init_filters": 8}, "mednext_s": {"init_filters": 4, "deep_supervision": True}}
INFERENCE = {"roi_size": [32, 32, 32], "overlap": 0.25, "sw_batch_size": 2}


def make_checkpoint(path, name):
    torch.manual_seed(0)
    model = create_model(name, **NETWORKS[name]).eval()
    config = load_config(base={"data": {"datalist": "d.json", "roi_size": [32, 32, 32]},
                               "model": {"name": name, **NETWORKS[name]}, "inference": INFERENCE})
    meta = {"model": {"name": name, "kwargs": resolve_kwargs(name, **NETWORKS[name])}, "config": config.to_dict(),
            "init_id": "feedfacefeedface", "epoch": 3}
    return save_model_checkpoint(path, model.state_dict(), meta), model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{name: (checkpoint, PyTorch model, onnx path)}`` for both networks."""
    root = tmp_path_factory.mktemp("export")
    result = {}
    for name in NETWORKS:
        ckpt, model = make_checkpoint(root / f"{name}.ckpt", name)
        result[name] = (ckpt, model, export_onnx(ckpt, root / f"{name}.onnx"))
    return result


@pytest.mark.parametrize("name", list(NETWORKS))
def test_onnx_matches_pytorch_on_phantoms(exported, phantom_dir, name):
    _, model, onnx_path = exported[name]
    network, _ = load_onnx_model(onnx_path)
    # Any batch and window shape (the graph was traced on one 2 × divisor cube): dynamic axes.
    windows = torch.randn(3, 4, 48, 32, 64)
    with torch.no_grad():
        reference = model(windows)
        assert float((network(windows) - reference).abs().max()) <= 1e-4
        assert network(windows).shape == (3, 3, 48, 32, 64)
    # The whole pipeline (preprocessing, sliding window with flip TTA, labels, paste-back) with either network;
    # a window the export never saw (32 × 48 × 32).
    settings = InferenceConfig(roi_size=(32, 48, 32), overlap=0.25, sw_batch_size=2, tta=True)
    case = cases_from_dir(phantom_dir)[0]
    torch_prediction = predict_case(model, case.images, settings)
    onnx_prediction = predict_case(network, case.images, settings)
    assert np.abs(onnx_prediction.crop_probabilities - torch_prediction.crop_probabilities).max() <= 1e-4
    assert len(np.unique(torch_prediction.labels)) > 1  # not an all-background map: the labels are compared
    np.testing.assert_array_equal(onnx_prediction.labels, torch_prediction.labels)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_sidecar_records_the_contract(exported, name):
    ckpt, _, onnx_path = exported[name]
    sidecar = json.loads(onnx_path.with_suffix(".json").read_text())
    assert sidecar["opset"] == 17 and sidecar["format"] == 1
    assert sidecar["input"]["name"] == "image" and sidecar["input"]["channels"] == ["t1c", "t1n", "t2f", "t2w"]
    assert sidecar["output"]["name"] == "logits" and sidecar["output"]["channels"] == ["TC", "WT", "ET"]
    assert sidecar["input"]["shape"] == ["batch", 4, "x", "y", "z"] and sidecar["output"]["shape"][1] == 3
    assert "logits" in sidecar["output"]["values"] and "sigmoid" in sidecar["output"]["values"]
    assert "z-score" in sidecar["preprocessing"]["normalisation"] and "RAS" in sidecar["preprocessing"]["orientation"]
    assert sidecar["spatial_divisor"] == {"segresnet": 8, "mednext_s": 16}[name]
    assert sidecar["label_scheme"] == "brats2023" and sidecar["provenance"]["init_id"] == "feedfacefeedface"
    assert sidecar["weights_hash"] == weights_hash(model_state_dict(load_checkpoint(ckpt)))
    assert sidecar_settings(sidecar) == InferenceConfig(roi_size=(32, 32, 32), overlap=0.25, sw_batch_size=2)
    # The ONNX graph itself: the opset, one input and ONE output (deep supervision off), dynamic axes by name.
    graph = onnx.load(str(onnx_path))
    assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 17
    [output] = graph.graph.output
    assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == ["batch", 3, "x", "y", "z"]


def test_deep_supervision_is_on_in_training_and_off_in_export(exported):
    _, model, onnx_path = exported["mednext_s"]
    with torch.no_grad():
        outputs = model.train()(torch.zeros(1, 4, 32, 32, 32))
    model.eval()
    assert isinstance(outputs, (list, tuple)) and len(outputs) == 5
    assert [o.name for o in ort.InferenceSession(str(onnx_path)).get_outputs()] == ["logits"]


def parse_model_config(text: str):
    """Parse ``config.pbtxt`` strictly against the part of Triton's ``ModelConfig`` schema (model_config.proto:
    field names, numbers and enums as published there) that an ONNX model's config uses: unknown fields or enum
    values fail."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="triton_subset.proto", package="inference", syntax="proto3")
    data_type = proto.enum_type.add(name="DataType")
    for number, value in enumerate(["INVALID", "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                                    "INT32", "INT64", "FP16", "FP32", "FP64", "STRING", "BF16"]):
        data_type.value.add(name=f"TYPE_{value}", number=number)

    def message(name, fields):
        described = proto.message_type.add(name=name)
        for field_name, number, kind, repeated, type_name in fields:
            field = described.field.add(name=field_name, number=number, type=kind,
                                        label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
            if type_name:
                field.type_name = type_name

    message("ModelInput", [("name", 1, F.TYPE_STRING, False, None), ("data_type", 2, F.TYPE_ENUM, False,
                                                                     ".inference.DataType"),
                           ("dims", 4, F.TYPE_INT64, True, None)])
    message("ModelOutput", [("name", 1, F.TYPE_STRING, False, None), ("data_type", 2, F.TYPE_ENUM, False,
                                                                      ".inference.DataType"),
                            ("dims", 3, F.TYPE_INT64, True, None), ("label_filename", 4, F.TYPE_STRING, False, None)])
    message("ModelConfig", [("name", 1, F.TYPE_STRING, False, None), ("platform", 2, F.TYPE_STRING, False, None),
                            ("max_batch_size", 4, F.TYPE_INT32, False, None),
                            ("input", 5, F.TYPE_MESSAGE, True, ".inference.ModelInput"),
                            ("output", 6, F.TYPE_MESSAGE, True, ".inference.ModelOutput"),
                            ("default_model_filename", 8, F.TYPE_STRING, False, None),
                            ("backend", 17, F.TYPE_STRING, False, None)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    config = message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))()
    text_format.Parse(text, config)
    return config


def test_triton_repository_layout_and_config(exported, tmp_path):
    ckpt, _, onnx_path = exported["segresnet"]
    model_dir = export_triton(ckpt, tmp_path / "repo", name="brats_seg", max_batch_size=4)
    assert model_dir == tmp_path / "repo" / "brats_seg"
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == [
        "1", "1/model.json", "1/model.onnx", "config.pbtxt"]
    config = parse_model_config((model_dir / "config.pbtxt").read_text())
    assert (config.name, config.platform, config.max_batch_size) == ("brats_seg", "onnxruntime_onnx", 4)
    # With max_batch_size > 0, Triton's dims leave out the batch axis; -1 marks a variable size.
    [inp], [out] = config.input, config.output
    assert (inp.name, list(inp.dims), out.name, list(out.dims)) == ("image", [4, -1, -1, -1], "logits", [3, -1, -1, -1])
    data_type = config.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"]
    fp32 = data_type.enum_type.values_by_name["TYPE_FP32"]
    assert inp.data_type == out.data_type == fp32.number == 11
    # The config agrees with the graph Triton will load: names, ranks, fixed channel counts.
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"))
    for declared, actual in ((inp, session.get_inputs()[0]), (out, session.get_outputs()[0])):
        assert declared.name == actual.name and actual.type == "tensor(float)"
        assert [d if isinstance(d, int) else -1 for d in actual.shape[1:]] == list(declared.dims)
    with pytest.raises(ValueError, match="name"):
        export_triton(ckpt, tmp_path / "repo", name="bad name")
    with pytest.raises(ValueError, match="max-batch-size"):
        triton_config("m", json.loads(onnx_path.with_suffix(".json").read_text()), max_batch_size=0)


def test_ensemble_export_writes_one_model_per_member_and_the_spec(exported, tmp_path):
    spec = tmp_path / "ensemble.yaml"
    spec.write_text(yaml.safe_dump({
        "thresholds": {"TC": 0.4, "WT": 0.5, "ET": 0.6},
        "models": [{"path": str(exported["segresnet"][0]), "weights": {"TC": 0.2, "WT": 1.0, "ET": 0.0},
                    "inference": {"overlap": 0.5, "tta": True}},
                   {"path": str(exported["mednext_s"][0]), "weights": 0.7}]}))
    manifest_path = export_ensemble(spec, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "00-segresnet.json", "00-segresnet.onnx", "01-mednext_s.json", "01-mednext_s.onnx", "ensemble.json"]
    manifest = json.loads(manifest_path.read_text())
    assert manifest["thresholds"] == {"TC": 0.4, "WT": 0.5, "ET": 0.6}
    assert manifest["models"] == [{"path": "00-segresnet.onnx", "weights": {"TC": 0.2, "WT": 1.0, "ET": 0.0}},
                                  {"path": "01-mednext_s.onnx", "weights": {"TC": 0.7, "WT": 0.7, "ET": 0.7}}]
    assert manifest["label_scheme"] == "brats2023"
    # The spec's per-model inference overrides go into that model's sidecar, and nowhere else.
    first, second = (json.loads((tmp_path / "out" / f).read_text())["inference"]
                     for f in ("00-segresnet.json", "01-mednext_s.json"))
    assert (first["overlap"], first["tta"], second["overlap"], second["tta"]) == (0.5, True, 0.25, False)
    assert {o.name for o in ort.InferenceSession(str(tmp_path / "out" / "01-mednext_s.onnx")).get_outputs()} == {"logits"}


def test_export_refuses_bad_inputs(exported, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        export_onnx(tmp_path / "missing.ckpt", tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=".onnx"):
        export_onnx(exported["segresnet"][0], tmp_path / "m.bin")
    with pytest.raises(ValueError, match="opset 99"):
        export_onnx(exported["segresnet"][0], tmp_path / "m.onnx", opset=99)
    # A checkpoint without a run config (window size, label scheme) is refused before anything is written.
    bare = save_model_checkpoint(tmp_path / "bare.ckpt", exported["segresnet"][1].state_dict(),
                                 {"model": {"name": "segresnet", "kwargs": resolve_kwargs("segresnet", init_filters=8)}})
    with pytest.raises(CheckpointError, match="no run config"):
        export_onnx(bare, tmp_path / "bare.onnx")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "bare.onnx").exists()
    with pytest.raises(CheckpointError, match="sidecar"):
        (tmp_path / "lone.onnx").write_bytes(exported["segresnet"][2].read_bytes())
        load_onnx_model(tmp_path / "lone.onnx")


def test_cli_export_then_infer_onnx_matches_pytorch(exported, phantom_dir, tmp_path, capsys):
    ckpt, model, _ = exported["segresnet"]
    onnx_path = tmp_path / "cli" / "model.onnx"
    # The export command in-process (what `brats-ugrip export` calls), the infer command as a user runs it.
    with pytest.raises(SystemExit) as stop:
        run(export_main, ["--ckpt", str(ckpt), "--format", "onnx", "--out", str(onnx_path)])
    assert stop.value.code == 0 and onnx_path.is_file() and onnx_path.with_suffix(".json").is_file()
    case = cases_from_dir(phantom_dir)[3]
    data = tmp_path / "cases" / case.case_id
    data.mkdir(parents=True)
    for path in case.images:
        (data / path.name).symlink_to(path)
    done = subprocess.run([sys.executable, "-m", "brats_ugrip.infer", "--onnx", str(onnx_path), "--input", str(data),
                           "--out", str(tmp_path / "pred")], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    written = nib.load(str(tmp_path / "pred" / f"{case.case_id}.nii.gz"))
    settings = InferenceConfig(**{**INFERENCE, "roi_size": tuple(INFERENCE["roi_size"])})
    np.testing.assert_array_equal(np.asarray(written.dataobj), predict_case(model, case.images, settings).labels)
    with pytest.raises(SystemExit) as stop:
        run(export_main, ["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x.onnx")])
    assert stop.value.code == 2 and "checkpoint not found" in " ".join(capsys.readouterr().err.split())


def test_help_and_argument_errors_do_not_import_torch():
    code = ("import sys\nfrom brats_ugrip.mlcube.export import main\nfor argv in (['--help'], ['--out', 'x.onnx']):\n"
            "    try:\n        main(argv)\n    except SystemExit as stop:\n        print(stop.code)\n"
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.stdout.split()[-3:] == ["0", "2", "[]"], done.stdout + done.stderr


@pytest.mark.slow
def test_train_soup_export_and_predict_with_onnx(phantom_dir, tmp_path):
    """The seed's serving path: train, soup, export, run the ONNX model on a case (labels as the soup's)."""
    from brats_ugrip.data import Datalist, make_datalist, save_datalist
    from brats_ugrip.heldout import checkpoint_settings
    from brats_ugrip.infer import main as infer_main
    from brats_ugrip.souping import uniform as uniform_cli
    from brats_ugrip.training import train

    datalist_path = save_datalist(make_datalist(phantom_dir, n_folds=3, seed=0, relative_to=tmp_path),
                                  tmp_path / "datalist.json")
    models = tmp_path / "models"
    models.mkdir()
    for lr in (1e-3, 3e-3):
        summary = train(load_config("experiments/train_tiny_cpu.yaml", {
            "data.datalist": str(datalist_path), "data.samples_per_case": 1, "trainer.max_epochs": 1,
            "trainer.val_every": 1, "optim.lr": lr, "logging.mode": "disabled"}), tmp_path / f"run{lr:g}")
        shutil.copy(summary["best_checkpoint"], models / f"lr{lr:g}.ckpt")
    soup = tmp_path / "soup.ckpt"
    assert uniform_cli.main(["--ckpts", str(models), "--out", str(soup), "--no-score", "--device", "cpu"]) == 0
    assert export_main(["--ckpt", str(soup), "--format", "onnx", "--out", str(tmp_path / "soup.onnx")]) == 0
    case = Datalist.load(datalist_path).fold_cases(0)[0]
    assert infer_main(["--onnx", str(tmp_path / "soup.onnx"), "--input", str(case.images[0].parent),
                       "--out", str(tmp_path / "pred")]) == 0
    model, meta = load_model(soup)
    expected = predict_case(model, case.images, checkpoint_settings(meta), case_id=case.case_id).labels
    written = nib.load(str(tmp_path / "pred" / f"{case.case_id}.nii.gz"))
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
