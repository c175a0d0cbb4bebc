"""The only MLflow code: the run of each pipeline run, the logged model, the registry and promotion.

The run. train opens it before the first epoch (params, tags, the data as a dataset input), writes its
id to `mlflow_run.json` (provenance.RUN_REF, a DVC output of train) and logs each epoch's history row
as it ends (step = epoch). Nothing here may stop training: a call that still fails after
`tracking.retries` tries is warned about and later epochs are not logged live; history.csv, which
train writes anyway, is logged at the end instead, or by register when the server is back.

The register stage completes the run from the DVC outputs and registers its model. Which run:
- the run train opened, when this server has it and it holds no other evaluation: the usual case,
  `dvc repro` after a change that retrained;
- a run already completed with the same model and evaluation (registering twice creates nothing);
- a new run when train was not rerun (DVC had it cached) but evaluate was: it gets the same params,
  curves (from history.csv) and train metrics, and tag `wflw.trained_in_run` names the run that trained;
- a new run rebuilt from the DVC outputs when the server does not have the run (tracking was off or
  unreachable during training, another server, a wiped database): nothing is retrained for tracking.
A run gets one version of `registry.model_name`; the alias `challenger` points at it.

The model is logged with MLflow's models-from-code (the script pyfunc_model.py builds `LandmarkModel`):
the model directory holds that script, this package's source under code/ and model.pt, which
`load_context` reads with `weights_only=True`; nothing is pickled.

Promotion (`wflw promote`, `rollback`, `models`) moves the alias `champion`. The gate is
promotion.decide, on each version's tags and its run's per_face.parquet. Each move is recorded twice:
as a registered-model tag `wflw.move.<seq>` (JSON: when, from which version, to which, what kind, why),
the history rollback walks back; and as tags on the versions (`wflw.promoted_at`, `wflw.promoted_from`,
`wflw.promotion_reason`; `wflw.demoted_at`, `wflw.demoted_by`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import numpy as np
import pyarrow.parquet as pq
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModelContext
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from . import fileio, promotion, provenance, wflw
from .contract import data_identity
from .errors import PipelineError
from .inference import LandmarkPredictor
from .model import load_trained
from .params import Params, TrackingParams
from .promotion import Decision, GateRules, PromotionError, VersionResult
from .provenance import RUN_REF, project_root, untracked
from .runtime import Distributed, resolve_device

logger = logging.getLogger(__name__)

T = TypeVar("T")


# The tracking server ------------------------------------------------------------------------------------

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Marks the experiment as model training, so that MLflow 3's UI opens on its runs."""
BATCH = 100
"""MLflow takes at most 100 params or tags per log_batch call."""


class TrackingError(PipelineError):
    """The tracking server cannot be reached or refuses a call (one line: what, where, why)."""


def tracking_uri(config: TrackingParams) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded default: the project's sqlite:///mlflow.db.

    A relative SQLite path is made absolute against the project root: `dvc exp run` may run a stage in
    a temporary copy, and MLflow caches a store per URI string within a process.
    """
    uri = config.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(f"{prefix}/") and uri != f"{prefix}:memory:":
        return f"{prefix}{project_root() / uri.removeprefix(prefix)}"
    return uri


def default_artifact_location(uri: str) -> str | None:
    """mlartifacts/ beside a SQLite database; None lets a tracking server choose (its proxied storage)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == f"{prefix}:memory:":
        return None
    return (Path(uri.removeprefix(prefix)).parent / "mlartifacts").as_uri()


def _short(err: BaseException) -> str:
    """An exception as one short line (MLflow's messages can span many lines)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:240]}"


@dataclass
class Tracking:
    """An MLflow client on one tracking URI whose calls retry `retries` times with a short backoff."""

    client: MlflowClient
    uri: str
    retries: int

    def call(self, what: str, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """fn(*args, **kwargs), retried; TrackingError naming `what` and the server once every try failed."""
        for attempt in range(self.retries):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # MLflow raises many types for a server that is down or refuses
                if attempt + 1 == self.retries:
                    raise TrackingError(
                        f"MLflow at {self.uri}: could not {what} after {self.retries} tries ({_short(err)})"
                    ) from err
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def log_batch(
        self,
        run_id: str,
        *,
        metrics: Sequence[Metric] = (),
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Metrics, params and tags in as few calls as MLflow's batch limits allow."""
        items: list[Metric | Param | RunTag] = [
            *metrics,
            *(Param(k, v) for k, v in (params or {}).items()),
            *(RunTag(k, v) for k, v in (tags or {}).items()),
        ]
        for chunk in _chunks(items, BATCH):
            self.call(
                "log to the run",
                self.client.log_batch,
                run_id,
                metrics=[m for m in chunk if isinstance(m, Metric)],
                params=[p for p in chunk if isinstance(p, Param)],
                tags=[t for t in chunk if isinstance(t, RunTag)],
            )


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def connect(config: TrackingParams) -> Tracking:
    """A client on the configured server; HTTP calls time out after tracking.timeout_s and are retried by us.

    MLflow's own HTTP retries back off for minutes against a server that is down, so they are turned
    off here unless the user set MLFLOW_HTTP_REQUEST_MAX_RETRIES; `Tracking.call` retries instead.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(math.ceil(config.timeout_s)))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri(config)
    return Tracking(MlflowClient(tracking_uri=uri, registry_uri=uri), uri, config.retries)


def experiment_id(tracking: Tracking, name: str) -> str:
    """The experiment `name`, created (tagged as model training) when it does not exist yet."""
    client = tracking.client
    experiment = tracking.call("look up the experiment", client.get_experiment_by_name, name)
    if experiment is not None:
        return experiment.experiment_id
    location = default_artifact_location(tracking.uri)
    created = tracking.call(
        "create the experiment", client.create_experiment, name, location, tags=EXPERIMENT_KIND
    )
    logger.info("MLflow: created experiment %r at %s", name, tracking.uri)
    return created


# The run of a pipeline run ----------------------------------------------------------------------------

CURVES = ("train_loss", "val_nme", "lr", "images_per_s")
"""history.csv columns logged as MLflow metrics of the same name, with step = epoch."""
TRAIN_SUMMARY = {
    "selected_epoch": "selected_epoch",
    "val_nme": "nme_val_selected",
    "baseline_val_nme": "nme_val_mean_shape",
    "train_seconds": "train_seconds",
    "images_per_s": "train_images_per_s_median",
}
"""train metrics.json key -> the MLflow metric (logged once)."""


def run_tags(params: Params, identity: dict[str, Any], source: str) -> dict[str, str]:
    """Tags a run gets at its start: the command that opened it, provenance, data, device, torch."""
    device = resolve_device(params.train.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": source,
        **provenance.git_tags(provenance.project_root()),
        **provenance.caller_tags(),
        **provenance.data_tags(identity),
        "device": device.type,
        "device.name": name,
        "torch.version": torch.__version__,
    }


def dataset_input(params: Params, identity: dict[str, Any], train_split: Path) -> DatasetInput:
    """The data as an MLflow dataset: name, where it came from, digest of both archive SHA-256s.

    The source is the official URL (wflw), the user's archive (local), or the train split's Parquet
    file (synthetic: generated, so the file trained on is the most useful pointer).
    """
    source = params.data.source
    if source == "wflw":
        uri = params.data.wflw.images_url
    elif source == "local":
        uri = Path(str(params.data.local.images_archive)).expanduser().resolve().as_uri()
    else:
        uri = train_split.resolve().as_uri()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "file:" resolves to LocalArtifactDatasetSource twice
        resolved = resolve_dataset_source(uri)
    dataset = MetaDataset(resolved, name=f"wflw-{source}", digest=provenance.data_digest(identity))
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])


def start_run(tracking: Tracking, params: Params, train_split: Path, source: str) -> str:
    """A new run opened by the command `source`, with every param, the start tags and the dataset input."""
    identity = data_identity(train_split)
    experiment = experiment_id(tracking, params.tracking.experiment)
    run = tracking.call(
        "create a run",
        tracking.client.create_run,
        experiment,
        run_name=provenance.run_name(params),
        tags=run_tags(params, identity, source),
    )
    run_id = run.info.run_id
    tracking.log_batch(run_id, params=provenance.flatten(params.to_dict()))
    dataset = dataset_input(params, identity, train_split)
    tracking.call("log the dataset", tracking.client.log_inputs, run_id, datasets=[dataset])
    return run_id


def epoch_metrics(row: dict[str, Any]) -> list[Metric]:
    """One history row as metrics at step = epoch (an empty val_nme is skipped)."""
    stamp = int(time.time() * 1000)
    step = int(row["epoch"])
    return [Metric(name, float(row[name]), stamp, step) for name in CURVES if row.get(name) not in (None, "")]


def read_history(path: Path) -> list[dict[str, Any]]:
    """history.csv rows (strings; an empty val_nme where there was no val split)."""
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def log_training(
    tracking: Tracking, run_id: str, history: Path, train_metrics: Path, logged: frozenset[int] = frozenset()
) -> None:
    """The epochs of history.csv not `logged` yet (step = epoch), train's summary metrics, both files."""
    rows = [row for row in read_history(history) if int(row["epoch"]) not in logged]
    curves = [metric for row in rows for metric in epoch_metrics(row)]
    summary = json.loads(train_metrics.read_text())
    stamp = int(time.time() * 1000)
    totals = [
        Metric(name, float(summary[key]), stamp, 0)
        for key, name in TRAIN_SUMMARY.items()
        if summary.get(key) is not None
    ]
    tracking.log_batch(run_id, metrics=[*curves, *totals])
    for path in (history, train_metrics):
        tracking.call(f"upload {path.name}", tracking.client.log_artifact, run_id, str(path), "training")


class TrainTracker:
    """Live tracking of one training; every failure becomes a warning, never an exception."""

    def __init__(self, tracking: Tracking | None, run_id: str | None) -> None:
        self.tracking = tracking
        self.run_id = run_id
        self.live = run_id is not None
        self.logged: set[int] = set()

    @classmethod
    def start(cls, params: Params, parquet_dir: Path, ref: Path) -> TrainTracker:
        """Open the run (or warn and go on without one) and write its id to `ref`."""
        try:
            tracking = connect(params.tracking)
            _supersede(tracking, ref)
            run_id = start_run(tracking, params, parquet_dir / "train.parquet", "wflw train")
        except TrackingError as err:
            logger.warning("%s: training goes on untracked; `wflw register` will track it", err)
            fileio.write_json(ref, untracked(str(err)))
            return cls(None, None)
        fileio.write_json(
            ref,
            {"run_id": run_id, "tracking_uri": tracking.uri, "experiment": params.tracking.experiment},
        )
        logger.info("MLflow: run %s at %s", run_id, tracking.uri)
        return cls(tracking, run_id)

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        """Log one epoch's curves; after a failure, stop logging live (finish logs the history)."""
        if not self.live or self.tracking is None or self.run_id is None:
            return
        try:
            self.tracking.log_batch(self.run_id, metrics=epoch_metrics(row))
            self.logged.add(int(row["epoch"]))
        except TrackingError as err:
            self.live = False
            logger.warning("%s: not logging curves live any more; history.csv is logged at the end", err)

    def finish(self, history: Path, train_metrics: Path) -> None:
        """Log the whole history and train's metrics, and close the run as finished."""
        self._close(
            lambda tracking, run_id: log_training(
                tracking, run_id, history, train_metrics, frozenset(self.logged)
            ),
            "FINISHED",
        )

    def fail(self, status: str) -> None:
        """Close the run as FAILED or KILLED."""
        self._close(lambda tracking, run_id: None, status)

    def _close(self, log: Callable[[Tracking, str], None], status: str) -> None:
        if self.tracking is None or self.run_id is None:
            return
        try:
            log(self.tracking, self.run_id)
            self.tracking.log_batch(self.run_id, tags={"wflw.stage": "trained"})
            self.tracking.call("close the run", self.tracking.client.set_terminated, self.run_id, status)
        except TrackingError as err:
            logger.warning("%s: `wflw register` will complete the run", err)


def _supersede(tracking: Tracking, ref: Path) -> None:
    """A run left RUNNING by a killed training (same ref file) is marked KILLED."""
    try:
        previous = json.loads(ref.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return
    if not previous:
        return
    try:
        run = tracking.client.get_run(previous)
    except Exception:  # another server, a wiped database: nothing to close
        return
    if run.info.status == RunStatus.to_string(RunStatus.RUNNING):
        tracking.call("close the interrupted run", tracking.client.set_terminated, previous, "KILLED")
        logger.info("MLflow: run %s of an interrupted training marked KILLED", previous)


@contextmanager
def tracked_training(
    params: Params, parquet_dir: Path, train_dir: Path
) -> Iterator[Callable[[dict[str, Any]], None] | None]:
    """Around `run_train`: yields its on_epoch_end callback (None on ranks other than 0)."""
    if not Distributed.from_env().main:
        yield None
        return
    tracker = TrainTracker.start(params, parquet_dir, train_dir / RUN_REF)
    try:
        yield tracker.on_epoch_end
    except KeyboardInterrupt:
        tracker.fail("KILLED")
        raise
    except BaseException:
        tracker.fail("FAILED")
        raise
    tracker.finish(train_dir / "history.csv", train_dir / "metrics.json")


# The logged model ---------------------------------------------------------------------------------------

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
"""The models-from-code script: MLflow logs it with the model and runs it to build `LandmarkModel`."""
PACKAGE_DIR = Path(__file__).resolve().parent
REQUIREMENTS = ("torch", "torchvision", "numpy", "pillow", "pyarrow", "tqdm", "pyyaml")
"""What the bundled package imports on the inference path, pinned to the installed versions at logging."""


class LandmarkModel(mlflow.pyfunc.PythonModel):
    """uint8 crops (N, S, S, 3) in, float32 landmarks (N, 98, 2) in crop pixels out."""

    def load_context(self, context: PythonModelContext) -> None:
        self.predictor = LandmarkPredictor.load(context.artifacts["model"])

    def predict(
        self, context: PythonModelContext, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        return self.predictor.predict(np.asarray(model_input))


def signature(crop_size: int) -> ModelSignature:
    """Tensor signature: uint8 (-1, S, S, 3) crops in, float32 (-1, 98, 2) crop pixels out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, crop_size, crop_size, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, wflw.NUM_POINTS, 2))]),
    )


def pip_requirements() -> list[str]:
    """REQUIREMENTS pinned to the installed versions, without local labels such as +cu130."""
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in REQUIREMENTS]


def set_landmark_model() -> None:
    """What the models-from-code script runs: hand MLflow the model to build (no pickle involved)."""
    mlflow.models.set_model(LandmarkModel())


def log_landmark_model(model_path: Path, *, name: str = "model", onnx: Path | None = None) -> ModelInfo:
    """Log `model_path` (a model.pt of `wflw train`) as a models-from-code pyfunc into the active run, with
    `onnx` (its export) beside it as artifacts/model.onnx when given.

    The model is loaded first, so a bad file raises model.CheckpointError before anything is logged.
    """
    crop_size = LandmarkPredictor.load(model_path).crop_size
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={"model": str(model_path), **({"onnx": str(onnx)} if onnx else {})},
        code_paths=[str(PACKAGE_DIR)],
        signature=signature(crop_size),
        input_example=np.full((1, crop_size, crop_size, 3), 128, np.uint8),
        pip_requirements=pip_requirements(),
    )


def download_model_file(config: TrackingParams, uri: str, dst: Path) -> Path:
    """The model.pt of a model logged by `wflw register` (models:/<name>@<alias>, models:/<name>/<version>,
    runs:/<run id>/model), downloaded with the model into `dst`."""
    tracking = connect(config)

    def download() -> str:
        with _fluent(tracking.uri):
            return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))

    local = Path(tracking.call(f"download {uri} (`wflw models` lists the versions)", download))
    path = local / "artifacts" / "model.pt"
    if not path.is_file():
        raise TrackingError(f"{uri}: not a model logged by `wflw register` (it has no artifacts/model.pt)")
    return path


# The register stage -------------------------------------------------------------------------------------

EVAL_ARTIFACTS = (
    "results.md", "metrics.json", "ced.csv", "per_face.parquet",
    "ced.png", "nme_subsets.png", "best_worst.png",
)  # fmt: skip
"""evaluate's outputs, logged under the run's `evaluation/`."""
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
    for split in (*promotion.SUBSETS, "val"):
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


@dataclass(frozen=True)
class OnnxFile:
    """The model exported to ONNX and checked against PyTorch: the file, the largest difference (crop
    pixels) and on how many crops."""

    path: Path
    max_abs_diff_px: float
    crops: int


OnnxExport = Callable[[Path, Path], OnnxFile]
"""(model.pt, a folder) -> its ONNX file written there and checked: what register attaches to the model
(the cli hands export.py's in, so that this module, which train imports, does not import the exporter)."""


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


def run_register(
    params: Params, inputs: RegisterInputs, out_dir: Path, onnx: OnnxExport | None = None
) -> dict[str, Any]:
    """Complete the run, log the model (with its ONNX export when `onnx` is given), register a version,
    alias it `challenger`; write registered.json."""
    out = out_dir / "registered.json"
    _check_inputs(inputs)
    evaluation_path = inputs.eval_dir / "metrics.json"
    evaluation = json.loads(evaluation_path.read_text())
    outputs = {"wflw.evaluation": _sha256(evaluation_path), "wflw.model_sha256": _sha256(inputs.model)}
    tracking = connect(params.tracking)
    tracking.call("reach the tracking server", tracking.client.search_experiments, max_results=1)
    run_id, origin = _pipeline_run(tracking, params, inputs, outputs)
    metrics = result_metrics(evaluation)
    model_uri = _complete(tracking, run_id, inputs, metrics, outputs, onnx)
    identity = data_identity(inputs.parquet_dir / "test.parquet")
    run = tracking.client.get_run(run_id)
    onnx_tags = {key: value for key, value in run.data.tags.items() if key.startswith(ONNX_TAG)}
    version = _version(tracking, params.registry.model_name, run_id, model_uri, metrics, identity, onnx_tags)
    result = {
        "model_name": params.registry.model_name,
        "version": version,
        "model_uri": f"models:/{params.registry.model_name}/{version}",
        "run_id": run_id,
        "run_name": run.info.run_name,
        "run_origin": origin,
        "tracking_uri": tracking.uri,
        "run_url": run_url(tracking.uri, run.info.experiment_id, run_id),
        "onnx": onnx_tags.get(f"{ONNX_TAG}path"),
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
    onnx: OnnxExport | None,
) -> str:
    """Log results, evaluation artifacts, DVC/git tags and (once per run) the model with its ONNX export;
    returns the model URI."""
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
        with tempfile.TemporaryDirectory(prefix="wflw-onnx-") as folder:
            exported = onnx(inputs.model, Path(folder)) if onnx else None
            model_uri = tracking.call("log the model", _log_model, tracking, run_id, inputs.model, exported)
        tracking.log_batch(run_id, tags={"wflw.model_uri": model_uri, **_onnx_tags(exported)})
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


def _log_model(tracking: Tracking, run_id: str, model: Path, onnx: OnnxFile | None) -> str:
    with _fluent(tracking.uri), mlflow.start_run(run_id=run_id):
        return log_landmark_model(model, onnx=onnx.path if onnx else None).model_uri


ONNX_TAG = "wflw.onnx."


def _onnx_tags(onnx: OnnxFile | None) -> dict[str, str]:
    """Where the ONNX file lies in the model's files, and how closely it matched PyTorch."""
    if onnx is None:
        return {}
    return {
        f"{ONNX_TAG}path": "artifacts/model.onnx",
        f"{ONNX_TAG}max_abs_diff_px": f"{onnx.max_abs_diff_px:.3g}",
        f"{ONNX_TAG}checked_crops": str(onnx.crops),
    }


def _version(
    tracking: Tracking,
    name: str,
    run_id: str,
    model_uri: str,
    metrics: dict[str, float],
    identity: dict[str, Any],
    onnx_tags: dict[str, str],
) -> str:
    """The run's version of `name` (created once), tagged with its results, data and ONNX file; alias
    challenger."""
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
            **onnx_tags,
        }
        created = tracking.call("register the model", _register, tracking, model_uri, name, tags)
        version = str(created.version)
    tracking.call("set the alias", client.set_registered_model_alias, name, CHALLENGER, version)
    return version


def _register(tracking: Tracking, model_uri: str, name: str, tags: dict[str, str]) -> Any:
    with _fluent(tracking.uri):
        return mlflow.register_model(model_uri, name, tags=tags)


# Promotion: the alias champion ---------------------------------------------------------------------------

CHAMPION = "champion"
MOVE_TAG = "wflw.move."
PER_FACE = "evaluation/per_face.parquet"


class PromotionRefused(PipelineError):
    """The gate refused the candidate; `report` is the comparison that says why. Exit code 1."""

    exit_code = 1

    def __init__(self, message: str, report: str) -> None:
        super().__init__(message)
        self.report = report


def _alias(tracking: Tracking, name: str, alias: str) -> str | None:
    """The version `alias` points at, or None when it points nowhere."""
    try:
        return str(tracking.client.get_model_version_by_alias(name, alias).version)
    except Exception:  # MlflowException: no such alias (or model)
        return None


def _registered(tracking: Tracking, name: str) -> Any:
    try:
        return tracking.client.get_registered_model(name)
    except Exception as err:  # MlflowException RESOURCE_DOES_NOT_EXIST, or the server
        tracking.call("reach the tracking server", tracking.client.search_experiments, max_results=1)
        raise PromotionError(
            f"registered model {name!r} not found at {tracking.uri}: run the pipeline (`dvc repro`) first"
        ) from err


def moves(tracking: Tracking, name: str) -> list[dict[str, Any]]:
    """Every recorded move of `champion`, oldest first."""
    tags = _registered(tracking, name).tags
    found = [json.loads(value) for key, value in tags.items() if key.startswith(MOVE_TAG)]
    return sorted(found, key=lambda move: move["seq"])


def version_result(tracking: Tracking, name: str, version: str) -> VersionResult:
    """A version's metrics and data (its tags) and its per-face NME (its run's per_face.parquet)."""
    client = tracking.client
    try:
        found = client.get_model_version(name, version)
    except Exception as err:  # MlflowException: no such version
        raise PromotionError(f"{name} has no version {version}") from err
    tags = found.tags
    metrics = {key: float(tags[key]) if key in tags else None for key in promotion.METRICS}
    data = json.loads(tags.get("data.identity", "{}"))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(found.run_id, PER_FACE, tmp)
        except Exception as err:  # missing artifact or unreachable store
            raise PromotionError(
                f"{name} version {version}: cannot read {PER_FACE} of run {found.run_id} ({err})"
            ) from err
        table = pq.read_table(path, columns=["face_id", "nme"])
    return VersionResult(
        version=str(version),
        metrics=metrics,
        data=data,
        face_id=table.column("face_id").to_numpy().astype(np.int64),
        nme=table.column("nme").to_numpy().astype(np.float64),
    )


def promote(params: Params, version: str | None, *, force: bool, reason: str | None) -> str:
    """Gate `version` (default: the challenger) against the champion; move `champion` if it passes.

    Returns the comparison text. Raises PromotionRefused when the gate says no and `force` is off.
    """
    if force and not reason:
        raise PromotionError("--force needs --reason TEXT: the reason is recorded on the model versions")
    tracking = connect(params.tracking)
    name = params.registry.model_name
    _registered(tracking, name)
    candidate = version or _alias(tracking, name, CHALLENGER)
    if candidate is None:
        raise PromotionError(f"{name} has no alias {CHALLENGER!r}: pass --version N")
    champion = _alias(tracking, name, CHAMPION)
    if champion == str(candidate):
        return f"{name} version {candidate} is already the champion"
    decision = _decide(tracking, name, str(candidate), champion, params, force=force)
    text = promotion.format_comparison(decision) if decision else ""
    if decision is not None and not decision.accepted and not force:
        raise PromotionRefused(f"{name} version {candidate} not promoted: {decision.reasons[0]}", text)
    kind = "first" if champion is None else ("promote" if decision and decision.accepted else "force")
    why = reason if kind == "force" else "; ".join(decision.reasons if decision else [])
    _move(tracking, name, kind, champion, str(candidate), why or kind)
    return f"{text}\n{name}: champion -> version {candidate} ({kind})".lstrip()


def _decide(
    tracking: Tracking, name: str, candidate: str, champion: str | None, params: Params, *, force: bool
) -> Decision | None:
    """The gate's decision; with --force, a comparison that cannot be made (other faces) is skipped."""
    rules = GateRules.from_params(params.registry)
    try:
        result = version_result(tracking, name, candidate)
        best = version_result(tracking, name, champion) if champion else None
        return promotion.decide(result, best, rules)
    except PromotionError as err:
        if not force:
            raise
        logger.warning("%s: no comparison; --force moves the champion anyway", err)
        return None


def rollback(params: Params, reason: str | None) -> str:
    """Move `champion` back to the champion before the current one."""
    tracking = connect(params.tracking)
    name = params.registry.model_name
    target = promotion.rollback_target(moves(tracking, name))
    current = _alias(tracking, name, CHAMPION)
    _move(tracking, name, "rollback", current, target, reason or "rollback")
    return f"{name}: champion -> version {target} (rolled back from version {current})"


def _move(
    tracking: Tracking, name: str, kind: str, from_version: str | None, to_version: str, reason: str
) -> None:
    """Point `champion` at `to_version` and record the move on the model and both versions."""
    client = tracking.client
    history = moves(tracking, name)
    move = promotion.new_move(len(history) + 1, kind, from_version, to_version, reason)
    tracking.call("set the alias", client.set_registered_model_alias, name, CHAMPION, to_version)
    tracking.call(
        "record the move",
        client.set_registered_model_tag,
        name,
        f"{MOVE_TAG}{move['seq']:04d}",
        json.dumps(move),
    )
    tags = {
        "wflw.promoted_at": move["at"],
        "wflw.promoted_from": str(from_version),
        "wflw.promotion_reason": reason,
    }
    for key, value in tags.items():
        tracking.call("tag the version", client.set_model_version_tag, name, to_version, key, value)
    if from_version is not None:
        for key, value in {"wflw.demoted_at": move["at"], "wflw.demoted_by": to_version}.items():
            tracking.call("tag the version", client.set_model_version_tag, name, from_version, key, value)


def models(params: Params) -> str:
    """The versions (aliases, metrics, data, run) and the champion's history, as text."""
    tracking = connect(params.tracking)
    name = params.registry.model_name
    registered = _registered(tracking, name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (registered.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    found = tracking.call("list the versions", tracking.client.search_model_versions, f"name = '{name}'")
    header = f"{'version':>7}  {'aliases':<20} {'NME test':>8} {'FR':>6} {'AUC':>6}  {'data':<10} run"
    lines = [f"registered model {name} at {tracking.uri}", header]
    for version in sorted(found, key=lambda v: int(v.version)):
        tags = version.tags
        lines.append(
            f"{version.version:>7}  {','.join(sorted(aliases.get(str(version.version), []))) or '-':<20} "
            f"{_tag(tags, 'nme_test', 3):>8} {_tag(tags, 'fr_test', 2):>6} {_tag(tags, 'auc_test', 4):>6}  "
            f"{tags.get('data.source', '-'):<10} {version.run_id}"
        )
    history = moves(tracking, name)
    lines.append("champion history:" if history else "champion history: none yet")
    for move in history:
        lines.append(
            f"  {move['seq']:>3}. {move['at']}  {move['kind']:<8} v{move['from'] or '-'} -> v{move['to']}: "
            f"{move['reason']}"
        )
    return "\n".join(lines)


def _tag(tags: dict[str, str], key: str, digits: int) -> str:
    return f"{float(tags[key]):.{digits}f}" if key in tags else "-"
