"""The MLflow client every command uses (mlops/client.py): the tracking URI, the experiment and its artifact
location, calls retried with a backoff then failing in one line, batches within MLflow's limits, and a damaged
or empty SQLite store refused in one line."""

from __future__ import annotations

import logging
import os

import mlflow
import pytest
from helpers import PARAMS_YAML
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from pipeline_cli import params_file, wflw

from wflw_pipeline import retry
from wflw_pipeline.errors import EXIT_USER_ERROR, exit_code
from wflw_pipeline.mlops.client import (
    BATCH,
    TrackingError,
    _chunks,
    connect,
    default_artifact_location,
    experiment_id,
    fluent,
    tracking_uri,
)
from wflw_pipeline.params import TrackingParams, load_params


def test_a_relative_sqlite_uri_is_the_project_roots_and_artifacts_go_beside_the_database(
    tmp_path, monkeypatch
):
    config = load_params(PARAMS_YAML, ["tracking.uri=sqlite:///runs/mlflow.db"]).tracking
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking_uri(config) == f"sqlite:///{tmp_path}/runs/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", "/srv/project")  # `dvc exp run` in a temporary copy
    assert tracking_uri(config) == "sqlite:////srv/project/runs/mlflow.db"
    assert (
        default_artifact_location("sqlite:////srv/project/runs/mlflow.db")
        == "file:///srv/project/runs/mlartifacts"
    )
    assert default_artifact_location("http://127.0.0.1:5000") is None


def _config(uri: str | None, retries: int = 3, timeout_s: float = 10.0) -> TrackingParams:
    return TrackingParams(enabled=True, uri=uri, experiment="tests", retries=retries, timeout_s=timeout_s)


def _no_env(monkeypatch, *names: str) -> None:
    """`names` unset for the test, and unset again after it even where the code under test sets them."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_tracking_uri_is_the_params_else_the_environments_else_the_projects_mlflow_db(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _no_env(monkeypatch, "DVC_ROOT", "MLFLOW_TRACKING_URI")
    assert tracking_uri(_config(None)) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(_config(None)) == "http://127.0.0.1:5000"
    assert tracking_uri(_config("http://10.0.0.7:5000/")) == "http://10.0.0.7:5000/"
    assert tracking_uri(_config("sqlite:////srv/runs/mlflow.db")) == "sqlite:////srv/runs/mlflow.db"
    assert tracking_uri(_config("sqlite:///:memory:")) == "sqlite:///:memory:"
    assert default_artifact_location("sqlite:///:memory:") is None


def test_connect_turns_mlflows_own_http_retries_and_presigned_downloads_off_unless_the_user_set_them(
    tmp_path, monkeypatch
):
    names = (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD",
    )
    _no_env(monkeypatch, *names, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = connect(_config(uri, retries=4, timeout_s=2.5))
    assert (tracking.uri, tracking.retries, tracking.client.tracking_uri) == (uri, 4, uri)
    assert [os.environ[name] for name in names] == ["0", "3", "false"]  # the timeout rounded up
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "true")
    connect(_config(uri, timeout_s=2.5))
    assert [os.environ[name] for name in names] == ["5", "60", "true"]


@pytest.fixture
def slept(monkeypatch) -> list[float]:
    """The delays the retry loop sleeps, recorded instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", waits.append)
    return waits


def _failing(times: int, message: str):
    """A call that raises ConnectionError(message) its first `times` calls, then returns how many it took."""
    calls = []

    def call() -> int:
        calls.append(1)
        if len(calls) <= times:
            raise ConnectionError(message)
        return len(calls)

    return call


def test_a_call_that_fails_is_retried_after_a_doubling_delay_and_returns_what_it_returns(tmp_path, slept):
    tracking = connect(_config(f"sqlite:///{tmp_path}/mlflow.db", retries=3))
    assert tracking.call("log to the run", _failing(2, "refused")) == 3
    assert slept == [0.5, 1.0]
    assert tracking.call("log to the run", lambda a, b=0: a + b, 2, b=5) == 7


def test_a_call_failing_every_try_raises_one_line_naming_what_where_and_why(tmp_path, slept):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = connect(_config(uri, retries=3))
    with pytest.raises(TrackingError) as err:
        tracking.call("close the run", _failing(3, "Connection refused:\n    [Errno 111]\n"))
    assert str(err.value) == (
        f"MLflow at {uri}: could not close the run after 3 tries "
        "(ConnectionError: Connection refused: [Errno 111])"
    )
    assert slept == [0.5, 1.0]
    assert isinstance(err.value.__cause__, ConnectionError)
    assert exit_code(err.value) == EXIT_USER_ERROR  # a PipelineError, not a transient one: `wflw` exits 2
    with pytest.raises(TrackingError) as err:
        tracking.call("search the runs", _failing(3, "x" * 300))
    assert str(err.value).endswith(f"after 3 tries (ConnectionError: {'x' * 240})")


def test_chunks_cut_a_list_into_runs_of_at_most_size():
    assert list(_chunks(list(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(_chunks(list(range(6)), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(_chunks([], 100)) == []


def test_log_batch_logs_everything_in_calls_of_at_most_mlflows_batch_limit(tmp_path, monkeypatch):
    tracking = connect(_config(f"sqlite:///{tmp_path}/mlflow.db"))
    run_id = tracking.client.create_run(experiment_id(tracking, "batches")).info.run_id
    params = {f"p{i:03d}": str(i) for i in range(150)}
    tags = {f"t{i:03d}": f"v{i}" for i in range(120)}
    curve = [Metric("loss", 1.0 / step, 1000 + step, step) for step in (1, 2, 3)]
    calls = []
    log_batch = tracking.client.log_batch

    def recording(run_id, metrics, params, tags):  # MLflow's own log_batch, its batches recorded
        calls.append((len(metrics), len(params), len(tags)))
        return log_batch(run_id, metrics=metrics, params=params, tags=tags)

    monkeypatch.setattr(tracking.client, "log_batch", recording)
    tracking.log_batch(run_id, metrics=curve, params=params, tags=tags)
    assert BATCH == 100  # 3 + 150 + 120 = 273 items: metrics first, then params, then tags
    assert calls == [(3, 97, 0), (0, 53, 47), (0, 0, 73)]
    run = tracking.client.get_run(run_id)
    assert run.data.params == params
    assert {key: value for key, value in run.data.tags.items() if key in tags} == tags
    history = tracking.client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]


def test_experiment_is_created_once_tagged_as_model_training_with_artifacts_beside_the_database(tmp_path):
    tracking = connect(_config(f"sqlite:///{tmp_path}/mlflow.db"))
    first = experiment_id(tracking, "tests")
    assert experiment_id(tracking, "tests") == first
    experiment = tracking.client.get_experiment(first)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == f"file://{tmp_path}/mlartifacts"
    assert [e.experiment_id for e in tracking.client.search_experiments(filter_string="name = 'tests'")] == [
        first
    ]


def test_fluent_points_mlflow_at_the_uri_and_restores_the_process_uris_after(tmp_path, monkeypatch):
    _no_env(monkeypatch, "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    try:
        with fluent(uri):
            assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (uri, uri)
            assert os.environ["MLFLOW_TRACKING_URI"] == uri  # what MLflow hands a subprocess
        assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
        assert mlflow.get_tracking_uri() != uri
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
        with pytest.raises(RuntimeError), fluent(uri):
            raise RuntimeError("the block failed")
        assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
        assert "MLFLOW_REGISTRY_URI" not in os.environ
        assert mlflow.get_tracking_uri() == "http://127.0.0.1:5000"
    finally:
        mlflow.set_tracking_uri(None)  # MLflow's process-wide URI back to its default for the tests after


@pytest.fixture
def store_params(tmp_path, monkeypatch):
    """params.yaml tracking into tmp_path/mlflow.db, which holds an experiment and a registered model."""
    monkeypatch.chdir(tmp_path)
    params_file(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, uri)
    client.create_experiment("tests")
    client.create_registered_model("m")
    return tmp_path


@pytest.mark.parametrize("command", [("models",), ("promote", "--version", "1"), ("rollback",)])
def test_a_damaged_sqlite_store_is_one_line_naming_the_file(store_params, command, caplog):
    database = store_params / "mlflow.db"
    os.truncate(database, 40000)
    assert wflw(store_params, *command) == EXIT_USER_ERROR
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error == (
        f"{database} is not a readable MLflow store (SQLite: database disk image is malformed): "
        "restore it from a backup, or point tracking.uri elsewhere"
    )


@pytest.mark.parametrize("command", [("models",), ("promote", "--version", "1"), ("rollback",)])
def test_an_empty_sqlite_store_is_refused_and_left_empty(store_params, command, caplog):
    database = store_params / "mlflow.db"
    database.write_bytes(b"")
    assert wflw(store_params, *command) == EXIT_USER_ERROR
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error == (
        f"{database} is empty (0 bytes), not an MLflow store: restore it from a backup, or delete it to "
        "start a new store"
    )
    assert database.stat().st_size == 0
