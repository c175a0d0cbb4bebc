"""The scale-out tracking stack: a tiny pipeline tracked and registered over HTTP by an MLflow server on
PostgreSQL with proxied artifact storage, across an outage of that server (slow: real servers)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from helpers import tiny_parquet
from mlflow.tracking import MlflowClient
from pipeline_cli import evaluate, params_file, register, registered, train
from servers import free_port, mlflow_server, postgres

from wflw_pipeline.data.dataset import load_faces

pytestmark = pytest.mark.slow


def test_pipeline_on_a_postgres_backed_server_with_an_outage(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    tiny_parquet(tmp_path, test=8)
    url = f"http://127.0.0.1:{free_port()}"
    params_file(tmp_path, uri=url, experiment="server")

    with caplog.at_level(logging.WARNING):
        train(tmp_path)
    assert "training goes on untracked" in caplog.text
    evaluate(tmp_path)
    caplog.clear()
    assert register(tmp_path) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert url in error and "\n" not in error
    assert not (tmp_path / "register" / "registered.json").exists()

    port = int(url.rsplit(":", 1)[1])
    with postgres(tmp_path / "pg") as database, mlflow_server(database, tmp_path / "artifacts", port):
        assert register(tmp_path) == 0
        first = registered(tmp_path)
        assert first["run_origin"] == "rebuilt from the DVC outputs" and first["version"] == "1"
        assert first["run_url"].startswith(f"{url}/#/experiments/")
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        experiment = client.get_experiment_by_name("server")
        assert experiment.artifact_location.startswith("mlflow-artifacts:")
        stored = {p.name for p in (tmp_path / "artifacts").rglob("*") if p.is_file()}
        assert {"per_face.parquet", "results.md", "history.csv", "model.pt", "MLmodel"} <= stored

        train(tmp_path)  # the server is up: the run is opened by train, its curves logged live
        run_id = json.loads((tmp_path / "train" / "mlflow_run.json").read_text())["run_id"]
        assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2]
        evaluate(tmp_path)
        assert register(tmp_path) == 0
        second = registered(tmp_path)
        assert (second["run_id"], second["run_origin"], second["version"]) == (
            run_id,
            "the run train opened",
            "2",
        )
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 2 and all(run.data.metrics["nme_test"] > 0 for run in runs)
        assert str(client.get_model_version_by_alias("m", "challenger").version) == "2"

        import mlflow

        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        model = mlflow.pyfunc.load_model("models:/m@challenger")
        crops = load_faces(tmp_path / "parquet" / "test.parquet").images.permute(0, 2, 3, 1).numpy()
        points = model.predict(crops)
        assert points.shape == (8, 98, 2) and points.dtype == np.float32
