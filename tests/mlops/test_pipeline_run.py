"""The pipeline's MLflow run (mlops/pipeline_run.py) against a real SQLite-backed MLflow, driven through
`wflw register`: the run train opened is completed into one run with everything the pipeline knows; which
run register completes (the same outputs again: none new; a new evaluation of a cached training: a new run
naming the run that trained; no run reference: a run rebuilt from train's outputs, saying what train ran on).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from pipeline_cli import evaluate, register, registered
from tracked_pipeline import mlflow_client, runs

from wflw_pipeline.data.contract import data_identity
from wflw_pipeline.mlops import pipeline_run, provenance
from wflw_pipeline.params import load_params

SUBSET_METRICS = ("nme_test", "nme_pose", "nme_expression", "nme_illumination", "nme_makeup", "nme_occlusion")


def test_a_pipeline_run_is_one_complete_mlflow_run(pipeline):
    assert register(pipeline) == 0
    (run,) = runs(pipeline)
    client = mlflow_client(pipeline)
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
    assert len(runs(pipeline)) == 1
    assert len(mlflow_client(pipeline).search_model_versions("name = 'm'")) == 1


def test_a_new_evaluation_of_a_cached_training_is_a_new_complete_run(pipeline):
    assert register(pipeline) == 0
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    params["evaluate"]["flip_test"] = False
    (pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    evaluate(pipeline)
    assert register(pipeline) == 0
    first, second = runs(pipeline)
    assert second.data.tags["wflw.trained_in_run"] == first.info.run_id
    client = mlflow_client(pipeline)
    assert [m.step for m in client.get_metric_history(second.info.run_id, "train_loss")] == [1, 2]
    assert second.data.metrics["nme_test"] != first.data.metrics["nme_test"]
    assert second.data.params == first.data.params | {"evaluate.flip_test": "false"}
    assert str(client.get_model_version_by_alias("m", "challenger").version) == "2"


def test_a_rebuilt_run_says_what_train_ran_on_not_the_machine_register_runs_on(pipeline):
    metrics_path = pipeline / "train" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    assert (metrics["device"], metrics["device_name"]) == ("cpu", "cpu")  # this training's machine
    gpu = {"device": "cuda", "device_name": "NVIDIA H200", "torch_version": "2.99.0+cu999"}
    metrics_path.write_text(json.dumps(metrics | gpu))  # as if trained on a GPU box
    (pipeline / "train" / "mlflow_run.json").unlink()

    assert register(pipeline) == 0

    assert registered(pipeline)["run_origin"] == "rebuilt from the DVC outputs"
    tags = runs(pipeline)[-1].data.tags
    assert (tags["device"], tags["device.name"], tags["torch.version"]) == tuple(gpu.values())


def test_result_metrics_flatten_evaluates_metrics_and_skip_what_it_did_not_compute():
    evaluation = {
        "test": {"n": 8, "nme": 4.0, "fr": 0.125, "auc": 0.5},
        "pose": {"n": 2, "nme": 7.0, "fr": None, "auc": 0.25},
        "blur": None,
        "val": {"n": 4, "nme": 3.5},
        "mean_shape": {"nme": 9.0},
        "flip_test": True,
    }
    assert pipeline_run.result_metrics(evaluation) == {
        "nme_test": 4.0,
        "fr_test": 0.125,
        "auc_test": 0.5,
        "nme_pose": 7.0,
        "auc_pose": 0.25,
        "nme_val": 3.5,
        "nme_mean_shape": 9.0,
    }
    assert pipeline_run.result_metrics({}) == {}


def test_run_url_is_the_mlflow_ui_page_of_a_servers_run_and_none_for_a_database():
    assert (
        pipeline_run.run_url("http://127.0.0.1:5000/", "3", "abc")
        == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    )
    assert (
        pipeline_run.run_url("https://mlflow.example", "1", "f0")
        == "https://mlflow.example/#/experiments/1/runs/f0"
    )
    assert pipeline_run.run_url("sqlite:////srv/mlflow.db", "3", "abc") is None
