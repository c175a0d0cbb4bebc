"""`wflw bench epoch`: whole epochs of `engine.train_one_epoch` (data + step) on in-memory crops, and the
time the reference schedule (210 epochs of 7,500 faces) would take at that speed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import engine, fileio, wflw
from ..dataset import FaceSet
from ..losses import loss_from_params
from ..params import AugmentParams, LossParams, TrainParams
from ..runtime import configure_backends
from .common import (
    REFERENCE_EPOCHS,
    REFERENCE_FACES,
    format_table,
    header,
    median,
    peak_memory,
    precision_label,
    require,
    reset_memory,
    resolve_device,
    resolve_precision,
    write_result,
)
from .step import build_training, compile_model

logger = logging.getLogger(__name__)


def synthetic_faces(n: int, crop_size: int, context: float, device: torch.device) -> FaceSet:
    """N random uint8 crops with landmarks inside the central view, made on the device (speed only)."""
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(
        0, 256, (n, 3, crop_size, crop_size), dtype=torch.uint8, device=device, generator=generator
    )
    view = crop_size / context
    landmarks = (
        crop_size / 2 + (torch.rand(n, wflw.NUM_POINTS, 2, device=device, generator=generator) - 0.5) * view
    )
    return FaceSet(
        images=images,
        landmarks=landmarks,
        flags=torch.zeros(n, len(wflw.ATTRIBUTES), dtype=torch.bool, device=device),
        face_id=torch.arange(n, device=device),
        crop_to_image=np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (n, 1, 1)),
        crop={"crop_size": crop_size, "context": context},
    )


def run_epoch(
    *,
    out_dir: Path,
    augmentation: AugmentParams,
    loss: LossParams,
    train: TrainParams,
    arch: str = "resnet50",
    faces: int | None = None,
    crop_size: int = 384,
    context: float = 1.5,
    input_size: int = 256,
    batch_size: int | None = None,
    epochs: int = 3,
    device_name: str = "auto",
    precision_name: str = "auto",
    channels_last: bool | None = None,
    compile: str = "auto",
    compile_mode: str = "default",
    command: str | None = None,
) -> dict[str, Any]:
    """Whole epochs of engine.train_one_epoch (data + step), the projected reference schedule; epoch.json."""

    device = resolve_device(device_name)
    cuda = device.type == "cuda"
    faces = faces or (REFERENCE_FACES if cuda else 64)
    batch_size = batch_size or (256 if cuda else 16)
    require(faces >= batch_size, f"--faces ({faces}) must be >= --batch-size ({batch_size})")
    require(epochs >= 1, "--epochs must be >= 1")
    compiled = {"auto": cuda, "on": True, "off": False}[compile]
    precision = resolve_precision(precision_name, channels_last, device)
    configure_backends(device)
    faceset = synthetic_faces(faces, crop_size, context, device)
    view = engine.View(crop_size, context, input_size)
    # The optimiser and LR schedule of the loaded params (train.*), as `wflw train` would run them.
    model, optimizer, scheduler = build_training(arch, device, precision, train, max(1, faces // batch_size))
    step_model = compile_model(model, compile_mode) if compiled else model
    loss_fn = loss_from_params(loss, input_size)
    reset_memory(device)
    rows = []
    for epoch in range(epochs):
        order, augment_gen = engine.epoch_generators(0, epoch, 0, device)
        result = engine.train_one_epoch(
            step_model,
            optimizer,
            scheduler,
            loss_fn,
            faceset,
            view=view,
            augmentation=augmentation,
            batch_size=batch_size,
            order_generator=order,
            augment_generator=augment_gen,
            precision=precision,
            progress=False,
        )
        rows.append(
            {
                "epoch": epoch + 1,
                "seconds": result.seconds,
                "images": result.images,
                "images_per_s": result.images / result.seconds,
                "loss": result.loss,
            }
        )
        logger.info("epoch %d: %.2f s, %.0f images/s", epoch + 1, result.seconds, rows[-1]["images_per_s"])
        partial = {**header("epoch", device, command), "complete": False, "epochs": rows}
        fileio.write_json(Path(out_dir) / "epoch.json", partial)  # kept if a later epoch is killed
    steady = rows[1:] or rows
    images_per_s = median([r["images_per_s"] for r in steady])
    per_epoch_images = (REFERENCE_FACES // batch_size) * batch_size  # drop_last, as train_one_epoch does
    reference_images = REFERENCE_EPOCHS * per_epoch_images
    warm_overhead = max(0.0, rows[0]["seconds"] - rows[0]["images"] / images_per_s) if len(rows) > 1 else 0.0
    projected = reference_images / images_per_s
    result = {
        **header("epoch", device, command),
        "complete": True,
        "arch": arch,
        "faces": faces,
        "crop_size": crop_size,
        "context": context,
        "input_size": input_size,
        "batch_size": batch_size,
        "precision": precision_label(precision),
        "channels_last": precision.channels_last,
        "compile": compiled,
        "compile_mode": compile_mode if compiled else None,
        "epochs": rows,
        "images_per_s": images_per_s,
        "first_epoch_overhead_s": warm_overhead,
        "reference": {"faces": REFERENCE_FACES, "epochs": REFERENCE_EPOCHS, "images": reference_images},
        "projected_reference_s": projected,
        "projected_reference_with_warmup_s": projected + warm_overhead,
        "note": "train_one_epoch only (no val prediction, no checkpoint); steady: median of epochs 2..",
        **peak_memory(device),
    }
    table = format_table(
        ["epoch", "seconds", "images", "images/s", "loss"],
        [[r["epoch"], r["seconds"], r["images"], r["images_per_s"], r["loss"]] for r in rows],
    )
    summary = format_table(
        ["steady images/s", "projected 210 x 7,500 faces", "+ first-epoch overhead", "peak mem GiB"],
        [
            [
                images_per_s,
                _duration(projected),
                _duration(projected + warm_overhead),
                result["peak_memory_gib"],
            ]
        ],
    )
    title = (
        f"\nepoch: {arch} {input_size}px, {faces} faces of {crop_size}px crops, batch {batch_size}, "
        f"{result['precision']}, compile={compiled}, {device}"
    )
    write_result(out_dir, "epoch", result, f"{title}\n{table}\n\n{summary}")
    return result


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
