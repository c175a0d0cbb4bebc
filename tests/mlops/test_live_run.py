"""train's live MLflow run (mlops/live_run.py): with the tracking server down training finishes untracked
with a warning, register then fails in one line naming the server, and rebuilds the run once it is back;
an epoch's curves as metrics; the history and train's summary logged at the end, the epochs already logged
live skipped."""

from __future__ import annotations

import json
import logging

from helpers import PARAMS_YAML, tiny_parquet
from pipeline_cli import evaluate, params_file, register, registered, train
from servers import free_port
from tracked_pipeline import mlflow_client, runs

from wflw_pipeline.mlops.client import connect, experiment_id
from wflw_pipeline.mlops.live_run import CURVES, epoch_metrics, log_training
from wflw_pipeline.params import load_params


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
    (run,) = runs(tmp_path)
    assert run.data.tags["wflw.rebuilt"] == "true"
    steps = [m.step for m in mlflow_client(tmp_path).get_metric_history(run.info.run_id, "val_nme")]
    assert steps == [1, 2]
    assert register(tmp_path) == 0  # the rebuilt run is found again: no second run, no second version
    assert registered(tmp_path)["run_origin"] == "completed before with these outputs"
    assert len(runs(tmp_path)) == 1 and len(mlflow_client(tmp_path).search_model_versions("name = 'm'")) == 1


def test_epoch_metrics_are_the_curves_at_step_epoch_without_an_empty_val_nme():
    row = {
        "epoch": "3",
        "train_loss": "0.25",
        "val_nme": "",
        "lr": "0.001",
        "images_per_s": "120.5",
        "x": "1",
    }
    assert [(m.key, m.value, m.step) for m in epoch_metrics(row)] == [
        ("train_loss", 0.25, 3),
        ("lr", 0.001, 3),
        ("images_per_s", 120.5, 3),
    ]
    row["val_nme"] = "6.5"
    assert [m.key for m in epoch_metrics(row)] == ["train_loss", "val_nme", "lr", "images_per_s"]


def test_log_training_logs_the_epochs_not_logged_live_the_summary_and_both_files(tmp_path):
    history = tmp_path / "history.csv"
    history.write_text(
        "epoch,train_loss,val_nme,lr,images_per_s\n1,0.5,8.0,0.002,100\n2,0.25,6.0,0.001,110\n3,0.125,5.5,0.0005,90\n"
    )
    summary = tmp_path / "metrics.json"
    facts = {"selected_epoch": 3, "val_nme": 5.5, "baseline_val_nme": None, "train_seconds": 12.0}
    summary.write_text(json.dumps(facts | {"images_per_s": 100.0, "device": "cpu"}))
    tracking = connect(load_params(PARAMS_YAML, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]).tracking)
    run_id = tracking.client.create_run(experiment_id(tracking, "tests")).info.run_id

    log_training(tracking, run_id, history, summary, frozenset({1}))  # epoch 1 was logged live

    client = tracking.client
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")) == [
        (2, 0.25),
        (3, 0.125),
    ]
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_nme")) == [2, 3]
    metrics = client.get_run(run_id).data.metrics
    assert {key: metrics[key] for key in set(metrics) - set(CURVES)} == {
        "selected_epoch": 3.0,
        "nme_val_selected": 5.5,
        "train_seconds": 12.0,
        "train_images_per_s_median": 100.0,
    }  # baseline_val_nme was not computed: no nme_val_mean_shape
    assert sorted(a.path for a in client.list_artifacts(run_id, "training")) == [
        "training/history.csv",
        "training/metrics.json",
    ]
