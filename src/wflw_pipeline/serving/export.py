"""ONNX export of a trained model.pt, and its check against PyTorch with onnxruntime.

The graph takes what the pyfunc model takes and returns what it returns (uint8 crops in, crop-pixel
landmarks out, N dynamic), with the view, the model's normalisation and the map back to crop pixels
inside. onnx, onnxscript and onnxruntime are imported only here, and only when used.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.engine import CROP_BATCH
from ..core.geometry import View
from ..core.model import Normalize, load_trained
from ..data import wflw
from ..errors import PipelineError
from ..fileio import atomic_path
from ..params import Params
from .inference import LandmarkPredictor
from .model_uri import model_file

logger = logging.getLogger(__name__)

OPSET = 18
INPUT, OUTPUT = "crops", "landmarks"
TOLERANCE_PX = 1e-3
"""The most an onnxruntime prediction may differ from PyTorch's, in crop pixels."""


class ExportError(PipelineError):
    """ONNX export impossible (a missing package) or not faithful (onnxruntime disagrees with PyTorch)."""


class CropsToLandmarks(nn.Module):
    """uint8 crops (N, S, S, 3) -> landmarks (N, 98, 2) in crop pixels: engine.predict's un-augmented view."""

    def __init__(self, model: nn.Module, view: View, normalize: Normalize) -> None:
        super().__init__()
        self.model = model
        shown = view.crop_size / view.context
        margin = (view.crop_size - shown) / 2
        centres = (torch.arange(view.input_size, dtype=torch.float32) + 0.5) * (shown / view.input_size)
        axis = (centres + margin) * (2.0 / view.crop_size) - 1.0  # grid_sample units, align_corners=False
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1)
        self.register_buffer("grid", grid.unsqueeze(0))
        self.register_buffer("mean", torch.tensor(normalize.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(normalize.std).view(1, 3, 1, 1))
        self.scale, self.offset = shown, margin

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        images = crops.permute(0, 3, 1, 2).float()
        grid = self.grid.expand(images.shape[0], -1, -1, -1)
        inputs = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        points = self.model((inputs - self.mean) / self.std)
        return points * self.scale + self.offset


def require(module: str) -> None:
    """A clear error, not an ImportError traceback, where a package ONNX needs is not installed (a bare
    GPU box may have the torch stack only)."""
    if importlib.util.find_spec(module) is None:
        raise ExportError(f"{module} is not installed: install the project's requirements.lock")


QUIET = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")
"""Loggers of the exporter that report every optimisation pass at INFO."""


def export_onnx(model_path: Path, out: Path) -> Path:
    """Write the ONNX graph of `model_path` (a model.pt of `wflw train`) to `out`, weights inside, with the
    crop rule as metadata `wflw.crop` (JSON: bbox, padding, context, crop_size, input_size)."""
    for module in ("onnx", "onnxscript"):
        require(module)
    import onnx

    trained = load_trained(model_path)
    model = trained.model.to(memory_format=torch.contiguous_format)
    module = CropsToLandmarks(model, trained.view, trained.normalize)
    size = trained.view.crop_size
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with atomic_path(out) as temp, _quiet(), torch.no_grad():
        torch.onnx.export(
            module.eval(),
            (example,),
            str(temp),
            input_names=[INPUT],
            output_names=[OUTPUT],
            opset_version=OPSET,
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
        graph = onnx.load(str(temp))
        crop = {"bbox": trained.crop.bbox, "padding": trained.crop.padding, **asdict(trained.view)}
        onnx.helper.set_model_props(graph, {"wflw.crop": json.dumps(crop)})
        onnx.save(graph, str(temp))
    return out


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's INFO logs and deprecation warnings silenced."""
    loggers = [logging.getLogger(name) for name in QUIET]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        for each in loggers:
            each.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for each, level in zip(loggers, levels, strict=True):
                each.setLevel(level)


def check_onnx(onnx_path: Path, model_path: Path, crops: np.ndarray) -> float:
    """Max abs difference (crop px) between onnxruntime and PyTorch on `crops`, one at a time and as a
    batch; ExportError when it exceeds TOLERANCE_PX."""
    expected = LandmarkPredictor.load(model_path).predict(crops)
    session = OnnxPredictor(onnx_path, int(np.shape(crops)[1]))
    runs = (session.predict(crops, batch_size=len(crops)), session.predict(crops, batch_size=1))
    worst = max(float(np.abs(points - expected).max()) for points in runs)
    if not worst < TOLERANCE_PX:
        raise ExportError(
            f"{onnx_path}: onnxruntime differs from PyTorch by {worst:.3g} px (tolerance {TOLERANCE_PX})"
        )
    return worst


def noise_crops(crop_size: int, count: int = 8, seed: int = 0) -> np.ndarray:
    """Random uint8 crops for the check when no faces are at hand (parity needs no faces)."""
    return np.random.default_rng(seed).integers(0, 256, (count, crop_size, crop_size, 3), dtype=np.uint8)


def export_checked(model_path: Path, out: Path, crops: np.ndarray | None = None) -> float:
    """`export_onnx`, then `check_onnx` on `crops` (default: noise crops); the largest difference in crop
    pixels."""
    export_onnx(model_path, out)
    if crops is None:
        crops = noise_crops(load_trained(model_path).view.crop_size)
    return check_onnx(out, model_path, crops)


def run_export(params: Params, model: str | None, out: Path) -> float:
    """`wflw export`: the model of --model (a file, or a models:/ or runs:/ URI; default the champion) as
    checked ONNX at `out`; the largest difference from PyTorch in crop pixels."""
    with tempfile.TemporaryDirectory(prefix="wflw-model-") as folder:
        model_path, name = model_file(params, model, Path(folder))
        worst = export_checked(model_path, out)
    logger.info("wrote %s from %s: onnxruntime matches PyTorch to %.2g px", out, name, worst)
    return worst


class OnnxPredictor:
    """An exported model in onnxruntime (CPU), with LandmarkPredictor's `predict`: crops -> crop pixels."""

    def __init__(self, path: Path, crop_size: int) -> None:
        require("onnxruntime")
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.crop_size = crop_size

    def predict(self, crops: np.ndarray, batch_size: int = CROP_BATCH) -> np.ndarray:
        """Landmarks (N, 98, 2) float32 in crop pixels of uint8 crops (N, S, S, 3)."""
        crops = np.ascontiguousarray(crops, np.uint8)
        parts = [
            self.session.run([OUTPUT], {INPUT: crops[start : start + batch_size]})[0]
            for start in range(0, len(crops), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, wflw.NUM_POINTS, 2), np.float32)
