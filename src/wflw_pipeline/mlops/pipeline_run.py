"""The pipeline's MLflow run, completed by the register stage from the DVC outputs.

Which run:
- the run train opened, when this server has it and it holds no other evaluation: the usual case,
  `dvc repro` after a change that retrained;
- a run already completed with the same model and evaluation (registering twice creates nothing);
- a new run when train was not rerun (DVC had it cached) but evaluate was: it gets the same params,
  curves (from history.csv) and train metrics, and tag `wflw.trained_in_run` names the run that trained;
- a new run rebuilt from the DVC outputs when the server does not have the run (tracking was off or
  unreachable during training, another server, a wiped database): nothing is retrained for tracking.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric

from ..data import wflw
from ..outputs import RegisterInputs
from ..params import Params
from . import provenance
from .client import Tracking, fluent
from .live_run import log_training, start_run
from .pyfunc import log_landmark_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnnxFile:
    """The model exported to ONNX and checked against PyTorch: the file, the largest difference (crop
    pixels) and on how many crops."""

    path: Path
    max_abs_diff_px: float
    crops: int


def result_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """evaluate's metrics.json as flat MLflow metrics: nme_/fr_/auc_ of test, each subset and val."""
    flat = {}
    for split in (*wflw.SUBSETS, "val"):
        for key in ("nme", "fr", "auc"):
            value = (evaluation.get(split) or {}).get(key)
            if value is not None:
                flat[f"{key}_{split}"] = float(value)
    if (evaluation.get("mean_shape") or {}).get("nme") is not None:
        flat["nme_mean_shape"] = float(evaluation["mean_shape"]["nme"])
    return flat


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI, when the tracking URI is a server's."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def find_or_start(
    tracking: Tracking, params: Params, inputs: RegisterInputs, train_run: str | None, outputs: dict[str, str]
) -> tuple[str, str]:
    """(run id, how it was found): the run train opened (`train_run`); a run already completed with these
    same outputs (model and evaluation), so registering twice creates nothing; else a new one (train cached,
    or not on this server)."""
    run = None
    if train_run:
        try:
            run = tracking.client.get_run(train_run)
        except Exception:  # not on this server (another server, a wiped database)
            run = None
    if run is not None and run.data.tags.get("wflw.evaluation") in (None, outputs["wflw.evaluation"]):
        return run.info.run_id, "the run train opened"
    done = _completed_with(tracking, params.tracking.experiment, outputs)
    if done is not None:
        return done, "completed before with these outputs"
    if run is not None:
        origin, tags = "train cached by DVC", {"wflw.trained_in_run": run.info.run_id}
    else:
        origin, tags = "rebuilt from the DVC outputs", {"wflw.rebuilt": "true"}
    ran_on = json.loads(inputs.train.metrics.read_text())
    run_id = start_run(tracking, params, inputs.splits.split("train"), "wflw register", ran_on)
    log_training(tracking, run_id, inputs.train.history, inputs.train.metrics)
    tracking.log_batch(run_id, tags=tags)
    logger.info("MLflow: new run %s (%s)", run_id, origin)
    return run_id, origin


def _completed_with(tracking: Tracking, experiment: str, outputs: dict[str, str]) -> str | None:
    """The id of a finished run of `experiment` tagged with these outputs, if there is one."""
    found = tracking.call("look up the experiment", tracking.client.get_experiment_by_name, experiment)
    if found is None:
        return None
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in sorted(outputs.items()))
    runs = tracking.call(
        "search the runs", tracking.client.search_runs, [found.experiment_id], query, max_results=1
    )
    return runs[0].info.run_id if runs else None


def complete(
    tracking: Tracking,
    run_id: str,
    inputs: RegisterInputs,
    metrics: dict[str, float],
    outputs: dict[str, str],
    export_onnx: Callable[[Path, Path], OnnxFile],
) -> str:
    """Log results, evaluation artifacts, DVC/git tags and (once per run) the model with its ONNX export;
    returns the model URI. `export_onnx(model.pt, folder)` writes and checks its ONNX file there (the
    register stage's exporter: mlops does not import serving)."""
    client = tracking.client
    stamp = int(time.time() * 1000)
    tracking.log_batch(
        run_id,
        metrics=[Metric(name, value, stamp, 0) for name, value in metrics.items()],
        tags={
            **provenance.dvc_stage_tags(provenance.project_root() / "dvc.lock"),
            **provenance.caller_tags(),
            **outputs,
        },
    )
    for path in inputs.evaluation.files():
        if path.is_file():
            tracking.call(f"upload {path.name}", client.log_artifact, run_id, str(path), "evaluation")
    model_uri = client.get_run(run_id).data.tags.get("wflw.model_uri")
    if model_uri is None:
        with tempfile.TemporaryDirectory(prefix="wflw-onnx-") as folder:
            exported = export_onnx(inputs.model, Path(folder))
            model_uri = tracking.call("log the model", _log_model, tracking, run_id, inputs.model, exported)
        tracking.log_batch(run_id, tags={"wflw.model_uri": model_uri, **_onnx_tags(exported)})
    tracking.log_batch(run_id, tags={"wflw.stage": "registered"})
    tracking.call("close the run", client.set_terminated, run_id, "FINISHED")
    return model_uri


def _log_model(tracking: Tracking, run_id: str, model: Path, onnx: OnnxFile) -> str:
    with fluent(tracking.uri), mlflow.start_run(run_id=run_id):
        return log_landmark_model(model, onnx=onnx.path).model_uri


ONNX_TAG = "wflw.onnx."


def _onnx_tags(onnx: OnnxFile) -> dict[str, str]:
    """Where the ONNX file lies in the model's files, and how closely it matched PyTorch."""
    return {
        f"{ONNX_TAG}path": "artifacts/model.onnx",
        f"{ONNX_TAG}max_abs_diff_px": f"{onnx.max_abs_diff_px:.3g}",
        f"{ONNX_TAG}checked_crops": str(onnx.crops),
    }
