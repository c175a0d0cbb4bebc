"""The models-from-code script MLflow logs and runs to build the pyfunc model (no pickle involved)."""

import mlflow

from wflw_pipeline.tracking.pyfunc import LandmarkModel

mlflow.models.set_model(LandmarkModel())
