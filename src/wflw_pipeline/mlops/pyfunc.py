"""The model as an MLflow pyfunc, logged with models-from-code: the script pyfunc_model.py builds
`LandmarkModel`; the model directory holds that script, this package's source under code/ and model.pt,
which `load_context` reads with `weights_only=True`; nothing is pickled."""

from __future__ import annotations

import logging
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModelContext
from mlflow.types import Schema, TensorSpec

from ..core.engine import predict_crops
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


class LandmarkModel(mlflow.pyfunc.PythonModel):
    """uint8 crops (N, S, S, 3) in, float32 landmarks (N, 98, 2) in crop pixels out."""

    def load_context(self, context: PythonModelContext) -> None:
        self.trained = load_trained(Path(context.artifacts["model"]))

    def predict(
        self, context: PythonModelContext, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        return predict_crops(self.trained, np.asarray(model_input))


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
    crop_size = load_trained(model_path).view.crop_size
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
        with fluent(tracking.uri):
            return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))

    local = Path(tracking.call(f"download {uri} (`wflw models` lists the versions)", download))
    path = local / "artifacts" / "model.pt"
    if not path.is_file():
        raise TrackingError(f"{uri}: not a model logged by `wflw register` (it has no artifacts/model.pt)")
    return path
