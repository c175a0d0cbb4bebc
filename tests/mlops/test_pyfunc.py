"""The logged pyfunc model: registered in a real SQLite-backed MLflow, loaded by alias in a fresh process."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from helpers import decoded_crops, evaluate_predictions, tiny_trained
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from wflw_pipeline.mlops import pyfunc

FRESH_PROCESS = """
import json, sys, time
import numpy as np
t = time.perf_counter()
import mlflow
from fastapi.testclient import TestClient
from mlflow.pyfunc import scoring_server
imported = time.perf_counter() - t
model = mlflow.pyfunc.load_model("models:/m@champion")
loaded = time.perf_counter() - t - imported
crops = np.load(sys.argv[1])
np.save(sys.argv[2], model.predict(crops))
served = TestClient(scoring_server.init(model)).post("/invocations", json={"inputs": crops.tolist()})
np.save(sys.argv[3], np.array(served.json()["predictions"], np.float32))
import wflw_pipeline
print(json.dumps({"import_s": imported, "load_s": loaded, "package": wflw_pipeline.__file__}))
"""


@dataclass(frozen=True)
class Logged:
    """The tiny model logged into a run, registered as `m` with alias `champion`."""

    root: Path
    test_split: Path
    model_path: Path
    tracking_uri: str
    info: mlflow.models.model.ModelInfo


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    root = tmp_path_factory.mktemp("pyfunc")
    parquet, model_path = tiny_trained(root)
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "path", list(sys.path))  # loading a model with code/ prepends to sys.path
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            experiment = mlflow.create_experiment(
                "landmarks", artifact_location=(root / "mlartifacts").as_uri()
            )
            with mlflow.start_run(experiment_id=experiment):
                info = pyfunc.log_landmark_model(model_path)
            version = mlflow.register_model(info.model_uri, "m")
            MlflowClient().set_registered_model_alias("m", "champion", version.version)
            yield Logged(root, parquet / "test.parquet", model_path, uri, info)
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def model_dir(logged) -> Path:
    return Path(
        mlflow.artifacts.download_artifacts(logged.info.model_uri, dst_path=str(logged.root / "model"))
    )


def test_the_signature_declares_the_points_and_leaves_the_crops_unconverted_for_predict(logged):
    info = mlflow.models.get_model_info("models:/m@champion")
    (points,) = info.signature.outputs.inputs
    assert info.signature.inputs is None
    assert (points.type, points.shape) == (np.dtype(np.float32), (-1, 98, 2))
    assert info.metadata == {"crop_size": 48, "max_crops_per_request": pyfunc.MAX_CROPS}


def test_the_model_directory_holds_code_and_weights_but_no_pickle(logged, model_dir):
    files = {str(path.relative_to(model_dir)) for path in model_dir.rglob("*") if path.is_file()}
    assert not [name for name in files if name.endswith((".pkl", ".pickle", ".cloudpickle"))]
    assert (model_dir / pyfunc.MODEL_CODE.name).read_text() == pyfunc.MODEL_CODE.read_text()
    assert (model_dir / "artifacts" / "model.pt").read_bytes() == logged.model_path.read_bytes()
    assert (model_dir / "code" / "wflw_pipeline" / "serving" / "inference.py").is_file()
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in flavor


def test_the_requirements_are_the_explicit_pins(model_dir):
    lines = (model_dir / "requirements.txt").read_text().splitlines()
    assert lines == [f"mlflow=={mlflow.__version__}", *pyfunc.pip_requirements()]
    assert [line.split("==")[0] for line in lines[1:]] == list(pyfunc.REQUIREMENTS)


def test_the_input_example_is_one_grey_crop(model_dir):
    example = np.array(json.loads((model_dir / "input_example.json").read_text()))
    np.testing.assert_array_equal(example, np.full((1, 48, 48, 3), 128))


GRAY = np.full((2, 48, 48, 3), 128, np.uint8)
PIXELS = "crops must be integers in 0..255: found"


def _with(value, dtype, at=(1, 2, 3, 1)) -> np.ndarray:
    crops = GRAY.astype(dtype)
    crops[at] = value
    return crops


def test_uint8_crops_pass_unchanged():
    assert pyfunc.checked_crops(GRAY, 48) is GRAY


@pytest.mark.parametrize("dtype", [np.int64, np.float64, object])
def test_integer_pixels_0_to_255_of_any_dtype_become_uint8(dtype):
    crops = _with(0, dtype)
    crops[0, 0, 0, 0] = 255.0 if dtype is np.float64 else 255
    checked = pyfunc.checked_crops(crops, 48)
    assert checked.dtype == np.uint8
    np.testing.assert_array_equal(checked, crops.astype(np.int64))


@pytest.mark.parametrize(
    ("value", "dtype", "shown"),
    [
        (0.5, np.float64, "0.5"),
        (-0.5, np.float64, "-0.5"),
        (255.5, np.float64, "255.5"),
        (256, np.int64, "256"),
        (-1, np.int64, "-1"),
        (256.0, np.float64, "256.0"),
        (np.nan, np.float64, "nan"),
        (np.inf, np.float64, "inf"),
        (None, object, "None"),
        ("7", object, "'7'"),
        (True, object, "True"),
        (2**70, object, str(2**70)),
    ],
)
def test_a_pixel_not_an_integer_in_0_to_255_is_named_with_its_place(value, dtype, shown):
    with pytest.raises(MlflowException) as caught:
        pyfunc.checked_crops(_with(value, dtype), 48)
    assert caught.value.message == f"{PIXELS} {shown} at crop 1, row 2, column 3, channel 1"
    assert caught.value.get_http_status_code() == 400


def test_the_first_bad_pixel_is_the_one_named():
    crops = _with(0.5, np.float64, at=(1, 0, 0, 0))
    crops[0, 47, 47, 2] = 300
    with pytest.raises(MlflowException, match=rf"^{PIXELS} 300.0 at crop 0, row 47, column 47, channel 2$"):
        pyfunc.checked_crops(crops, 48)


@pytest.mark.parametrize(
    ("crops", "dtype"), [(np.ones((1, 48, 48, 3), bool), "bool"), (GRAY.astype(str), "<U3")]
)
def test_booleans_or_strings_are_not_pixels(crops, dtype):
    with pytest.raises(MlflowException) as caught:
        pyfunc.checked_crops(crops, 48)
    assert caught.value.message == f"{PIXELS} values of dtype {dtype}"


@pytest.mark.parametrize("shape", [(48, 48, 3), (1, 40, 40, 3), (1, 48, 48, 4), (1, 48, 40, 3), (0,)])
def test_a_wrong_shape_is_named(shape):
    with pytest.raises(MlflowException) as caught:
        pyfunc.checked_crops(np.zeros(shape, np.uint8), 48)
    assert caught.value.message == f"crops must have shape (N, 48, 48, 3): found {shape}"
    assert caught.value.get_http_status_code() == 400


def test_at_most_max_crops_per_request():
    assert pyfunc.checked_crops(GRAY, 48, max_crops=2) is GRAY
    with pytest.raises(MlflowException) as caught:
        pyfunc.checked_crops(np.zeros((3, 48, 48, 3), np.uint8), 48, max_crops=2)
    assert caught.value.message == "at most 2 crops per request, found 3: split the batch"
    assert caught.value.get_http_status_code() == 400


def test_the_loaded_model_checks_the_pixels_it_is_given(logged):
    model = mlflow.pyfunc.load_model("models:/m@champion")
    crops = decoded_crops(logged.test_split)
    np.testing.assert_array_equal(model.predict(crops.astype(np.float64)), model.predict(crops))
    bad = crops.astype(np.float64)
    bad[3, 10, 20, 0] = 0.5
    with pytest.raises(MlflowException, match=rf"^{PIXELS} 0.5 at crop 3, row 10, column 20, channel 0$"):
        model.predict(bad)


def test_only_the_serving_path_bounds_the_crops_per_call(logged, monkeypatch):
    model = mlflow.pyfunc.load_model("models:/m@champion")
    crops = np.zeros((pyfunc.MAX_CROPS + 1, 48, 48, 3), np.uint8)
    assert model.predict(crops).shape == (pyfunc.MAX_CROPS + 1, 98, 2)
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    with pytest.raises(MlflowException, match=rf"^at most {pyfunc.MAX_CROPS} crops per request, found"):
        model.predict(crops)
    assert model.predict(crops[: pyfunc.MAX_CROPS]).shape == (pyfunc.MAX_CROPS, 98, 2)


@pytest.mark.slow
def test_a_fresh_process_predicts_what_evaluate_computes(logged, tmp_path):
    crops = decoded_crops(logged.test_split)
    np.save(tmp_path / "crops.npy", crops)
    out, served = tmp_path / "points.npy", tmp_path / "served.npy"
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "crops.npy"), str(out), str(served)],
        env={**os.environ, "MLFLOW_TRACKING_URI": logged.tracking_uri},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    expected = evaluate_predictions(logged.test_split, logged.model_path)
    points = np.load(out)
    assert points.shape == (8, 98, 2) and points.dtype == np.float32
    assert np.abs(points - expected).max() < 1e-3
    assert np.abs(np.load(served) - expected).max() < 1e-3
    assert Path(report["package"]).parts[-3:] == ("code", "wflw_pipeline", "__init__.py")
