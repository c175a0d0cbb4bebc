"""Stage register: completes the pipeline's MLflow run from the DVC outputs (mlops/pipeline_run.py says
which run), logs the model with its checked ONNX export and registers a version of `registry.model_name`
with the alias `challenger`. With tracking off it records why nothing was registered and imports no MLflow."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from . import fileio
from .core.model import load_trained
from .data.contract import data_identity
from .data.dataset import load_faces
from .errors import PipelineError, require_mlflow
from .outputs import RegisterInputs, RegisterOutputs, untracked
from .params import Params
from .serving.export import export_checked

logger = logging.getLogger(__name__)


class RegisterError(PipelineError):
    """An output of train or evaluate that register needs is missing (names it and the stage to run)."""


def _check_inputs(inputs: RegisterInputs) -> None:
    """Every file register reads exists, and model.pt is a model `wflw train` wrote (clear errors)."""
    needed = {
        inputs.train.history: "train",
        inputs.train.metrics: "train",
        inputs.evaluation.metrics: "evaluate",
        inputs.evaluation.per_face: "evaluate",
        inputs.splits.split("train"): "convert",
        inputs.splits.split("test"): "convert",
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


ONNX_CHECK_CROPS = 16
"""Test crops on which register checks the ONNX export against PyTorch."""


def export_checked_onnx(model: Path, folder: Path, test_split: Path) -> tuple[Path, float, int]:
    """model.pt exported to `folder`/model.onnx, checked against PyTorch on the test split's first crops:
    (the file, the largest difference in crop pixels, the number of crops)."""
    path = folder / "model.onnx"
    crops = load_faces(test_split).images[:ONNX_CHECK_CROPS].permute(0, 2, 3, 1).numpy()
    worst = export_checked(model, path, crops)
    logger.info("ONNX export matches PyTorch to %.2g px on %d test crops", worst, len(crops))
    return path, worst, len(crops)


def run_register(params: Params, inputs: RegisterInputs, out: RegisterOutputs) -> dict[str, Any]:
    """Complete the run, log the model with its checked ONNX export, register a version, alias it
    `challenger`; write registered.json (with tracking off: why nothing was registered)."""
    if not params.tracking.enabled:
        result = untracked("tracking.enabled is false")
        fileio.write_json(out.registered, result)
        logger.info("tracking.enabled is false: nothing registered")
        return result
    require_mlflow()
    return _register(params, inputs, out)


def _register(params: Params, inputs: RegisterInputs, out: RegisterOutputs) -> dict[str, Any]:
    from .mlops import pipeline_run
    from .mlops.client import connect
    from .mlops.registry import CHALLENGER, register_version

    _check_inputs(inputs)
    evaluation_path = inputs.evaluation.metrics
    evaluation = json.loads(evaluation_path.read_text())
    outputs = {
        "wflw.evaluation": fileio.sha256_file(evaluation_path)[:16],
        "wflw.model_sha256": fileio.sha256_file(inputs.model)[:16],
    }
    tracking = connect(params.tracking)
    tracking.call("reach the tracking server", tracking.client.search_experiments, max_results=1)
    train_run = _train_run_id(inputs.train.run_ref)

    def export(model: Path, folder: Path) -> pipeline_run.OnnxFile:
        return pipeline_run.OnnxFile(*export_checked_onnx(model, folder, inputs.splits.split("test")))

    run_id, origin = pipeline_run.find_or_start(tracking, params, inputs, train_run, outputs)
    metrics = pipeline_run.result_metrics(evaluation)
    model_uri = pipeline_run.complete(tracking, run_id, inputs, metrics, outputs, export)
    identity = data_identity(inputs.splits.split("test"))
    run = tracking.client.get_run(run_id)
    onnx_tags = {key: value for key, value in run.data.tags.items() if key.startswith(pipeline_run.ONNX_TAG)}
    version = register_version(
        tracking, params.registry.model_name, run_id, model_uri, metrics, identity, onnx_tags
    )
    result = {
        "model_name": params.registry.model_name,
        "version": version,
        "model_uri": f"models:/{params.registry.model_name}/{version}",
        "run_id": run_id,
        "run_name": run.info.run_name,
        "run_origin": origin,
        "tracking_uri": tracking.uri,
        "run_url": pipeline_run.run_url(tracking.uri, run.info.experiment_id, run_id),
        "onnx": onnx_tags.get(f"{pipeline_run.ONNX_TAG}path"),
    }
    fileio.write_json(out.registered, result)
    logger.info(
        "registered %s version %s (alias %s) from run %s (%s)",
        result["model_name"],
        version,
        CHALLENGER,
        run_id,
        origin,
    )
    return result
