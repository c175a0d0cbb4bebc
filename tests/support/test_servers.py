"""The scale-out tracking stack for end-to-end tests: PostgreSQL, and an MLflow tracking server on it with
proxied artifact storage (tests/servers.py)."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest
from mlflow.tracking import MlflowClient
from servers import HOST, free_port, mlflow_server, postgres


class _Boom(Exception):
    """Raised at the end of the test body: the servers must stop on the way out of a failing test too."""


def _refuses(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) != 0


def test_free_port_is_bindable_on_loopback():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind((HOST, port))


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
