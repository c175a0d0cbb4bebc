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

from wflw_pipeline.core import engine
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


PIXELS = "crops must be integers in 0..255: found"


def test_the_loaded_model_checks_the_pixels_it_is_given(logged):
    model = mlflow.pyfunc.load_model("models:/m@champion")
    crops = decoded_crops(logged.test_split)
    np.testing.assert_array_equal(model.predict(crops.astype(np.float64)), model.predict(crops))
    bad = crops.astype(np.float64)
    bad[3, 10, 20, 0] = 0.5
    with pytest.raises(MlflowException, match=rf"^{PIXELS} 0.5 at crop 3, row 10, column 20, channel 0$"):
        model.predict(bad)


@pytest.mark.parametrize(
    "crops", [np.full((1, 48, 48, 3), 0.5), np.zeros((1, 40, 40, 3), np.uint8), np.ones((1, 48, 48, 3), bool)]
)
def test_bad_crops_are_an_invalid_parameter_with_the_core_message(logged, crops):
    model = mlflow.pyfunc.load_model("models:/m@champion")
    with pytest.raises(engine.InferenceError) as core:
        engine.checked_crops(crops, 48)
    with pytest.raises(MlflowException) as caught:
        model.predict(crops)
    assert (caught.value.error_code, caught.value.message) == ("INVALID_PARAMETER_VALUE", str(core.value))
    assert caught.value.get_http_status_code() == 400


def test_only_the_serving_path_bounds_the_crops_per_call(logged, monkeypatch):
    model = mlflow.pyfunc.load_model("models:/m@champion")
    crops = np.zeros((pyfunc.MAX_CROPS + 1, 48, 48, 3), np.uint8)
    assert model.predict(crops).shape == (pyfunc.MAX_CROPS + 1, 98, 2)
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    with pytest.raises(MlflowException) as caught:
        model.predict(crops)
    many = f"at most {pyfunc.MAX_CROPS} crops per request, found {pyfunc.MAX_CROPS + 1}: split the batch"
    assert (caught.value.error_code, caught.value.message) == ("INVALID_PARAMETER_VALUE", many)
    assert model.predict(crops[: pyfunc.MAX_CROPS]).shape == (pyfunc.MAX_CROPS, 98, 2)


def test_a_long_request_is_refused_after_its_shape_and_before_its_pixels(logged, monkeypatch):
    model = mlflow.pyfunc.load_model("models:/m@champion")
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    n = pyfunc.MAX_CROPS + 1
    with pytest.raises(MlflowException, match=r"^crops must have shape \(N, 48, 48, 3\): found \(257, 40"):
        model.predict(np.zeros((n, 40, 40, 3), np.uint8))
    with pytest.raises(MlflowException, match=rf"^at most {pyfunc.MAX_CROPS} crops per request, found {n}"):
        model.predict(np.full((n, 48, 48, 3), 0.5))


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
