"""`wflw bench precision`: one trained model on the same faces in fp32, in bf16 autocast with the fp32
head (what train and evaluate run on CUDA), and in bf16 throughout (the head too, as before issue 8).

A bf16 number keeps 8 significant bits, so a coordinate in [0.5, 1) of the input moves in steps of
2^-8 of the input side: 0.25 px at 64 px, 1 px at 256 px. The table shows what that costs in NME and
how far each setting's points move from fp32's, in input pixels. No flip test (one forward per face).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..dataset import load_faces
from ..engine import View, predict
from ..metrics import nme_per_face
from ..model import load_trained
from ..runtime import Precision
from .common import format_table, header, resolve_device, write_result


class Bf16Head(nn.Module):
    """The regression head computed and returned in bf16, as autocast ran it before the fp32 head."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weight, bias = self.head.weight.bfloat16(), self.head.bias.bfloat16()
        return F.linear(features.bfloat16(), weight, bias)


SETTINGS: tuple[tuple[str, torch.dtype | None, bool], ...] = (
    ("fp32", None, False),
    ("bf16, fp32 head (default)", torch.bfloat16, False),
    ("bf16 throughout (bf16 head)", torch.bfloat16, True),
)
"""(name, autocast dtype, head in bf16)."""


def run_precision(
    *,
    checkpoint: Path,
    parquet: Path,
    batch_size: int,
    device_name: str,
    out_dir: Path,
    command: str | None,
) -> dict[str, Any]:
    """Predict `parquet`'s faces with `checkpoint` in each setting; NME and distance from fp32."""
    device = resolve_device(device_name)
    model, info = load_trained(checkpoint, device)
    faces = load_faces(parquet, device)
    view = View(
        int(info["view"]["crop_size"]), float(info["view"]["context"]), int(info["view"]["input_size"])
    )
    to_input_px = view.input_size * view.context / view.crop_size
    gt = faces.landmarks.cpu().numpy()
    exact_head = model.head
    points: dict[str, np.ndarray] = {}
    rows = []
    for name, dtype, bf16_head in SETTINGS:
        model.head = Bf16Head(exact_head) if bf16_head else exact_head
        pred = predict(model, faces, view=view, batch_size=batch_size, precision=Precision(dtype, True))
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
    model.head = exact_head
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
