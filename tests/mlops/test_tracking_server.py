"""The scale-out tracking stack: an MLflow tracking server on PostgreSQL with proxied artifact storage in a
folder or on S3 (tests/support/servers.py), and a tiny pipeline tracked and registered over HTTP by it,
across an outage of that server and of its S3 endpoint (slow: real servers)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
from helpers import tiny_parquet
from mlflow.tracking import MlflowClient
from pipeline_cli import evaluate, params_file, register, registered, train, wflw
from servers import HOST, Gate, free_port, mlflow_server, postgres, s3_server

from wflw_pipeline.errors import EXIT_REFUSED

pytestmark = pytest.mark.slow


class _Boom(Exception):
    """Raised at the end of the test body: the servers must stop on the way out of a failing test too."""


def _refuses(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) != 0


@pytest.mark.slow
def test_mlflow_server_on_postgres_with_proxied_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    artifacts = tmp_path / "artifacts"
    payload = os.urandom(4096)
    (tmp_path / "note.bin").write_bytes(payload)
    ports = []

    with pytest.raises(_Boom), postgres(tmp_path) as db, mlflow_server(db, artifacts) as url:
        ports = [urlsplit(db).port, urlsplit(url).port]
        assert db.startswith("postgresql://") and url.startswith(f"http://{HOST}:")
        client = MlflowClient(tracking_uri=url, registry_uri=url)

        experiment_id = client.create_experiment("servers")
        assert client.get_experiment(experiment_id).artifact_location.startswith("mlflow-artifacts:")
        run_id = client.create_run(experiment_id).info.run_id
        client.log_param(run_id, "lr", "0.001")
        for step, loss in enumerate([1.0, 0.5, 0.25]):
            client.log_metric(run_id, "loss", loss, step=step)
        client.log_artifact(run_id, str(tmp_path / "note.bin"), artifact_path="notes")
        client.set_terminated(run_id)

        run = client.get_run(run_id)
        assert run.data.params == {"lr": "0.001"}
        history = client.get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5), (2, 0.25)]
        # Proxied storage: the bytes went through the server into its --artifacts-destination.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        [stored] = artifacts.rglob("note.bin")
        assert stored.relative_to(artifacts).parts[:2] == (experiment_id, run_id)
        assert stored.read_bytes() == payload
        assert [f.path for f in client.list_artifacts(run_id, "notes")] == ["notes/note.bin"]
        downloaded = client.download_artifacts(run_id, "notes/note.bin", str(tmp_path / "download"))
        with open(downloaded, "rb") as f:
            assert f.read() == payload

        client.create_registered_model("wflw-servers")
        version = client.create_model_version(
            "wflw-servers", source=f"{run.info.artifact_uri}/notes", run_id=run_id
        ).version
        client.set_registered_model_alias("wflw-servers", "champion", version)
        assert client.get_model_version_by_alias("wflw-servers", "champion").version == version
        raise _Boom

    assert all(ports) and all(_refuses(port) for port in ports), f"still listening: {ports}"


LOAD_AND_PREDICT = """
import sys, mlflow
from wflw_pipeline.data.dataset import load_faces
crops = load_faces(sys.argv[1]).images.permute(0, 2, 3, 1).numpy()
print(mlflow.pyfunc.load_model("models:/m@challenger").predict(crops).shape)
"""
BUCKET = "wflw-mlflow"


def test_pipeline_on_a_postgres_backed_server_with_artifacts_on_s3_through_outages_of_both(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    tiny_parquet(tmp_path, test=8)
    url = f"http://127.0.0.1:{free_port()}"
    params_file(tmp_path, uri=url, experiment="server", timeout_s=60)

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
    with (
        s3_server(tmp_path / "s3") as s3,
        Gate(s3.endpoint) as gate,
        postgres(tmp_path / "pg") as database,
    ):
        s3.client().create_bucket(Bucket=BUCKET)
        server_env = {**s3.env(), "MLFLOW_S3_ENDPOINT_URL": gate.url}  # the server's, not the pipeline's
        destination = f"s3://{BUCKET}/mlflow"
        with mlflow_server(database, tmp_path / "mlflow", port, destination=destination, env=server_env):
            assert register(tmp_path) == 0
            first = registered(tmp_path)
            assert first["run_origin"] == "rebuilt from the DVC outputs" and first["version"] == "1"
            assert first["run_url"].startswith(f"{url}/#/experiments/")
            client = MlflowClient(tracking_uri=url, registry_uri=url)
            experiment = client.get_experiment_by_name("server")
            assert experiment.artifact_location.startswith("mlflow-artifacts:")
            stored = s3.client().list_objects_v2(Bucket=BUCKET, Prefix="mlflow/")["Contents"]
            names = {item["Key"].rsplit("/", 1)[1] for item in stored}
            assert {
                "per_face.parquet",
                "results.md",
                "history.csv",
                "model.pt",
                "model.onnx",
                "MLmodel",
            } <= names

            train(tmp_path)  # the server is up: the run is opened by train, its curves logged live
            run_id = json.loads((tmp_path / "train" / "mlflow_run.json").read_text())["run_id"]
            assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2]
            evaluate(tmp_path)

            gate.shut()  # S3 goes down: the server cannot store what register uploads
            caplog.clear()
            assert register(tmp_path) == 2
            (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert error.startswith(f"MLflow at {url}: could not upload ") and "\n" not in error, error
            assert registered(tmp_path)["version"] == "1"  # not rewritten

            gate.open()
            assert register(tmp_path) == 0
            second = registered(tmp_path)
            assert (second["run_id"], second["run_origin"], second["version"]) == (
                run_id,
                "the run train opened",
                "2",
            )
            assert sorted(v.version for v in client.search_model_versions("name = 'm'")) == ["1", "2"]
            runs = client.search_runs([experiment.experiment_id])
            assert len(runs) == 2 and all(run.data.metrics["nme_test"] > 0 for run in runs)
            assert str(client.get_model_version_by_alias("m", "challenger").version) == "2"
            # The gate reads both versions' per-face results through the server, which this machine
            # would also reach S3 for, were the downloads presigned.
            assert wflw(tmp_path, "promote", "--version", "1", "--force", "--reason", "a first champion") == 0
            assert wflw(tmp_path, "promote") in (0, EXIT_REFUSED), caplog.text

            # A user with the tracking URL and no S3 credentials: the server streams the files to it (without
            # MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false it hands out presigned URLs of its S3 endpoint).
            bare = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3_"))}
            test_split = str(tmp_path / "parquet" / "test.parquet")
            client_env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}
            done = subprocess.run(
                [sys.executable, "-c", LOAD_AND_PREDICT, test_split],
                env={**bare, **client_env},
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            assert done.stdout.splitlines()[-1] == "(8, 98, 2)"
