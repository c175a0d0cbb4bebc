"""LandmarkPredictor (engine.predict_crops): decoded Parquet crops in, what `wflw evaluate` computes out,
with the model file's normalisation; bad crops and files."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import decoded_crops, evaluate_predictions, tiny_trained, with_normalize

from wflw_pipeline.core.engine import InferenceError
from wflw_pipeline.core.model import IMAGENET, CheckpointError, load_trained
from wflw_pipeline.serving.inference import LandmarkPredictor

EXPECTED_SHAPE = "crops must have shape (N, 48, 48, 3): found"
PIXELS = "crops must be integers in 0..255: found"


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


def test_the_model_files_normalisation_is_the_one_applied(trained, predictor, tmp_path):
    crops = decoded_crops(trained[0]) // 2  # 0..127, so + 10 stays a pixel value
    normalize = load_trained(trained[1]).normalize
    assert normalize == IMAGENET  # what train writes
    shifted = [m + 10.0 for m in normalize.mean]
    other = LandmarkPredictor.load(
        with_normalize(trained[1], tmp_path / "m.pt", shifted, list(normalize.std))
    )
    # (crop + 10 - (mean + 10)) / std == (crop - mean) / std: the same network input, the same points
    np.testing.assert_allclose(other.predict(crops + 10), predictor.predict(crops), atol=1e-4)
    assert np.abs(other.predict(crops) - predictor.predict(crops)).max() > 1e-3


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
        (np.zeros((1, 48, 48, 3), bool), f"{PIXELS} values of dtype bool"),
        (np.full((1, 48, 48, 3), 0.5, np.float32), f"{PIXELS} 0.5 at crop 0, row 0, column 0, channel 0"),
        (np.full((1, 48, 48, 3), np.nan), f"{PIXELS} nan at crop 0, row 0, column 0, channel 0"),
        (
            np.arange(1 * 48 * 48 * 3).reshape(1, 48, 48, 3) - 1,
            f"{PIXELS} -1 at crop 0, row 0, column 0, channel 0",
        ),
        (
            np.arange(1 * 48 * 48 * 3).reshape(1, 48, 48, 3),
            f"{PIXELS} 256 at crop 0, row 1, column 37, channel 1",
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
    with pytest.raises(
        CheckpointError, match=rf"^{re.escape(str(path))}: cannot read a trained model: not a PyTorch"
    ):
        LandmarkPredictor.load(path)


def test_foreign_torch_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: not a model written by this version")):
        LandmarkPredictor.load(path)


def test_missing_model_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="trained model not found"):
        LandmarkPredictor.load(tmp_path / "model.pt")
