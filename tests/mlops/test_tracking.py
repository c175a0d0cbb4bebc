"""MLflow tracking and registry against a real SQLite-backed MLflow: what a pipeline run records, register's
choice of run, promotion's gate, rollback, and training with the tracking server down."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import PARAMS_YAML, tiny_parquet
from mlflow.tracking import MlflowClient
from pipeline_cli import evaluate, params_file, register, registered, train, wflw
from servers import free_port

from wflw_pipeline.data.contract import data_identity
from wflw_pipeline.mlops import provenance
from wflw_pipeline.mlops.client import default_artifact_location, tracking_uri
from wflw_pipeline.params import load_params

SUBSET_METRICS = ("nme_test", "nme_pose", "nme_expression", "nme_illumination", "nme_makeup", "nme_occlusion")


def _git_repo(root: Path) -> None:
    """root as a git repository whose one commit holds params.yaml."""
    for args in (["init", "-q"], ["add", "params.yaml"], ["-c", "user.name=t", "-c", "user.email=t@t",
                                                            "commit", "-qm", "params"]):  # fmt: skip
        subprocess.run(["git", *args], cwd=root, check=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
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


@pytest.fixture
def pipeline(trained, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the trained pipeline (its git repository and MLflow store) as working directory."""
    root = tmp_path / "p"
    shutil.copytree(trained, root)
    monkeypatch.chdir(root)
    return root


def _client(root: Path) -> MlflowClient:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(root: Path) -> list:
    client = _client(root)
    experiment = client.get_experiment_by_name("tests")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_a_pipeline_run_is_one_complete_mlflow_run(pipeline):
    assert register(pipeline) == 0
    (run,) = _runs(pipeline)
    client = _client(pipeline)
    params = load_params(pipeline / "params.yaml")
    assert run.info.run_name == provenance.run_name(params) == "r18-32-wing-synthetic"
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.002" and run.data.params["model.arch"] == "resnet18"
    assert run.data.params["train.milestones"] == "[15, 18]" and run.data.params["model.input_size"] == "32"
    assert set(provenance.flatten(params.to_dict())) == set(run.data.params)
    for curve in ("train_loss", "val_nme", "lr", "images_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, curve)] == [1, 2], curve
    evaluation = json.loads((pipeline / "eval" / "metrics.json").read_text())
    for name in (*SUBSET_METRICS, "nme_blur"):
        assert run.data.metrics[name] == pytest.approx(evaluation[name.removeprefix("nme_")]["nme"])
    assert run.data.metrics["fr_test"] == pytest.approx(evaluation["test"]["fr"])
    assert run.data.metrics["auc_test"] == pytest.approx(evaluation["test"]["auc"])
    assert run.data.metrics["nme_mean_shape"] == pytest.approx(evaluation["mean_shape"]["nme"])
    identity = data_identity(pipeline / "parquet" / "train.parquet")
    tags = run.data.tags
    assert tags["data.source"] == identity["source"]
    assert tags["data.images_sha256"] == identity["archives"]["WFLW_images.tar.gz"]
    assert tags["data.annotations_sha256"] == identity["archives"]["WFLW_annotations.tar.gz"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pipeline, capture_output=True, text=True)
    assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert tags["git.dirty"] == "false"
    assert (tags["device"], tags["device.name"]) == ("cpu", "cpu")
    assert tags["torch.version"] and tags["wflw.stage"] == "registered"
    assert tags["mlflow.source.name"] == "wflw train"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == provenance.data_digest(identity)
    assert dataset.dataset.name == f"wflw-{params.data.source}"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    artifacts = {
        a.path
        for folder in ("evaluation", "training")
        for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {"evaluation/results.md", "evaluation/per_face.parquet", "evaluation/ced.png",
            "evaluation/best_worst.png", "evaluation/nme_subsets.png", "evaluation/ced.csv",
            "evaluation/metrics.json", "training/history.csv",
            "training/metrics.json"} <= artifacts  # fmt: skip
    version = client.get_model_version_by_alias("m", "challenger")
    assert version.run_id == run.info.run_id and str(version.version) == "1"
    assert float(version.tags["nme_test"]) == pytest.approx(evaluation["test"]["nme"], rel=1e-5)
    assert version.tags["data.images_sha256"] == tags["data.images_sha256"]
    assert json.loads(version.tags["data.identity"]) == data_identity(pipeline / "parquet" / "test.parquet")
    assert registered(pipeline)["version"] == "1"


def test_register_again_creates_no_run_and_no_version(pipeline):
    assert register(pipeline) == 0
    assert register(pipeline) == 0
    assert len(_runs(pipeline)) == 1
    assert len(_client(pipeline).search_model_versions("name = 'm'")) == 1


def test_a_new_evaluation_of_a_cached_training_is_a_new_complete_run(pipeline):
    assert register(pipeline) == 0
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    params["evaluate"]["flip_test"] = False
    (pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    evaluate(pipeline)
    assert register(pipeline) == 0
    first, second = _runs(pipeline)
    assert second.data.tags["wflw.trained_in_run"] == first.info.run_id
    client = _client(pipeline)
    assert [m.step for m in client.get_metric_history(second.info.run_id, "train_loss")] == [1, 2]
    assert second.data.metrics["nme_test"] != first.data.metrics["nme_test"]
    assert second.data.params == first.data.params | {"evaluate.flip_test": "false"}
    assert str(client.get_model_version_by_alias("m", "challenger").version) == "2"


def test_tracking_disabled_imports_no_mlflow(tmp_path):
    tiny_parquet(tmp_path, test=8)
    params_file(tmp_path, enabled=False)
    script = (
        "import sys\nfrom wflw_pipeline import cli\n"
        f"p = ['--params', {str(tmp_path / 'params.yaml')!r}]\n"
        f"assert cli.main(['train', '--parquet', {str(tmp_path / 'parquet')!r}, '--model-dir', "
        f"{str(tmp_path / 'model')!r}, '--train-dir', {str(tmp_path / 'train')!r}, *p]) == 0\n"
        f"assert cli.main(['register', '--out', {str(tmp_path / 'register')!r}, *p]) == 0\n"
        "assert not [m for m in sys.modules if m.startswith('mlflow')], 'mlflow imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert json.loads((tmp_path / "train" / "mlflow_run.json").read_text())["run_id"] is None
    assert json.loads((tmp_path / "register" / "registered.json").read_text())["run_id"] is None
    assert not (tmp_path / "mlflow.db").exists()


def test_server_down_training_finishes_register_fails_then_rebuilds(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    tiny_parquet(tmp_path, test=8)
    down = f"http://127.0.0.1:{free_port()}"
    params_file(tmp_path, uri=down)
    with caplog.at_level(logging.WARNING):
        train(tmp_path)
    assert (tmp_path / "model" / "model.pt").is_file() and (tmp_path / "train" / "history.csv").is_file()
    assert json.loads((tmp_path / "train" / "mlflow_run.json").read_text())["run_id"] is None
    assert "training goes on untracked" in caplog.text
    evaluate(tmp_path)
    caplog.clear()
    assert register(tmp_path) == 2
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert down in error.getMessage() and "\n" not in error.getMessage()
    params_file(tmp_path)
    assert register(tmp_path) == 0
    (run,) = _runs(tmp_path)
    assert run.data.tags["wflw.rebuilt"] == "true"
    steps = [m.step for m in _client(tmp_path).get_metric_history(run.info.run_id, "val_nme")]
    assert steps == [1, 2]
    assert register(tmp_path) == 0  # the rebuilt run is found again: no second run, no second version
    assert registered(tmp_path)["run_origin"] == "completed before with these outputs"
    assert len(_runs(tmp_path)) == 1 and len(_client(tmp_path).search_model_versions("name = 'm'")) == 1


def test_a_corrupt_model_fails_register_in_one_line(pipeline, caplog):
    (pipeline / "model" / "model.pt").write_bytes(b"not a checkpoint")
    assert register(pipeline) == 2
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "model.pt" in error.getMessage() and "cannot read a trained model" in error.getMessage()


def _variant(root: Path, name: str, delta: float) -> str:
    """A copy of eval/ whose per-face NME (and the NMEs in metrics.json) are shifted by `delta` points."""
    out = root / name
    shutil.copytree(root / "eval", out)
    table = pq.read_table(out / "per_face.parquet")
    shifted = pc.add(table.column("nme"), delta)
    pq.write_table(
        table.set_column(table.schema.get_field_index("nme"), "nme", shifted), out / "per_face.parquet"
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for split in metrics.values():
        if isinstance(split, dict) and split.get("nme") is not None and "n" in split:
            split["nme"] += delta
    (out / "metrics.json").write_text(json.dumps(metrics))
    return name


def test_promotion_gate_force_and_rollback(pipeline, capsys):
    assert register(pipeline) == 0
    assert wflw(pipeline, "promote") == 0
    assert "champion -> version 1 (first)" in capsys.readouterr().out
    assert register(pipeline, _variant(pipeline, "better", -1.0)) == 0
    assert wflw(pipeline, "promote") == 0
    out = capsys.readouterr().out
    assert "PROMOTE" in out and "champion -> version 2 (promote)" in out and "v1" in out
    assert register(pipeline, _variant(pipeline, "worse", +1.0)) == 0
    assert wflw(pipeline, "promote", "--version", "3") == 1
    out = capsys.readouterr().out
    assert "REFUSE" in out and "nme_blur" in out and "v3" in out
    other = pipeline / "other"
    tiny_parquet(other, test=9)
    assert register(pipeline, _variant(pipeline, "other_eval", -2.0), parquet="other/parquet") == 0
    assert wflw(pipeline, "promote", "--version", "4") != 0
    assert "other test data" in capsys.readouterr().out
    client = _client(pipeline)
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    assert wflw(pipeline, "promote", "--version", "3", "--force") == 2
    assert wflw(pipeline, "promote", "--version", "3", "--force", "--reason", "hotfix for demo") == 0
    assert str(client.get_model_version_by_alias("m", "champion").version) == "3"
    forced = client.get_model_version("m", "3").tags
    assert forced["wflw.promotion_reason"] == "hotfix for demo" and forced["wflw.promoted_from"] == "2"
    assert client.get_model_version("m", "2").tags["wflw.demoted_by"] == "3"
    assert wflw(pipeline, "rollback") == 0
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    capsys.readouterr()
    assert wflw(pipeline, "models") == 0
    listing = capsys.readouterr().out
    rows = listing.splitlines()[2:6]
    assert [row.split()[:2] for row in rows] == [
        ["1", "-"],
        ["2", "champion"],
        ["3", "-"],
        ["4", "challenger"],
    ]
    assert "force" in listing and "rollback" in listing and "hotfix for demo" in listing


def test_missing_inputs_fail_in_one_line_and_a_missing_run_id_rebuilds_the_run(pipeline, caplog):
    per_face = pipeline / "eval" / "per_face.parquet"
    per_face.rename(pipeline / "per_face.parquet")
    assert register(pipeline) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error == f"{per_face} not found: run `wflw evaluate` (or `dvc repro`) first"
    (pipeline / "per_face.parquet").rename(per_face)
    (pipeline / "train" / "mlflow_run.json").unlink()
    assert register(pipeline) == 0
    assert registered(pipeline)["run_origin"] == "rebuilt from the DVC outputs"
    assert len(_runs(pipeline)) == 2


def test_a_rebuilt_run_says_what_train_ran_on_not_the_machine_register_runs_on(pipeline):
    metrics_path = pipeline / "train" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    assert (metrics["device"], metrics["device_name"]) == ("cpu", "cpu")  # this training's machine
    gpu = {"device": "cuda", "device_name": "NVIDIA H200", "torch_version": "2.99.0+cu999"}
    metrics_path.write_text(json.dumps(metrics | gpu))  # as if trained on a GPU box
    (pipeline / "train" / "mlflow_run.json").unlink()

    assert register(pipeline) == 0

    assert registered(pipeline)["run_origin"] == "rebuilt from the DVC outputs"
    tags = _runs(pipeline)[-1].data.tags
    assert (tags["device"], tags["device.name"], tags["torch.version"]) == tuple(gpu.values())


def test_run_names_say_what_ran_and_which_dvc_experiment():
    params = load_params(PARAMS_YAML, ["model.arch=resnet50", "model.input_size=256", "data.source=wflw"])
    assert provenance.run_name(params, {}) == "r50-256-wing-wflw"
    assert provenance.run_name(params, {"DVC_EXP_NAME": "lr-sweep-3"}) == "r50-256-wing-wflw-lr-sweep-3"


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
