"""LandmarkPredictor: decoded Parquet crops in, what `wflw evaluate` computes out; bad crops and files."""

import io
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import default_params, tiny_trained
from PIL import Image

from wflw_pipeline.dataset import load_faces
from wflw_pipeline.engine import View
from wflw_pipeline.evaluate import predict_split
from wflw_pipeline.inference import InferenceError, LandmarkPredictor
from wflw_pipeline.model import CheckpointError, load_trained
from wflw_pipeline.runtime import resolve_precision

EXPECTED_SHAPE = "crops: expected shape (N, 48, 48, 3) (RGB crops of the model's crop_size 48), found"


def decoded_crops(split: Path) -> np.ndarray:
    """The split's `crop_jpeg` decoded as dataset.py does: uint8 (N, S, S, 3)."""
    jpegs = pq.read_table(split, columns=["crop_jpeg"]).column("crop_jpeg").to_pylist()
    return np.stack([np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")) for jpeg in jpegs])


def evaluate_predictions(split: Path, model_path: Path) -> np.ndarray:
    """`evaluate.predict_split`'s crop-pixel predictions, flip test off, fp32 on the CPU (as run_evaluate)."""
    params = replace(default_params().evaluate, flip_test=False, device="cpu", precision="fp32")
    model, info = load_trained(model_path, "cpu")
    precision = resolve_precision(
        params.precision, info["params"]["train"]["channels_last"], torch.device("cpu")
    )
    model = model.to(memory_format=precision.memory_format())
    faces = load_faces(split)
    view = View(faces.crop_size, faces.context, int(info["view"]["input_size"]))
    result = predict_split(model, faces, split, view=view, params=params, precision=precision, progress=False)
    return result.pred_crop


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(test.parquet, model.pt) of the tiny trained model."""
    parquet, model_path = tiny_trained(tmp_path_factory.mktemp("inference"))
    return parquet / "test.parquet", model_path


@pytest.fixture(scope="module")
def predictor(trained) -> LandmarkPredictor:
    return LandmarkPredictor.load(trained[1])


def test_predictions_equal_evaluate_without_flip_test(trained, predictor):
    split, model_path = trained
    crops = decoded_crops(split)
    expected = evaluate_predictions(split, model_path)
    points = predictor.predict(crops, batch_size=3)
    assert crops.shape == (8, 48, 48, 3) and crops.dtype == np.uint8
    assert points.shape == (8, 98, 2) and points.dtype == np.float32
    assert np.abs(points - expected).max() < 1e-3
    assert np.abs(points - points[0]).max() > 1e-2  # the faces get different points: the pixels count


def test_crop_size_is_the_models_view(predictor):
    assert predictor.crop_size == 48


def test_integral_pixels_of_other_dtypes_predict_as_uint8(trained, predictor):
    crops = decoded_crops(trained[0])[:2]
    expected = predictor.predict(crops)
    np.testing.assert_array_equal(predictor.predict(crops.astype(np.int64)), expected)
    np.testing.assert_array_equal(predictor.predict(crops.astype(np.float32)), expected)


def test_a_strided_view_predicts_as_its_copy(trained, predictor):
    mirrored = decoded_crops(trained[0])[:2, :, ::-1]
    np.testing.assert_array_equal(predictor.predict(mirrored), predictor.predict(mirrored.copy()))


def test_empty_batch_gives_no_points(predictor):
    points = predictor.predict(np.zeros((0, 48, 48, 3), np.uint8))
    assert points.shape == (0, 98, 2) and points.dtype == np.float32


@pytest.mark.parametrize(
    ("crops", "message"),
    [
        (np.zeros((48, 48, 3), np.uint8), f"{EXPECTED_SHAPE} (48, 48, 3)"),
        (np.zeros((2, 32, 32, 3), np.uint8), f"{EXPECTED_SHAPE} (2, 32, 32, 3)"),
        (np.zeros((2, 48, 48, 4), np.uint8), f"{EXPECTED_SHAPE} (2, 48, 48, 4)"),
        (np.zeros((2, 3, 48, 48), np.uint8), f"{EXPECTED_SHAPE} (2, 3, 48, 48)"),
        (np.zeros((1, 48, 48, 3), bool), "crops: expected uint8 pixels, found dtype bool"),
        (
            np.full((1, 48, 48, 3), 0.5, np.float32),
            "crops: expected integer pixel values 0..255, found non-integer float32",
        ),
        (
            np.full((1, 48, 48, 3), np.nan),
            "crops: expected integer pixel values 0..255, found non-integer float64",
        ),
        (
            np.arange(1 * 48 * 48 * 3).reshape(1, 48, 48, 3) - 1,
            "crops: expected pixel values 0..255, found int64 values from -1 to 6910",
        ),
    ],
)
def test_bad_crops_are_named(predictor, crops, message):
    with pytest.raises(InferenceError, match=f"^{re.escape(message)}$"):
        predictor.predict(crops)


def test_bad_batch_size_is_named(predictor):
    with pytest.raises(InferenceError, match=r"^batch_size: expected a positive integer, found 0$"):
        predictor.predict(np.zeros((1, 48, 48, 3), np.uint8), batch_size=0)


def test_corrupt_model_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: cannot read a trained model \("):
        LandmarkPredictor.load(path)


def test_foreign_torch_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: not a model written by this version")):
        LandmarkPredictor.load(path)


def test_missing_model_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="trained model not found"):
        LandmarkPredictor.load(tmp_path / "model.pt")
