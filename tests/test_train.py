import json
import logging
import math
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from file_limit import wflw_with_file_limit
from helpers import default_params, tiny_parquet
from paths import PARAMS_YAML

from wflw_pipeline import cli, train
from wflw_pipeline.core import runtime
from wflw_pipeline.outputs import TrainOutputs
from wflw_pipeline.params import Params


def _params(**train_overrides) -> Params:
    base = default_params()
    return replace(
        base,
        model=replace(base.model, arch="resnet18", pretrained="none", input_size=32),
        train=replace(
            base.train,
            **{
                "epochs": 2,
                "batch_size": 4,
                "lr": 1e-3,
                "warmup_iters": 2,
                "device": "cpu",
                "compile": False,
                **train_overrides,
            },
        ),
    )


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory) -> Path:
    return tiny_parquet(tmp_path_factory.mktemp("data"), test=3)


def _outputs(tmp_path: Path) -> TrainOutputs:
    return TrainOutputs(tmp_path / "model", tmp_path / "train")


def test_train_writes_model_history_metrics_and_a_checkpoint(tmp_path, parquet_dir):
    metrics = train.run_train(_params(), parquet_dir, _outputs(tmp_path))
    out = _outputs(tmp_path)
    history = out.history.read_text().splitlines()
    assert history[0] == "epoch,lr,train_loss,val_nme,seconds,images_per_s"
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2"]
    assert json.loads(out.metrics.read_text()) == metrics
    assert metrics["epochs"] == 2 and metrics["selected_by"] == "val_nme"
    # the selected epoch is the one whose val NME in history.csv is the lowest (first one on a tie)
    val_nme = [float(line.split(",")[3]) for line in history[1:]]
    assert metrics["selected_epoch"] == 1 + val_nme.index(min(val_nme))
    assert metrics["val_nme"] == pytest.approx(min(val_nme), rel=1e-5)  # history.csv keeps 6 digits
    assert math.isfinite(metrics["val_nme"]) and math.isfinite(metrics["baseline_val_nme"])
    ran_on = {"device": "cpu", "device_name": "cpu", "torch_version": torch.__version__}
    assert {key: metrics[key] for key in ran_on} == ran_on  # what register's rebuilt run is tagged with
    saved = torch.load(out.model, weights_only=True)
    assert saved["epoch"] == metrics["selected_epoch"]
    assert saved["arch"] == "resnet18" and saved["view"] == {
        "crop_size": 48,
        "context": 1.5,
        "input_size": 32,
    }
    assert Params.from_dict(saved["params"]) == _params()
    assert torch.load(out.checkpoint, weights_only=True)["epoch"] == 2


def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path, parquet_dir, monkeypatch):
    params = _params(epochs=3, threads=1)
    straight = train.run_train(params, parquet_dir, _outputs(tmp_path / "straight"))

    real_write = train.write_history

    def killed_after_first_epoch(rows, path):
        real_write(rows, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "write_history", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.run_train(params, parquet_dir, _outputs(tmp_path / "killed"))
    monkeypatch.setattr(train, "write_history", real_write)
    assert torch.load(_outputs(tmp_path / "killed").checkpoint, weights_only=True)["epoch"] == 1
    resumed = train.run_train(params, parquet_dir, _outputs(tmp_path / "killed"))

    assert resumed["epochs"] == 3
    assert len(_outputs(tmp_path / "killed").history.read_text().splitlines()) == 1 + 3
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-4)
    assert resumed["val_nme"] == pytest.approx(straight["val_nme"], rel=1e-4)


def test_a_checkpoint_of_other_params_is_not_resumed(tmp_path, parquet_dir, caplog):
    train.run_train(_params(epochs=1), parquet_dir, _outputs(tmp_path))
    metrics = train.run_train(_params(epochs=1, lr=5e-4), parquet_dir, _outputs(tmp_path))
    assert "written with other params, data or code: starting afresh" in caplog.text
    assert metrics["epochs"] == 1
    # epochs == 1 holds whether or not it resumed (the old checkpoint is at epoch 1 already): only a
    # fresh run trains and rewrites the checkpoint, with the new lr in its params
    assert torch.load(_outputs(tmp_path).checkpoint, weights_only=True)["params"]["train"]["lr"] == 5e-4


def test_the_epoch_with_the_lowest_val_nme_is_selected_and_saved(tmp_path, parquet_dir, monkeypatch):
    """val NME scripted as 5, 3, 4 %: epoch 2 is the only right choice (neither the first nor the last)."""
    scripted = iter([5.0, 3.0, 4.0])
    weights = []

    def scripted_val_nme(model, *args, **kwargs):
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(scripted)

    monkeypatch.setattr(train, "val_nme", scripted_val_nme)
    out = _outputs(tmp_path)
    metrics = train.run_train(_params(epochs=3), parquet_dir, out)

    assert (metrics["selected_epoch"], metrics["selected_by"], metrics["val_nme"]) == (2, "val_nme", 3.0)
    assert [line.split(",")[3] for line in out.history.read_text().splitlines()[1:]] == ["5", "3", "4"]
    saved = torch.load(out.model, weights_only=True)
    assert saved["epoch"] == 2
    assert all(torch.equal(saved["model"][k], v) for k, v in weights[1].items())  # epoch 2's weights
    assert not all(torch.equal(saved["model"][k], v) for k, v in weights[2].items())  # not the last's


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, parquet_dir, monkeypatch):
    calls = {"n": 0}
    real_loss = train.loss_from_params

    def poisoned_after_two_steps(config, input_size):
        loss_fn = real_loss(config, input_size)

        def poisoned(pred, target):
            calls["n"] += 1
            return loss_fn(pred, target) * (float("nan") if calls["n"] > 2 else 1.0)

        return poisoned

    monkeypatch.setattr(train, "loss_from_params", poisoned_after_two_steps)
    out = _outputs(tmp_path)
    with pytest.raises(
        train.TrainError, match=r"epoch 2: the training loss became NaN or infinite .* is kept"
    ):
        train.run_train(_params(), parquet_dir, out)
    assert torch.load(out.checkpoint, weights_only=True)["epoch"] == 1
    assert not out.model.exists()


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_trains_and_writes_one_checkpoint(tmp_path, parquet_dir):
    import subprocess

    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(_params(epochs=1).to_dict()))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "wflw_pipeline.cli",
        "train",
        "--params",
        str(params_file),
        "--set",
        "train.threads=1",
        "--set",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "--parquet",
        str(parquet_dir),
        "--model-dir",
        str(tmp_path / "model"),
        "--train-dir",
        str(tmp_path / "train"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "checkpoint.pt",
        "history.csv",
        "metrics.json",
        "mlflow_run.json",
    ]
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("wflw-deeppose").experiment_id])
    assert run.info.run_id == json.loads((tmp_path / "train" / "mlflow_run.json").read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]  # rank 0 only
    assert torch.load(tmp_path / "train" / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_a_checkpoint_interval_saves_the_first_and_last_epochs_only(tmp_path, parquet_dir, monkeypatch):
    params = _params(epochs=3, checkpoint_interval_s=3600.0)
    out = _outputs(tmp_path)
    real_write = train.write_history
    calls = {"n": 0}

    def killed_after_second_epoch(rows, path):
        real_write(rows, path)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "write_history", killed_after_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.run_train(params, parquet_dir, out)
    assert torch.load(out.checkpoint, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(train, "write_history", real_write)
    metrics = train.run_train(params, parquet_dir, out)
    assert metrics["epochs"] == 3
    assert torch.load(out.checkpoint, weights_only=True)["epoch"] == 3


def test_a_finished_checkpoint_is_never_resumed(tmp_path, parquet_dir, caplog):
    caplog.set_level(logging.INFO, logger="wflw_pipeline")
    out = _outputs(tmp_path)
    first = train.run_train(_params(epochs=1), parquet_dir, out)
    out.history.unlink()  # as `dvc repro` removes a stage's outputs before it runs the stage again
    out.model.unlink()
    again = train.run_train(_params(epochs=1), parquet_dir, out)
    assert "is a finished run (epoch 1 of 1): starting afresh" in caplog.text
    assert len(out.history.read_text().splitlines()) == 1 + 1
    assert out.model.is_file()
    assert again["train_loss"] == pytest.approx(first["train_loss"], rel=1e-5)  # trained again, the same


def test_a_checkpoint_written_by_other_code_is_not_resumed(tmp_path, parquet_dir, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="wflw_pipeline")
    out = _outputs(tmp_path)

    def killed(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.run_train(_params(epochs=2), parquet_dir, out, on_epoch_end=killed)
    assert torch.load(out.checkpoint, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(train.stage_code, "digest", lambda paths: "edited code")
    metrics = train.run_train(_params(epochs=2), parquet_dir, out)
    assert "written with other params, data or code: starting afresh" in caplog.text
    assert "resuming" not in caplog.text
    assert [row.split(",")[0] for row in out.history.read_text().splitlines()[1:]] == ["1", "2"]
    assert metrics["epochs"] == 2


def test_resuming_with_another_number_of_processes_is_refused(tmp_path, parquet_dir):
    out = _outputs(tmp_path)

    def killed(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.run_train(_params(epochs=2), parquet_dir, out, on_epoch_end=killed)
    state = torch.load(out.checkpoint, weights_only=True)
    torch.save({**state, "world_size": 2}, out.checkpoint)
    with pytest.raises(
        train.TrainError,
        match=r"written by 2 process\(es\) \(global batch 8\), this run has 1 \(global batch 4\).*"
        r"train.resume=never",
    ):
        train.run_train(_params(epochs=2), parquet_dir, out)


def test_history_lr_is_the_rate_each_epoch_trained_with(tmp_path, parquet_dir):
    # 8 train faces, batch 4: 2 steps per epoch; no warm-up; x0.1 from epoch 2 (milestone 1).
    rows = []
    out = _outputs(tmp_path)
    params = _params(epochs=2, lr=1e-3, warmup_iters=0, milestones=(1,), gamma=0.1)
    train.run_train(params, parquet_dir, out, on_epoch_end=rows.append)
    history = [line.split(",") for line in out.history.read_text().splitlines()[1:]]
    assert [float(row[1]) for row in history] == pytest.approx([1e-3, 1e-4])
    assert [row["lr"] for row in rows] == pytest.approx([1e-3, 1e-4])
    assert [row["epoch"] for row in rows] == [1, 2]
    assert [f"{row['train_loss']:.6g}" for row in rows] == [row[2] for row in history]


@pytest.mark.parametrize(("drop_last", "shapes"), [(True, [3]), (False, [3, 2])])
def test_training_with_compile_compiles_each_batch_shape_once_across_epochs_and_validation(
    tmp_path, parquet_dir, monkeypatch, drop_last, shapes
):
    """2 epochs of 8 faces at batch 3 with a val split: one static graph for the full batch of 3, and one
    for the short last batch of 2 where it is kept; validation runs on the uncompiled module. (Dynamo
    decides recompiles whatever the backend: a counting backend stands in for Inductor to keep this
    fast.)"""
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append([tuple(x.shape) if isinstance(x, torch.Tensor) else type(x) for x in example_inputs])
        return graph.forward

    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda model, options, **kw: real_compile(model, backend=counting_backend, **kw)
    )
    monkeypatch.setenv(runtime.COMPILE_CACHE_ENV, "/unset")  # restored after the test
    base = default_params()
    params = replace(
        base,
        model=replace(base.model, arch="resnet18", pretrained="none", input_size=32),
        train=replace(
            base.train,
            epochs=2,
            batch_size=3,
            warmup_iters=1,
            device="cpu",
            compile=True,
            compile_cache=str(tmp_path / "cache"),
            drop_last=drop_last,
        ),
    )
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=drop_last):
            metrics = train.run_train(params, parquet_dir, TrainOutputs(tmp_path / "m", tmp_path / "t"))
    finally:
        torch._dynamo.reset()
    assert metrics["epochs"] == 2 and metrics["val_nme"] is not None  # both epochs validated
    assert len(graphs) == len(shapes)
    assert all((n, 3, 32, 32) in graph for n, graph in zip(shapes, graphs, strict=True))
    assert all(isinstance(shape, tuple) for graph in graphs for shape in graph)  # static: no symbolic size
    assert os.environ[runtime.COMPILE_CACHE_ENV] == str(tmp_path / "cache")


def test_a_truncated_train_split_fails_in_one_line_before_any_output(tmp_path, parquet_dir, caplog):
    broken = tmp_path / "parquet"
    shutil.copytree(parquet_dir, broken)
    split = broken / "train.parquet"
    split.write_bytes(split.read_bytes()[:1000])
    store = tmp_path / "mlflow.db"
    args = ["train", "--parquet", str(broken), "--model-dir", str(tmp_path / "model")]
    args += ["--train-dir", str(tmp_path / "train"), "--params", str(PARAMS_YAML)]

    with caplog.at_level(logging.ERROR):
        code = cli.main([*args, "--set", f"tracking.uri=sqlite:///{store}"])

    assert code == 2
    [error] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.startswith(f"{split}: not a readable Parquet file (") and "\n" not in error
    assert not (tmp_path / "model").exists() and not (tmp_path / "train" / "checkpoint.pt").exists()


def test_no_room_for_the_model_is_one_line_and_leaves_no_temporary(tmp_path, parquet_dir):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(_params(epochs=1).to_dict()))
    outputs = ["--model-dir", str(tmp_path / "model"), "--train-dir", str(tmp_path / "train")]
    command = ["train", "--params", str(params_file), "--set", "tracking.enabled=false",
               "--parquet", str(parquet_dir), *outputs]  # fmt: skip
    done = wflw_with_file_limit(1 << 20, *command, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1].endswith(
        f" ERROR wflw_pipeline: cannot write to {tmp_path / 'train'}/: File too large (errno 27); free some "
        "space there or write the outputs elsewhere (the files already there are unchanged)"
    )
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.rglob("*.tmp.*"))
