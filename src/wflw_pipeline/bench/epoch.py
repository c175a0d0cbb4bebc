"""`wflw bench epoch`: whole epochs of `engine.train_one_epoch` (data + step) on in-memory crops, and the
time the params' schedule (train.epochs of data.synthetic.train_faces) would take at that speed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .. import fileio
from ..core import engine
from ..core.losses import loss_from_params
from ..core.runtime import compile_model
from ..data.dataset import iters_per_epoch, random_faces
from ..params import Params
from ..tables import format_table
from .common import (
    build_training,
    header,
    median,
    peak_memory,
    require,
    reset_memory,
    training_device,
    write_result,
)

logger = logging.getLogger(__name__)


def run_epoch(
    *, params: Params, faces: int | None, epochs: int, out_dir: Path, command: str | None
) -> dict[str, Any]:
    """Whole epochs of engine.train_one_epoch as train runs them; the projected schedule; epoch.json."""
    train, model_params = params.train, params.model
    faces = faces or params.data.synthetic.train_faces
    batch_size = train.batch_size
    require(faces >= batch_size, f"--faces ({faces}) must be >= train.batch_size ({batch_size})")
    require(epochs >= 1, "--epochs must be >= 1")
    device, precision = training_device(train)
    faceset = random_faces(faces, params.convert.crop_size, params.convert.context, device)
    view = engine.View(faceset.crop_size, faceset.context, model_params.input_size)
    iters = iters_per_epoch(faces, batch_size, drop_last=train.drop_last)
    model, optimizer, scheduler = build_training(params, device, precision, iters)
    step_model = compile_model(model, train.compile_cache) if train.compile else model
    loss_fn = loss_from_params(params.loss, model_params.input_size)
    reset_memory(device)
    rows = []
    for epoch in range(epochs):
        order, augment_gen = engine.epoch_generators(train.seed, epoch, 0, device)
        result = engine.train_one_epoch(
            step_model,
            optimizer,
            scheduler,
            loss_fn,
            engine.EpochBatches(
                faceset,
                view=view,
                augmentation=params.augment,
                batch_size=batch_size,
                drop_last=train.drop_last,
                order_generator=order,
                augment_generator=augment_gen,
                precision=precision,
            ),
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
    schedule_faces = params.data.synthetic.train_faces
    per_epoch_images = (schedule_faces // batch_size) * batch_size  # drop_last, as train_one_epoch does
    schedule_images = train.epochs * per_epoch_images
    warm_overhead = max(0.0, rows[0]["seconds"] - rows[0]["images"] / images_per_s) if len(rows) > 1 else 0.0
    projected = schedule_images / images_per_s
    result = {
        **header("epoch", device, command),
        "complete": True,
        "arch": model_params.arch,
        "faces": faces,
        "crop_size": faceset.crop_size,
        "context": faceset.context,
        "input_size": model_params.input_size,
        "batch_size": batch_size,
        "precision": precision.name,
        "channels_last": precision.channels_last,
        "compile": train.compile,
        "epochs": rows,
        "images_per_s": images_per_s,
        "first_epoch_overhead_s": warm_overhead,
        "reference": {"faces": schedule_faces, "epochs": train.epochs, "images": schedule_images},
        "projected_reference_s": projected,
        "projected_reference_with_warmup_s": projected + warm_overhead,
        "note": "train_one_epoch only (no val prediction, no checkpoint); steady: median of epochs 2..; "
        "reference: train.epochs of data.synthetic.train_faces",
        **peak_memory(device),
    }
    table = format_table(
        ["epoch", "seconds", "images", "images/s", "loss"],
        [[r["epoch"], r["seconds"], r["images"], r["images_per_s"], r["loss"]] for r in rows],
    )
    summary = format_table(
        [
            "steady images/s",
            f"projected {train.epochs} x {schedule_faces:,} faces",
            "+ first-epoch overhead",
            "peak mem GiB",
        ],
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
        f"\nepoch: {model_params.arch} {model_params.input_size}px, {faces} faces of {faceset.crop_size}px "
        f"crops, batch {batch_size}, {precision.name}, compile={train.compile}, {device}"
    )
    write_result(out_dir, "epoch", result, f"{title}\n{table}\n\n{summary}")
    return result


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
