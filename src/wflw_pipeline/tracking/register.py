"""Stage register: complete the pipeline's MLflow run from the DVC outputs and register its model.

Which run is completed:
- the run train opened (its id in mlflow_run.json), when this server has it and it holds no other
  evaluation: the usual case, `dvc repro` after a change that retrained;
- a new run when train was not rerun (DVC had it cached) but evaluate was, so that run already holds
  another evaluation: the new run gets the same params, curves (from history.csv) and train metrics,
  and tag `wflw.trained_in_run` names the run that trained;
- a new run rebuilt from the DVC outputs when the server does not have the run (tracking was off or
  unreachable during training, another server, a wiped database): nothing is retrained for tracking.
Registering is idempotent: the version of a run is created once; the alias `challenger` points at it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric

from .. import fileio, provenance, wflw
from ..contract import data_identity
from ..errors import PipelineError
from ..model import load_trained
from ..params import Params
from . import RUN_REF
from .client import Tracking, connect
from .pyfunc import log_landmark_model
from .runs import log_training, start_run

logger = logging.getLogger(__name__)

EVAL_ARTIFACTS = (
    "results.md", "metrics.json", "ced.csv", "per_face.parquet",
    "ced.png", "nme_subsets.png", "best_worst.png",
)  # fmt: skip
"""evaluate's outputs, logged under the run's `evaluation/`."""
SUBSETS = ("test", *wflw.ATTRIBUTES)
CHALLENGER = "challenger"


@dataclass(frozen=True)
class RegisterInputs:
    """The DVC outputs register reads: train's folder, the model, evaluate's folder, the Parquet splits."""

    train_dir: Path
    model: Path
    eval_dir: Path
    parquet_dir: Path


def result_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """evaluate's metrics.json as flat MLflow metrics: nme_/fr_/auc_ of test, each subset and val."""
    flat = {}
    for split in (*SUBSETS, "val"):
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


class RegisterError(PipelineError):
    """An output of train or evaluate that register needs is missing (names it and the stage to run)."""


def _check_inputs(inputs: RegisterInputs) -> None:
    """Every file register reads exists, and model.pt is a model `wflw train` wrote (clear errors)."""
    needed = {
        inputs.train_dir / "history.csv": "train",
        inputs.train_dir / "metrics.json": "train",
        inputs.eval_dir / "metrics.json": "evaluate",
        inputs.eval_dir / "per_face.parquet": "evaluate",
        inputs.parquet_dir / "train.parquet": "convert",
        inputs.parquet_dir / "test.parquet": "convert",
    }
    for path, stage in needed.items():
        if not path.is_file():
            raise RegisterError(f"{path} not found: run `wflw {stage}` (or `dvc repro`) first")
    load_trained(inputs.model)


def _train_run_id(path: Path) -> str | None:
    """The run id train wrote to mlflow_run.json; None when it opened none or the file is missing."""
    try:
        return json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        logger.warning("%s missing or unreadable: the run is rebuilt from the DVC outputs", path)
        return None


def run_register(params: Params, inputs: RegisterInputs, out_dir: Path) -> dict[str, Any]:
    """Complete the run, log the model, register a version, alias it `challenger`; write registered.json."""
    out = out_dir / "registered.json"
    _check_inputs(inputs)
    evaluation_path = inputs.eval_dir / "metrics.json"
    evaluation = json.loads(evaluation_path.read_text())
    outputs = {"wflw.evaluation": _sha256(evaluation_path), "wflw.model_sha256": _sha256(inputs.model)}
    tracking = connect(params.tracking)
    tracking.call("reach the tracking server", tracking.client.search_experiments, max_results=1)
    run_id, origin = _pipeline_run(tracking, params, inputs, outputs)
    metrics = result_metrics(evaluation)
    model_uri = _complete(tracking, run_id, inputs, metrics, outputs)
    identity = data_identity(inputs.parquet_dir / "test.parquet")
    version = _version(tracking, params.registry.model_name, run_id, model_uri, metrics, identity)
    run = tracking.client.get_run(run_id)
    result = {
        "model_name": params.registry.model_name,
        "version": version,
        "model_uri": f"models:/{params.registry.model_name}/{version}",
        "run_id": run_id,
        "run_name": run.info.run_name,
        "run_origin": origin,
        "tracking_uri": tracking.uri,
        "run_url": run_url(tracking.uri, run.info.experiment_id, run_id),
    }
    fileio.write_json(out, result)
    logger.info(
        "registered %s version %s (alias %s) from run %s (%s)",
        result["model_name"],
        version,
        CHALLENGER,
        run_id,
        origin,
    )
    return result


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _pipeline_run(
    tracking: Tracking, params: Params, inputs: RegisterInputs, outputs: dict[str, str]
) -> tuple[str, str]:
    """(run id, how it was found): train's run; a run already completed with these same outputs (model
    and evaluation), so registering twice creates nothing; else a new one (train cached, or not here)."""
    train_run = _train_run_id(inputs.train_dir / RUN_REF)
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
    run_id = start_run(tracking, params, inputs.parquet_dir / "train.parquet", "wflw register")
    log_training(tracking, run_id, inputs.train_dir / "history.csv", inputs.train_dir / "metrics.json")
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


def _complete(
    tracking: Tracking,
    run_id: str,
    inputs: RegisterInputs,
    metrics: dict[str, float],
    outputs: dict[str, str],
) -> str:
    """Log results, evaluation artifacts, DVC/git tags and (once per run) the model; returns the model URI."""
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
    for name in EVAL_ARTIFACTS:
        path = inputs.eval_dir / name
        if path.is_file():
            tracking.call(f"upload {name}", client.log_artifact, run_id, str(path), "evaluation")
    model_uri = client.get_run(run_id).data.tags.get("wflw.model_uri")
    if model_uri is None:
        model_uri = tracking.call("log the model", _log_model, tracking, run_id, inputs.model)
        tracking.log_batch(run_id, tags={"wflw.model_uri": model_uri})
    tracking.log_batch(run_id, tags={"wflw.stage": "registered"})
    tracking.call("close the run", client.set_terminated, run_id, "FINISHED")
    return model_uri


@contextmanager
def _fluent(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model, register_model) on `uri`; the process's URIs are restored after."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _log_model(tracking: Tracking, run_id: str, model: Path) -> str:
    with _fluent(tracking.uri), mlflow.start_run(run_id=run_id):
        return log_landmark_model(model).model_uri


def _version(
    tracking: Tracking,
    name: str,
    run_id: str,
    model_uri: str,
    metrics: dict[str, float],
    identity: dict[str, Any],
) -> str:
    """The run's version of `name` (created once), tagged with its results and data; alias challenger."""
    client = tracking.client
    found = tracking.call(
        "search the model versions", client.search_model_versions, f"name = '{name}' and run_id = '{run_id}'"
    )
    if found:
        version = str(max(int(v.version) for v in found))
    else:
        tags = {
            **{key: f"{value:.6g}" for key, value in metrics.items()},
            **provenance.data_tags(identity),
            "data.identity": json.dumps(identity, sort_keys=True),
            **provenance.git_tags(provenance.project_root()),
        }
        created = tracking.call("register the model", _register, tracking, model_uri, name, tags)
        version = str(created.version)
    tracking.call("set the alias", client.set_registered_model_alias, name, CHALLENGER, version)
    return version


def _register(tracking: Tracking, model_uri: str, name: str, tags: dict[str, str]) -> Any:
    with _fluent(tracking.uri):
        return mlflow.register_model(model_uri, name, tags=tags)
