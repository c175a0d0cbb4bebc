"""WFLW face-landmark training pipeline: DeepPose + Wing loss, DVC stages, MLflow, Prefect."""

__version__ = "0.1.0"
