"""Crops in, landmarks out: a trained model.pt applied to crops like the decoded Parquet `crop_jpeg`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.engine import CROP_BATCH, predict_crops
from ..core.model import TrainedModel, load_trained


class LandmarkPredictor:
    """A trained model whose `predict` maps crops to crop-pixel points (`engine.predict_crops`)."""

    def __init__(self, trained: TrainedModel) -> None:
        self.trained = trained

    @classmethod
    def load(cls, path: Path | str, device: torch.device | str = "cpu") -> LandmarkPredictor:
        """The model `wflw train` wrote to `path`, on `device` (model.CheckpointError for a bad file)."""
        return cls(load_trained(Path(path), device))

    @property
    def crop_size(self) -> int:
        """Side in pixels of the square crops `predict` takes (the Parquet's `crop_size`)."""
        return self.trained.view.crop_size

    def predict(self, crops: Any, batch_size: int = CROP_BATCH) -> np.ndarray:
        """Landmarks (N, 98, 2) float32 in crop pixels of uint8 crops (N, S, S, 3), S = `crop_size`."""
        return predict_crops(self.trained, crops, batch_size)
