"""The logged MLflow model: a models-from-code pyfunc around `inference.LandmarkPredictor`.

Nothing is pickled: the model directory holds model_code.py (which builds `LandmarkModel`), this package's
source under code/ (so a fresh environment with the pinned requirements can load it) and model.pt, which
`load_context` reads with `weights_only=True`.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModelContext
from mlflow.types import Schema, TensorSpec

from wflw_pipeline import wflw
from wflw_pipeline.inference import LandmarkPredictor

MODEL_CODE = Path(__file__).with_name("model_code.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
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
    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS]


def log_landmark_model(model_path: Path, *, name: str = "model") -> ModelInfo:
    """Log `model_path` (a model.pt of `wflw train`) as a models-from-code pyfunc into the active run.

    The model is loaded first, so a bad file raises model.CheckpointError before anything is logged.
    """
    crop_size = LandmarkPredictor.load(model_path).crop_size
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={"model": str(model_path)},
        code_paths=[str(PACKAGE_DIR)],
        signature=signature(crop_size),
        input_example=np.full((1, crop_size, crop_size, 3), 128, np.uint8),
        pip_requirements=pip_requirements(),
    )
