"""The model as an MLflow pyfunc, logged with models-from-code: the script pyfunc_model.py builds
`LandmarkModel`; the model directory holds that script, this package's source under code/ and model.pt,
which `load_context` reads with `weights_only=True`; nothing is pickled.

The signature declares only the output: with an input TensorSpec, MLflow's scoring server casts the JSON
to its dtype before `predict` (proto_json_utils.convert_data_type: np.array(values, dtype=uint8), which
truncates 0.5 to 0), so `engine.checked_crops` validates the values as sent and converts them itself."""

from __future__ import annotations

import logging
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModelContext
from mlflow.types import Schema, TensorSpec

from ..core.engine import InferenceError, checked_shape, predict_crops
from ..core.model import load_trained
from ..data import wflw
from ..params import TrackingParams
from .client import TrackingError, connect, fluent

logger = logging.getLogger(__name__)


MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
"""The models-from-code script: MLflow logs it with the model and runs it to build `LandmarkModel`."""
PACKAGE_DIR = Path(__file__).resolve().parents[1]
REQUIREMENTS = ("torch", "torchvision", "numpy", "pillow", "pyarrow", "tqdm", "pyyaml")
"""What the bundled package imports on the inference path, pinned to the installed versions at logging."""
MAX_CROPS = 256
"""The most crops one request to `mlflow models serve` may hold (README, "REST: MLflow's own server"): 256
crops of 96 px (37 MB of JSON) took 24 s and raised one worker's peak memory from 1.0 to 1.8 GB on 2 shared
CPU cores, most of it MLflow parsing the body before `predict`. Only serving is bounded (MLflow's serving
flag): `model.predict` in a Python process takes any number."""


class LandmarkModel(mlflow.pyfunc.PythonModel):
    """Crops (N, S, S, 3) of integers 0..255 in, float32 landmarks (N, 98, 2) in crop pixels out."""

    def load_context(self, context: PythonModelContext) -> None:
        self.trained = load_trained(Path(context.artifacts["model"]))

    def predict(
        self, context: PythonModelContext, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """The points of `model_input`; bad crops (`engine.checked_crops`) or, while serving, more than
        MAX_CROPS raise an MlflowException with INVALID_PARAMETER_VALUE, which the scoring server answers
        by HTTP 400. The count is checked after the shape and before the pixels are read."""
        try:
            crops = _within_limit(checked_shape(model_input, self.trained.view.crop_size))
            return predict_crops(self.trained, crops)
        except InferenceError as err:
            raise MlflowException.invalid_parameter_value(str(err)) from err


def _within_limit(crops: np.ndarray) -> np.ndarray:
    """`crops`, or an MlflowException (HTTP 400) where they are more than MAX_CROPS while serving."""
    if _MLFLOW_IS_IN_SERVING_ENVIRONMENT.get() and len(crops) > MAX_CROPS:
        raise MlflowException.invalid_parameter_value(
            f"at most {MAX_CROPS} crops per request, found {len(crops)}: split the batch"
        )
    return crops


def signature() -> ModelSignature:
    """Output only, float32 (-1, 98, 2) crop pixels: no input spec, so MLflow hands `predict` the values as
    sent (see the module's docstring) and `engine.checked_crops` is the one check of the crops."""
    return ModelSignature(outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, wflw.NUM_POINTS, 2))]))


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
    crop_size = load_trained(model_path).view.crop_size
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={"model": str(model_path), **({"onnx": str(onnx)} if onnx else {})},
        code_paths=[str(PACKAGE_DIR)],
        signature=signature(),
        input_example=np.full((1, crop_size, crop_size, 3), 128, np.uint8),
        pip_requirements=pip_requirements(),
        metadata={"crop_size": crop_size, "max_crops_per_request": MAX_CROPS},
    )


def download_model_file(config: TrackingParams, uri: str, dst: Path) -> Path:
    """The model.pt of a model logged by `wflw register` (models:/<name>@<alias>, models:/<name>/<version>,
    runs:/<run id>/model), downloaded with the model into `dst`."""
    tracking = connect(config)

    def download() -> str:
        with fluent(tracking.uri):
            return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))

    local = Path(tracking.call(f"download {uri} (`wflw models` lists the versions)", download))
    path = local / "artifacts" / "model.pt"
    if not path.is_file():
        raise TrackingError(f"{uri}: not a model logged by `wflw register` (it has no artifacts/model.pt)")
    return path
