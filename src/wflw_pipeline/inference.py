"""Crops in, landmarks out: a trained model.pt applied to crops like the decoded Parquet `crop_jpeg`.

The prediction is `engine.predict` in fp32 without flip test, so it equals what `wflw evaluate` computes
with `evaluate.flip_test: false` and `evaluate.precision: fp32` on the same crops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import wflw
from .dataset import FaceSet
from .engine import View, predict
from .errors import PipelineError
from .model import DeepPose, load_trained
from .runtime import Precision, resolve_precision


class InferenceError(PipelineError):
    """Crops the model cannot take: wrong shape, crop size or pixel values."""


class LandmarkPredictor:
    """A trained DeepPose and the view it was trained with; `predict` maps crops to crop-pixel points."""

    def __init__(self, model: DeepPose, view: View, precision: Precision, device: torch.device) -> None:
        self.model = model
        self.view = view
        self.precision = precision
        self.device = device

    @classmethod
    def load(cls, path: Path | str, device: torch.device | str = "cpu") -> LandmarkPredictor:
        """The model `wflw train` wrote to `path`, on `device` (model.CheckpointError for a bad file)."""
        device = torch.device(device)
        model, info = load_trained(Path(path), device)
        view = View(
            crop_size=int(info["view"]["crop_size"]),
            context=float(info["view"]["context"]),
            input_size=int(info["view"]["input_size"]),
        )
        precision = resolve_precision("fp32", bool(info["params"]["train"]["channels_last"]), device)
        return cls(model.to(memory_format=precision.memory_format()), view, precision, device)

    @property
    def crop_size(self) -> int:
        """Side in pixels of the square crops `predict` takes (the Parquet's `crop_size`)."""
        return self.view.crop_size

    def predict(self, crops: Any, batch_size: int = 64) -> np.ndarray:
        """Landmarks (N, 98, 2) float32 in crop pixels of uint8 crops (N, S, S, 3), S = `crop_size`."""
        if batch_size < 1:
            raise InferenceError(f"batch_size: expected a positive integer, found {batch_size}")
        images = torch.from_numpy(np.array(self._checked(crops), np.uint8)).permute(0, 3, 1, 2).contiguous()
        points = predict(
            self.model,
            _faces(images.to(self.device), self.view),
            view=self.view,
            batch_size=batch_size,
            precision=self.precision,
        )
        return points.to(torch.float32).numpy()

    def _checked(self, crops: Any) -> np.ndarray:
        """`crops` as an (N, S, S, 3) array of pixel values, or InferenceError naming what is wrong."""
        array = np.asarray(crops)
        size = self.crop_size
        if array.ndim != 4 or array.shape[1:] != (size, size, 3):
            raise InferenceError(
                f"crops: expected shape (N, {size}, {size}, 3) (RGB crops of the model's crop_size {size}), "
                f"found {array.shape}"
            )
        if array.dtype == np.uint8:
            return array
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise InferenceError(f"crops: expected uint8 pixels, found dtype {array.dtype}")
        if (
            np.issubdtype(array.dtype, np.floating)
            and not (np.isfinite(array) & (array == np.round(array))).all()
        ):
            raise InferenceError(
                f"crops: expected integer pixel values 0..255, found non-integer {array.dtype}"
            )
        if array.size and (array.min() < 0 or array.max() > 255):
            raise InferenceError(
                f"crops: expected pixel values 0..255, found {array.dtype} values from {array.min()} to "
                f"{array.max()}"
            )
        return array


def _faces(images: torch.Tensor, view: View) -> FaceSet:
    """A FaceSet of unlabelled crops (N, 3, S, S) for `engine.predict`, which reads only the pixels."""
    n = len(images)
    return FaceSet(
        images=images,
        landmarks=torch.zeros((n, wflw.NUM_POINTS, 2), device=images.device),
        flags=torch.zeros((n, len(wflw.ATTRIBUTES)), dtype=torch.bool, device=images.device),
        face_id=torch.arange(n, device=images.device),
        crop_to_image=np.zeros((n, 2, 3)),
        crop={"crop_size": view.crop_size, "context": view.context},
    )
