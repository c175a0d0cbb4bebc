"""ONNX export: the graph onnxruntime runs predicts what PyTorch predicts, at any batch size; a wrong file
is caught; `wflw export` writes one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import PARAMS_YAML, decoded_crops, tiny_trained, with_normalize

from wflw_pipeline import cli
from wflw_pipeline.serving.export import ExportError, OnnxPredictor, check_onnx, export_onnx
from wflw_pipeline.serving.inference import LandmarkPredictor


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """(model.pt, its model.onnx, the test split's decoded crops) of the tiny trained model."""
    root = tmp_path_factory.mktemp("export")
    parquet, model = tiny_trained(root)
    return model, export_onnx(model, root / "model.onnx"), decoded_crops(parquet / "test.parquet")


def test_onnxruntime_predicts_what_pytorch_predicts_at_any_batch_size(exported):
    model, path, crops = exported
    expected = LandmarkPredictor.load(model).predict(crops)
    session = OnnxPredictor(path, 48)
    for batch_size in (1, 3, 8):
        points = session.predict(crops, batch_size=batch_size)
        assert points.shape == (8, 98, 2) and points.dtype == np.float32
        assert np.abs(points - expected).max() < 1e-3
    assert check_onnx(path, model, crops) < 1e-3
    assert np.abs(expected - expected[0]).max() > 1e-2  # the crops differ, so does the check


def test_the_graph_normalises_as_the_model_file_says(exported, tmp_path):
    model, path, crops = exported
    other = with_normalize(model, tmp_path / "other.pt", [100.0, 110.0, 120.0], [50.0, 60.0, 70.0])
    expected = LandmarkPredictor.load(other).predict(crops)
    points = OnnxPredictor(export_onnx(other, tmp_path / "other.onnx"), 48).predict(crops)
    assert np.abs(points - expected).max() < 1e-3
    assert np.abs(points - OnnxPredictor(path, 48).predict(crops)).max() > 1e-2


def test_the_graph_takes_uint8_crops_with_a_dynamic_batch_and_says_how_to_crop(exported):
    graph = onnx.load(str(exported[1]))
    (crops,), (points,) = graph.graph.input, graph.graph.output
    dims = [d.dim_param or d.dim_value for d in crops.type.tensor_type.shape.dim]
    assert crops.name == "crops" and crops.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert isinstance(dims[0], str) and dims[1:] == [48, 48, 3]
    assert points.name == "landmarks" and [d.dim_value for d in points.type.tensor_type.shape.dim][1:] == [
        98,
        2,
    ]
    rule = json.loads({p.key: p.value for p in graph.metadata_props}["wflw.crop"])
    assert rule == {"bbox": "landmarks", "padding": 1.25, "context": 1.5, "crop_size": 48, "input_size": 32}
    assert not list(exported[1].parent.glob("*.data"))  # the weights are inside the one file


def test_an_onnx_file_of_other_weights_fails_the_check(exported, tmp_path):
    model, path, crops = exported
    state = torch.load(model, weights_only=True)
    state["model"]["head.bias"] = state["model"]["head.bias"] + 0.01
    other = tmp_path / "other.pt"
    torch.save(state, other)
    with pytest.raises(
        ExportError, match=r"onnxruntime differs from PyTorch by 0\.\d+ px \(tolerance 0\.001\)"
    ):
        check_onnx(path, other, crops)


def test_wflw_export_writes_a_checked_file(exported, tmp_path, caplog):
    model = exported[0]
    out = tmp_path / "m.onnx"
    with caplog.at_level(logging.INFO):
        code = cli.main(["export", "--model", str(model), "--out", str(out), "--params", str(PARAMS_YAML)])
    assert code == 0
    assert f"wrote {out} from {model}: onnxruntime matches PyTorch to" in caplog.text
    crops = np.random.default_rng(1).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    expected = LandmarkPredictor.load(model).predict(crops)
    assert np.abs(OnnxPredictor(out, 48).predict(crops) - expected).max() < 1e-3
