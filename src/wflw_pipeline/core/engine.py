"""The training and prediction loops over in-memory face sets, and crops in, points out for a trained
model: no file I/O, no params files."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import augment, wflw
from ..data.dataset import FaceSet, batch_indices, iters_per_epoch
from ..errors import PipelineError
from ..params import AugmentParams
from ..progress import progress_bar
from .geometry import View
from .model import IMAGENET, Normalize, TrainedModel
from .runtime import Precision, resolve_precision

CROP_BATCH = 64
"""Crops per forward pass of `predict_crops` (and the serving predictors) where the caller does not say."""
_PIXELS = "crops must be integers in 0..255"


class NonFiniteLossError(PipelineError):
    """The loss became NaN or infinite: training cannot go on from here."""


class InferenceError(PipelineError):
    """Crops the model cannot take: wrong shape, crop size or pixel values."""


@dataclass(frozen=True)
class EpochResult:
    """One epoch: mean loss over every rank's images, the learning rate of its last step, wall time."""

    loss: float
    images: int
    seconds: float
    lr: float


def draw(
    config: AugmentParams, batch: int, generator: torch.Generator, device: torch.device
) -> augment.ViewParams:
    """Random view parameters for one batch, as configured."""
    return augment.draw_params(
        batch,
        generator=generator,
        device=device,
        flip_prob=config.flip_prob,
        scale_range=(config.scale_min, config.scale_max),
        rotation_deg=config.rotation_deg,
        rotation_prob=config.rotation_prob,
        shift_frac=config.shift_frac,
        shift_prob=config.shift_prob,
    )


def inputs_and_targets(
    faces: FaceSet,
    index: torch.Tensor,
    view: View,
    draws: augment.ViewParams,
    precision: Precision,
    out: torch.Tensor | None = None,
    normalize: Normalize = IMAGENET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Network inputs and [0, 1] targets of the faces `index` (on the faces' device), seen through `draws`.

    With `out` (e.g. the previous batch's inputs, once its step is done), the inputs are written there.
    `normalize` is train's; a trained model's own is in its model.pt.
    """
    inputs, targets = augment.augment_batch(
        faces.images,
        faces.landmarks,
        index=index,
        params=draws,
        crop_size=view.crop_size,
        context=view.context,
        out_size=view.input_size,
        mean=normalize.mean,
        std=normalize.std,
        memory_format=precision.memory_format(),
        out=out,
    )
    return inputs, targets


def reusable(previous: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """The previous batch's input tensor to write the next batch into, on the CPU (else None).

    A fresh 50 MB tensor per batch costs the CPU a page fault per 4 KiB, as much time as the warp
    itself; CUDA's caching allocator already hands back the same memory, so it gets None.
    """
    if previous is None or previous.device.type != "cpu" or len(previous) != batch:
        return None
    return previous


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    precision: Precision,
) -> torch.Tensor:
    """One optimisation step: forward under autocast, the loss in fp32, backward, Adam, schedule.

    Returns the (detached) loss of the batch.
    """
    with precision.autocast(inputs.device):
        pred = model(inputs)
    loss = loss_fn(pred.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


class EpochBatches:
    """The batches of one epoch (this rank's share of each): the augmented network inputs and targets.

    The batch order is drawn when it is made, the augmentation as it is iterated; on the CPU each batch's
    inputs are written over the previous one's (`reusable`), so use a batch before taking the next.
    """

    def __init__(
        self,
        faces: FaceSet,
        *,
        view: View,
        augmentation: AugmentParams,
        batch_size: int,
        drop_last: bool,
        order_generator: torch.Generator,
        augment_generator: torch.Generator,
        precision: Precision,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.faces, self.view, self.augmentation, self.precision = faces, view, augmentation, precision
        self.augment_generator, self.world_size = augment_generator, world_size
        steps = iters_per_epoch(len(faces), batch_size, world_size, drop_last)
        indices = batch_indices(
            len(faces), batch_size, shuffle=True, generator=order_generator, rank=rank, world_size=world_size
        )
        self.indices = _on_device(itertools.islice(indices, steps), faces.images.device)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.faces.images.device
        inputs: torch.Tensor | None = None
        for index in self.indices:
            draws = draw(self.augmentation, len(index), self.augment_generator, device)
            out = reusable(inputs, len(index))
            inputs, targets = inputs_and_targets(self.faces, index, self.view, draws, self.precision, out=out)
            yield inputs, targets


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    batches: EpochBatches,
    *,
    progress: bool = True,
) -> EpochResult:
    """One pass over `batches` (this rank's share of each); the result sums every rank.

    Raises NonFiniteLossError on a NaN/inf loss.
    """
    device = batches.faces.images.device
    model.train()
    total = torch.zeros((), device=device, dtype=_accumulator_dtype(device))
    seen, start, lr = 0, time.perf_counter(), optimizer.param_groups[0]["lr"]
    shown = progress_bar(batches, desc="train", unit="batch", disable=not progress, leave=False)
    for inputs, targets in shown:
        lr = optimizer.param_groups[0]["lr"]
        loss = train_step(model, optimizer, scheduler, loss_fn, inputs, targets, batches.precision)
        total += loss * len(inputs)
        seen += len(inputs)
    _check_finite(total)
    totals = torch.stack([total, torch.tensor(float(seen), device=device, dtype=total.dtype)])
    if batches.world_size > 1:
        torch.distributed.all_reduce(totals)
    loss_sum, images = totals.tolist()
    return EpochResult(loss_sum / max(images, 1), int(images), time.perf_counter() - start, lr)


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for the epoch's loss sum, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _on_device(batches: Iterable[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The epoch's index batches moved to `device` in one copy (a blocking copy per step would make the
    host wait for the GPU every step)."""
    batches = list(batches)
    if not batches:
        return []
    return list(torch.cat(batches).to(device).split([len(b) for b in batches]))


def _check_finite(total: torch.Tensor) -> None:
    if not math.isfinite(float(total)):
        raise NonFiniteLossError(
            "the training loss became NaN or infinite in this epoch; "
            "try a lower train.lr or a longer train.warmup_iters (the last good checkpoint is kept)"
        )


def _crop_points(
    pred: torch.Tensor, matrices: torch.Tensor, flipped: torch.Tensor, input_size: int
) -> torch.Tensor:
    """Map normalised predictions of a view back to crop pixels, undoing a flip's point permutation."""
    crop = augment.apply_affine(matrices, pred.float() * input_size)
    unflipped = crop[:, augment.flip_permutation(crop.device)]
    return torch.where(flipped[:, None, None], unflipped, crop)


@torch.no_grad()
def predict(
    model: nn.Module,
    faces: FaceSet,
    *,
    view: View,
    batch_size: int,
    precision: Precision,
    normalize: Normalize,
    flip_test: bool = False,
) -> torch.Tensor:
    """Landmarks (N, 98, 2) in crop pixels; with flip_test, averaged with the un-flipped mirror's."""
    device = faces.images.device
    model.eval()
    outputs = []
    for index in _on_device(batch_indices(len(faces), batch_size, shuffle=False), device):
        identity = augment.identity_params(len(index), device)
        views = [identity]
        if flip_test:
            views.append(replace(identity, flip=torch.ones_like(identity.flip)))
        points = []
        for draws in views:
            inputs, _ = inputs_and_targets(faces, index, view, draws, precision, normalize=normalize)
            with precision.autocast(device):
                pred = model(inputs)
            matrices = augment.view_matrices(draws, view.crop_size, view.context, view.input_size)
            points.append(_crop_points(pred, matrices, draws.flip, view.input_size))
        outputs.append(torch.stack(points).mean(dim=0))
    if not outputs:
        return torch.zeros((0, wflw.NUM_POINTS, 2))
    return torch.cat(outputs).cpu()


def predict_crops(trained: TrainedModel, crops: Any, batch_size: int = CROP_BATCH) -> np.ndarray:
    """Landmarks (N, 98, 2) float32 in crop pixels of RGB crops (N, S, S, 3) of 0..255 values made by
    `trained.crop`: fp32, no flip test, so what `wflw evaluate` computes with those settings."""
    if batch_size < 1:
        raise InferenceError(f"batch_size: expected a positive integer, found {batch_size}")
    pixels = np.array(checked_crops(crops, trained.view.crop_size))
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(trained.device)
    points = predict(
        trained.model,
        _unlabelled(images, trained.view),
        view=trained.view,
        batch_size=batch_size,
        precision=resolve_precision("fp32", trained.channels_last, trained.device),
        normalize=trained.normalize,
    )
    return points.to(torch.float32).numpy()


def checked_crops(crops: Any, size: int) -> np.ndarray:
    """`crops` as uint8 (N, S, S, 3) (uint8 as is), or InferenceError naming the first thing wrong: the
    shape, or a value that is not an integer in 0..255 (never rounded; 255.0 is 255)."""
    array = checked_shape(crops, size)
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "iufO":
        raise InferenceError(f"{_PIXELS}: found values of dtype {array.dtype}")
    bad = _first_non_pixel(array)
    if bad is not None:
        crop, row, column, channel = bad
        place = f"crop {crop}, row {row}, column {column}, channel {channel}"
        raise InferenceError(f"{_PIXELS}: found {_shown(array[bad])} at {place}")
    return array.astype(np.uint8)


def checked_shape(crops: Any, size: int) -> np.ndarray:
    """`crops` as an array of shape (N, S, S, 3), its values unchecked, or InferenceError naming the shape."""
    array = np.asarray(crops)
    if array.ndim != 4 or array.shape[1:] != (size, size, 3):
        raise InferenceError(f"crops must have shape (N, {size}, {size}, 3): found {array.shape}")
    return array


def _first_non_pixel(array: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first value of numeric or object `array` that is not an integer in 0..255, None when
    all are."""
    if array.dtype == object:
        pixel = np.vectorize(_is_pixel, otypes=[bool])(array)
    else:
        pixel = (array >= 0) & (array <= 255) & (np.floor(array) == array)
    if pixel.all():
        return None
    return tuple(int(i) for i in np.unravel_index(np.argmin(pixel), array.shape))


def _is_pixel(value: Any) -> bool:
    """An int or float (not a bool) that is an integer in 0..255: one value of an object array."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return 0 <= value <= 255 and value % 1 == 0


def _shown(value: Any) -> str:
    """`value` as Python writes it: 0.5, 256, None, '7' (a numpy scalar as its Python value)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _unlabelled(images: torch.Tensor, view: View) -> FaceSet:
    """A FaceSet of unlabelled crops (N, 3, S, S) for `predict`, which reads only the pixels."""
    n = len(images)
    return FaceSet(
        images=images,
        landmarks=torch.zeros((n, wflw.NUM_POINTS, 2), device=images.device),
        flags=torch.zeros((n, len(wflw.ATTRIBUTES)), dtype=torch.bool, device=images.device),
        face_id=torch.arange(n, device=images.device),
        crop_to_image=np.zeros((n, 2, 3)),
        crop={"crop_size": view.crop_size, "context": view.context},
    )


def epoch_generators(
    seed: int, epoch: int, rank: int, device: torch.device
) -> tuple[torch.Generator, torch.Generator]:
    """The batch-order generator (the same on every rank) and this rank's augmentation generator."""
    order = torch.Generator().manual_seed(seed * 100_003 + epoch)
    augmentation = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch * 1_009 + rank + 1)
    return order, augmentation
