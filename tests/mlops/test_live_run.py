"""train's live MLflow run (mlops/live_run.py): with the tracking server down training finishes untracked
with a warning, register then fails in one line naming the server, and rebuilds the run once it is back;
an epoch's curves as metrics; the history and train's summary logged at the end, the epochs already logged
live skipped; a training stopped by SIGTERM closes its run as KILLED, and one killed outright has its run
closed by the next training of the same workspace."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import PARAMS_YAML, tiny_parquet
from pipeline_cli import evaluate, params_file, register, registered, train, wflw
from servers import free_port
from tracked_pipeline import mlflow_client, runs

from wflw_pipeline.mlops.client import connect, experiment_id
from wflw_pipeline.mlops.live_run import CURVES, close_abandoned, epoch_metrics, log_training
from wflw_pipeline.mlops.provenance import PROCESS_TAGS
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


def _training(root: Path) -> tuple[subprocess.Popen, str, Path]:
    """A `wflw train` process of 200 epochs, its run id and its log, once its first epoch is logged."""
    tiny_parquet(root, test=8)
    params = yaml.safe_load(params_file(root).read_text())
    params["train"]["epochs"] = 200
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    log = root / "train.log"
    command = [str(Path(sys.executable).with_name("wflw")), "train", "--params", "params.yaml",
               "--parquet", "parquet", "--model-dir", "model", "--train-dir", "train"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=root, stdout=out, stderr=out)
    ref, client = root / "train" / "mlflow_run.json", mlflow_client(root)
    while not (
        ref.is_file() and client.get_metric_history(json.loads(ref.read_text())["run_id"], "train_loss")
    ):
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    return proc, json.loads(ref.read_text())["run_id"], log


@pytest.mark.slow
def test_a_training_stopped_by_sigterm_closes_its_run_as_killed_in_one_line(tmp_path):
    proc, run_id, log = _training(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 143
    assert mlflow_client(tmp_path).get_run(run_id).info.status == "KILLED"
    assert log.read_text().endswith(" ERROR wflw_pipeline: wflw train: interrupted by SIGTERM\n")
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
def test_the_run_of_a_training_killed_outright_is_closed_by_the_next_one(tmp_path, monkeypatch):
    proc, killed, _ = _training(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert mlflow_client(tmp_path).get_run(killed).info.status == "RUNNING"
    (tmp_path / "train" / "mlflow_run.json").unlink()  # what `dvc repro` does before it runs train again
    monkeypatch.chdir(tmp_path)
    args = ("--parquet", "parquet", "--model-dir", "model", "--train-dir", "train", "--set", "train.epochs=1")
    assert wflw(tmp_path, "train", *args) == 0
    statuses = {run.info.run_id: run.info.status for run in runs(tmp_path)}
    assert statuses.pop(killed) == "KILLED" and list(statuses.values()) == ["FINISHED"]


def test_a_running_run_of_a_live_process_or_of_another_workspace_is_left_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(params_file(tmp_path), [])
    tracking = connect(params.tracking)
    experiment = experiment_id(tracking, "tests")
    tags = dict(zip(PROCESS_TAGS, (socket.gethostname(), str(os.getpid()), str(tmp_path)), strict=True))
    alive = tracking.client.create_run(experiment, tags=tags).info.run_id
    elsewhere = tracking.client.create_run(experiment, tags={**tags, "wflw.pid": "999999999"})
    tracking.client.set_tag(elsewhere.info.run_id, "wflw.checkout", "/another/workspace")
    dead = tracking.client.create_run(experiment, tags={**tags, "wflw.pid": "999999999"}).info.run_id
    close_abandoned(tracking, experiment)
    status = {run.info.run_id: run.info.status for run in runs(tmp_path)}
    assert status == {alive: "RUNNING", elsewhere.info.run_id: "RUNNING", dead: "KILLED"}
