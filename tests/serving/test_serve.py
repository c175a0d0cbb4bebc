"""From the registry: register attaches the checked ONNX file to the version; `mlflow models serve` answers
a POST of face crops as the checkpoint does and refuses bad pixels, shapes and batches with a 400; `wflw
predict` takes a models:/ or runs:/ URI."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from helpers import decoded_crops, tiny_parquet
from mlflow.tracking import MlflowClient
from pipeline_cli import evaluate, params_file, register, registered, train, wflw
from servers import HOST, background, free_port, wait_healthy

from wflw_pipeline.mlops import pyfunc
from wflw_pipeline.serving.export import OnnxPredictor
from wflw_pipeline.serving.inference import LandmarkPredictor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def champion(tmp_path_factory) -> Path:
    """A tiny pipeline tracked into root/mlflow.db, registered as `m` (version 1, with ONNX) and promoted."""
    root = tmp_path_factory.mktemp("serve")
    tiny_parquet(root, test=8)
    params_file(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(sys, "path", list(sys.path))  # loading a model with code/ prepends to sys.path
        train(root)
        evaluate(root)
        assert register(root) == 0
        assert wflw(root, "promote", "--force", "--reason", "a tiny test model") == 0
    return root


def _uri(root: Path) -> str:
    return f"sqlite:///{root}/mlflow.db"


def test_register_attaches_the_onnx_file_checked_against_pytorch(champion, tmp_path):
    version = MlflowClient(_uri(champion), _uri(champion)).get_model_version("m", "1")
    assert (
        version.tags["wflw.onnx.path"] == "artifacts/model.onnx"
        and version.tags["wflw.onnx.checked_crops"] == "8"
    )
    assert float(version.tags["wflw.onnx.max_abs_diff_px"]) < 1e-3
    assert registered(champion)["onnx"] == "artifacts/model.onnx"
    mlflow.set_registry_uri(_uri(champion))
    try:
        files = Path(mlflow.artifacts.download_artifacts("models:/m@champion", dst_path=str(tmp_path)))
    finally:
        mlflow.set_registry_uri(None)
    crops = decoded_crops(champion / "parquet" / "test.parquet")
    expected = LandmarkPredictor.load(champion / "model" / "model.pt").predict(crops)
    assert (
        np.abs(OnnxPredictor(files / "artifacts" / "model.onnx", 48).predict(crops) - expected).max() < 1e-3
    )


def _post(url: str, crops: list) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of POSTing {"inputs": crops} to the server's /invocations."""
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps({"inputs": crops}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def _with(crops: np.ndarray, at: tuple[int, ...], value: float) -> list:
    listed = crops.tolist()
    listed[at[0]][at[1]][at[2]][at[3]] = value
    return listed


def test_mlflow_serves_the_champion_over_rest(champion, tmp_path):
    port = free_port()
    url = f"http://{HOST}:{port}"
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": _uri(champion),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # it runs `uvicorn`
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/m@champion",
               "--env-manager", "local", "-h", HOST, "-p", str(port), "-w", "1"]  # fmt: skip
    crops = decoded_crops(champion / "parquet" / "test.parquet")
    requests = {
        "fraction": _with(crops, (0, 1, 2, 0), 0.5),
        "above": _with(crops, (5, 47, 0, 2), 256),
        "below": _with(crops, (7, 0, 0, 1), -1),
        "size": crops[:, :40, :40].tolist(),
        "many": np.zeros((pyfunc.MAX_CROPS + 1, 48, 48, 3), np.uint8).tolist(),
        "valid": crops.tolist(),
    }
    with background(command, tmp_path, env, log) as proc:
        wait_healthy(f"{url}/ping", proc, log)
        answers = {name: _post(url, body) for name, body in requests.items()}
    pixels, limit = "crops must be integers in 0..255: found", pyfunc.MAX_CROPS
    refused = {
        "fraction": f"{pixels} 0.5 at crop 0, row 1, column 2, channel 0",
        "above": f"{pixels} 256 at crop 5, row 47, column 0, channel 2",
        "below": f"{pixels} -1 at crop 7, row 0, column 0, channel 1",
        "size": "crops must have shape (N, 48, 48, 3): found (8, 40, 40, 3)",
        "many": f"at most {limit} crops per request, found {limit + 1}: split the batch",
    }
    for name, message in refused.items():
        status, answer = answers[name]
        assert (status, answer["error_code"]) == (400, "INVALID_PARAMETER_VALUE"), (name, answer)
        assert answer["message"].endswith(f"\nError: {message}"), (name, answer["message"][-300:])
    status, answer = answers["valid"]
    points = np.array(answer["predictions"], np.float32)
    expected = LandmarkPredictor.load(champion / "model" / "model.pt").predict(crops)
    assert status == 200 and points.shape == (8, 98, 2)
    assert np.abs(points - expected).max() < 1e-3


def test_predict_takes_the_champion_or_a_run_as_the_model(champion, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(champion)
    monkeypatch.setattr(sys, "path", list(sys.path))
    Image.new("RGB", (200, 160), (100, 110, 120)).save(tmp_path / "photo.jpg")
    run_id = registered(champion)["run_id"]
    box = ["--bbox", "40,30,150,140"]
    local = ["--model", str(champion / "model" / "model.pt")]
    assert (
        wflw(champion, "predict", str(tmp_path / "photo.jpg"), *box, *local, "--out", str(tmp_path / "a"))
        == 0
    )
    assert wflw(champion, "predict", str(tmp_path / "photo.jpg"), *box, "--out", str(tmp_path / "b")) == 0
    run = ["--model", f"runs:/{run_id}/model"]
    assert (
        wflw(champion, "predict", str(tmp_path / "photo.jpg"), *box, *run, "--out", str(tmp_path / "c")) == 0
    )
    found = {name: json.loads((tmp_path / name / "photo.jpg.json").read_text()) for name in "abc"}
    assert found["b"]["model"] == "models:/m@champion" and found["c"]["model"] == f"runs:/{run_id}/model"
    assert found["a"]["faces"] == found["b"]["faces"] == found["c"]["faces"]
    missing = ["--model", "models:/m@nobody", "--out", str(tmp_path / "d")]
    assert wflw(champion, "predict", str(tmp_path / "photo.jpg"), *box, *missing) == 2
