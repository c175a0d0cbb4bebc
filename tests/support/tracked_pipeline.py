"""A tiny pipeline trained and evaluated in git, tracked into its own SQLite MLflow store, as pytest fixtures
(`trained`, `pipeline`), and readers of that store, for the tests of register and of mlops/.

tests/conftest.py provides `trained` (trained once a session) and `pipeline` (a fresh copy for each test) to
every test module; pytest knows them by those names, the test arguments.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import tiny_parquet
from mlflow.tracking import MlflowClient
from pipeline_cli import evaluate, params_file, train


def _git_repo(root: Path) -> None:
    """root as a git repository whose one commit holds params.yaml."""
    for args in (["init", "-q"], ["add", "params.yaml"], ["-c", "user.name=t", "-c", "user.email=t@t",
                                                            "commit", "-qm", "params"]):  # fmt: skip
        subprocess.run(["git", *args], cwd=root, check=True)


@pytest.fixture(scope="session", name="trained")
def trained_fixture(tmp_path_factory) -> Path:
    """A tiny converted, trained and evaluated pipeline in git, tracked into its own SQLite store."""
    root = tmp_path_factory.mktemp("pipeline")
    tiny_parquet(root, test=8)
    params_file(root)
    _git_repo(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        train(root)
        evaluate(root)
    return root


@pytest.fixture(name="pipeline")
def pipeline_fixture(trained, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the trained pipeline (its git repository and MLflow store) as working directory."""
    root = tmp_path / "p"
    shutil.copytree(trained, root)
    monkeypatch.chdir(root)
    return root


def mlflow_client(root: Path) -> MlflowClient:
    """A client on `root`/mlflow.db, the store params_file tracks into (runs and registry)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs(root: Path) -> list:
    """The runs of experiment `tests` in `root`/mlflow.db, oldest first."""
    client = mlflow_client(root)
    experiment = client.get_experiment_by_name("tests")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
