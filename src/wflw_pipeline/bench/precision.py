"""`wflw bench precision`: one trained model on the same faces in fp32 and in bf16 autocast (with DeepPose's
fp32 head: what train and evaluate run on CUDA), at evaluate.batch_size on evaluate.device.

The table shows what bf16 costs in NME and how far its points move from fp32's, in input pixels. No flip
test (one forward per face).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.engine import predict
from ..core.metrics import nme_per_face
from ..core.model import load_trained
from ..core.runtime import Precision, resolve_device
from ..data.dataset import load_faces
from ..params import Params
from ..tables import format_table
from .common import header, write_result

SETTINGS: tuple[tuple[str, torch.dtype | None], ...] = (("fp32", None), ("bf16, fp32 head", torch.bfloat16))
"""(name, autocast dtype)."""


def run_precision(
    *, params: Params, checkpoint: Path, parquet: Path, out_dir: Path, command: str | None
) -> dict[str, Any]:
    """Predict `parquet`'s faces with `checkpoint` in each setting; NME and distance from fp32."""
    device = resolve_device(params.evaluate.device, key="evaluate.device")
    trained = load_trained(checkpoint, device)
    model, view = trained.model, trained.view
    faces = load_faces(parquet, device)
    to_input_px = view.input_size * view.context / view.crop_size
    gt = faces.landmarks.cpu().numpy()
    points: dict[str, np.ndarray] = {}
    rows = []
    for name, dtype in SETTINGS:
        precision = Precision(dtype, True)
        batch_size = params.evaluate.batch_size
        pred = predict(
            model, faces, view=view, batch_size=batch_size, precision=precision, normalize=trained.normalize
        )
        points[name] = pred.double().numpy()
        moved = np.linalg.norm(points[name] - points["fp32"], axis=2) * to_input_px
        rows.append(
            {
                "setting": name,
                "nme": 100.0 * float(nme_per_face(points[name], gt).mean()),
                "mean_shift_px": float(moved.mean()),
                "max_shift_px": float(moved.max()),
            }
        )
    result = {
        **header("precision", device, command),
        "checkpoint": str(checkpoint),
        "parquet": str(parquet),
        "faces": len(faces),
        "input_size": view.input_size,
        "settings": rows,
    }
    table = format_table(
        ["setting", "NME (%)", "mean shift from fp32 (input px)", "max shift (input px)"],
        [
            [r["setting"], f"{r['nme']:.4f}", f"{r['mean_shift_px']:.4f}", f"{r['max_shift_px']:.3f}"]
            for r in rows
        ],
    )
    write_result(out_dir, "precision", result, table)
    return result
