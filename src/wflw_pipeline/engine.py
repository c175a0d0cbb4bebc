"""The training and prediction loops over in-memory face sets: no file I/O, no params files."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from . import augment, wflw
from .dataset import FaceSet, batch_indices
from .errors import PipelineError
from .params import AugmentParams
from .progress import progress_bar
from .runtime import Precision

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class NonFiniteLossError(PipelineError):
    """The loss became NaN or infinite: training cannot go on from here."""


@dataclass(frozen=True)
class View:
    """How a stored crop becomes the network input: its central crop_size/context px, resized."""

    crop_size: int
    context: float
    input_size: int


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Network inputs and [0, 1] targets of the faces `index` (on the faces' device), seen through `draws`.

    With `out` (e.g. the previous batch's inputs, once its step is done), the inputs are written there.
    """
    inputs, targets = augment.augment_batch(
        faces.images,
        faces.landmarks,
        index=index,
        params=draws,
        crop_size=view.crop_size,
        context=view.context,
        out_size=view.input_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
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


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    faces: FaceSet,
    *,
    view: View,
    augmentation: AugmentParams,
    batch_size: int,
    order_generator: torch.Generator,
    augment_generator: torch.Generator,
    precision: Precision,
    rank: int = 0,
    world_size: int = 1,
    check_every: int = 50,
    progress: bool = True,
) -> EpochResult:
    """One pass over `faces` (this rank's share of each batch); the result sums every rank.

    Raises NonFiniteLossError on a NaN/inf loss.
    """
    device = faces.images.device
    model.train()
    total = torch.zeros((), device=device, dtype=_accumulator_dtype(device))
    seen, start, lr = 0, time.perf_counter(), optimizer.param_groups[0]["lr"]
    inputs: torch.Tensor | None = None  # the last step's inputs, overwritten by the next (CPU)
    batches = _on_device(
        batch_indices(
            len(faces),
            batch_size,
            shuffle=True,
            generator=order_generator,
            drop_last=len(faces) >= batch_size * world_size,
            rank=rank,
            world_size=world_size,
        ),
        device,
    )
    for step, index in enumerate(
        progress_bar(batches, desc="train", unit="batch", disable=not progress, leave=False)
    ):
        draws = draw(augmentation, len(index), augment_generator, device)
        inputs, targets = inputs_and_targets(
            faces, index, view, draws, precision, out=reusable(inputs, len(index))
        )
        lr = optimizer.param_groups[0]["lr"]
        loss = train_step(model, optimizer, scheduler, loss_fn, inputs, targets, precision)
        total += loss * len(index)
        seen += len(index)
        if (step + 1) % check_every == 0 or step + 1 == len(batches):
            _check_finite(total, step)
    totals = torch.stack([total, torch.tensor(float(seen), device=device, dtype=total.dtype)])
    if world_size > 1:
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


def _check_finite(total: torch.Tensor, step: int) -> None:
    if not math.isfinite(float(total)):
        raise NonFiniteLossError(
            f"the training loss became NaN or infinite by step {step + 1} of this epoch; "
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
            inputs, _ = inputs_and_targets(faces, index, view, draws, precision)
            with precision.autocast(device):
                pred = model(inputs)
            matrices = augment.view_matrices(draws, view.crop_size, view.context, view.input_size)
            points.append(_crop_points(pred, matrices, draws.flip, view.input_size))
        outputs.append(torch.stack(points).mean(dim=0))
    if not outputs:
        return torch.zeros((0, wflw.NUM_POINTS, 2))
    return torch.cat(outputs).cpu()


def epoch_generators(
    seed: int, epoch: int, rank: int, device: torch.device
) -> tuple[torch.Generator, torch.Generator]:
    """The batch-order generator (the same on every rank) and this rank's augmentation generator."""
    order = torch.Generator().manual_seed(seed * 100_003 + epoch)
    augmentation = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch * 1_009 + rank + 1)
    return order, augmentation
