"""Batched, on-device geometric augmentation: flip, scale, rotation and shift as one affine warp per batch.

The stored crop and the network input are both in continuous coordinates (README, "Coordinates").

The network sees the central `crop_size / context` square of the crop (the padded face box), resized to
`out_size`; augmentation moves, resizes, turns and mirrors that square, as MMPose 1.x's RandomFlip and
RandomBBoxTransform do to the face box.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import wflw

_PHI_MINUS_ONE = 0.5 * math.erfc(1.0 / math.sqrt(2.0))
"""The standard normal CDF at -1."""


@dataclass(frozen=True)
class ViewParams:
    """Per-sample geometric parameters, tensors of batch size B on one device.

    flip: (B,) bool, mirror the view about its vertical centre line.
    scale: (B,) side of the sampled square / side of the view (> 1 sees a larger region, the face smaller).
    angle: (B,) radians; a positive angle turns the sampled square clockwise on screen (y points
        down), so the face appears turned counter-clockwise in the output.
    shift: (B, 2) displacement of the view centre in the crop, x then y, as a fraction of the view side.
    """

    flip: Tensor
    scale: Tensor
    angle: Tensor
    shift: Tensor


def truncated_normal(uniform: Tensor) -> Tensor:
    """Map uniform [0, 1) samples to a standard normal truncated to [-1, 1] (inverse CDF, exact)."""
    p = _PHI_MINUS_ONE + uniform * (1.0 - 2.0 * _PHI_MINUS_ONE)
    return torch.special.ndtri(p).clamp(-1.0, 1.0)


def draw_params(
    batch: int,
    *,
    generator: torch.Generator,
    device: torch.device | str,
    flip_prob: float = 0.5,
    scale_range: tuple[float, float] = (0.75, 1.25),
    rotation_deg: float = 60.0,
    rotation_prob: float = 0.6,
    shift_frac: float = 0.16,
    shift_prob: float = 0.3,
) -> ViewParams:
    """Random parameters drawn as MMPose 1.x's RandomBBoxTransform (and RandomFlip) draw them.

    With t a standard normal truncated to [-1, 1]: shift = t * shift_frac per axis (one t each),
    applied with shift_prob; scale = mid + t * half-width of `scale_range`, always applied;
    angle = t * rotation_deg, applied with rotation_prob; flip with flip_prob. `generator` must live
    on `device`.
    """

    def uniform(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, device=device)

    low, high = scale_range
    shift = truncated_normal(uniform(batch, 2)) * shift_frac * (uniform(batch, 1) < shift_prob)
    scale = (low + high) / 2 + truncated_normal(uniform(batch)) * (high - low) / 2
    angle = truncated_normal(uniform(batch)) * math.radians(rotation_deg) * (uniform(batch) < rotation_prob)
    flip = uniform(batch) < flip_prob
    return ViewParams(flip=flip, scale=scale, angle=angle, shift=shift)


def identity_params(batch: int, device: torch.device | str) -> ViewParams:
    """Parameters that show the plain central view (evaluation)."""
    return ViewParams(
        flip=torch.zeros(batch, dtype=torch.bool, device=device),
        scale=torch.ones(batch, device=device),
        angle=torch.zeros(batch, device=device),
        shift=torch.zeros(batch, 2, device=device),
    )


def view_matrices(params: ViewParams, crop_size: int, context: float, out_size: int) -> Tensor:
    """(B, 2, 3) affines mapping output pixel coordinates to crop pixel coordinates.

    crop = R(angle) * (scale * view / out_size) * M(flip) * (out - out_size / 2) + crop_size / 2
    + shift * view, with view = crop_size / context and M(flip) = diag(-1, 1) for flipped samples:
    a flipped output is the mirror image of the same output unflipped.
    """
    view = crop_size / context
    step = params.scale * (view / out_size)
    cos, sin = params.angle.cos() * step, params.angle.sin() * step
    mirror = 1.0 - 2.0 * params.flip.to(step.dtype)
    linear = torch.stack([cos * mirror, -sin, sin * mirror, cos], dim=1).view(-1, 2, 2)
    centre = crop_size / 2 + params.shift * view
    translation = centre - linear.sum(dim=2) * (out_size / 2)
    return torch.cat([linear, translation.unsqueeze(2)], dim=2)


def invert_affine(matrices: Tensor) -> Tensor:
    """Inverse of each (2, 3) affine, in closed form."""
    a, b, c, d = matrices[:, 0, 0], matrices[:, 0, 1], matrices[:, 1, 0], matrices[:, 1, 1]
    linear = torch.stack([d, -b, -c, a], dim=1).view(-1, 2, 2) / (a * d - b * c).view(-1, 1, 1)
    translation = -(linear @ matrices[:, :, 2:])
    return torch.cat([linear, translation], dim=2)


def apply_affine(matrices: Tensor, points: Tensor) -> Tensor:
    """Map points (B, N, 2) through the (B, 2, 3) affines."""
    matrices = matrices.to(points.dtype)
    return points @ matrices[:, :, :2].transpose(1, 2) + matrices[:, :, 2].unsqueeze(1)


def _grid_theta(matrices: Tensor, in_size: tuple[int, int], out_size: int) -> Tensor:
    """Turn output->input pixel affines into `affine_grid`'s theta (align_corners=False, [-1, 1] units).

    Output grid g is pixel u = (g + 1) * out_size / 2; input pixel x is grid x * 2 / size - 1 per axis.
    """
    half = out_size / 2
    centre = matrices[:, :, :2].sum(dim=2, keepdim=True) * half + matrices[:, :, 2:]  # (B, 2, 1)
    rows = []
    for axis, size in enumerate(in_size):  # Python scalars: no host-to-device copy, no sync
        to_grid = 2.0 / size
        row = matrices[:, axis, :2] * (half * to_grid)
        rows.append(torch.cat([row, centre[:, axis] * to_grid - 1.0], dim=1))
    return torch.stack(rows, dim=1)


@functools.lru_cache(maxsize=16)
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small constant tensor, copied to `device` once per process instead of once per batch."""
    return torch.tensor(values, dtype=dtype).to(device)


def flip_permutation(device: torch.device | str) -> Tensor:
    """WFLW's FLIP as an index tensor on `device` (cached)."""
    return _constant(tuple(wflw.FLIP), torch.device(device), torch.long)


def _affine_grid(theta: Tensor, out_size: int) -> Tensor:
    """`F.affine_grid(theta, (B, C, n, n), align_corners=False)` as two broadcast adds per axis.

    affine_grid multiplies a (n * n, 3) base grid by theta (a batched matmul with an inner size of 3);
    an affine map of a regular grid is separable, x_out = a * x + (b * y + c), which is 2-3x cheaper.
    """
    batch = len(theta)
    base = (torch.arange(out_size, device=theta.device, dtype=theta.dtype) * 2 + 1) / out_size - 1
    grid = torch.empty((batch, out_size, out_size, 2), device=theta.device, dtype=theta.dtype)
    for axis in range(2):
        row = theta[:, axis].view(batch, 3, 1, 1)
        torch.add(
            row[:, 0] * base.view(1, 1, -1), row[:, 1] * base.view(1, -1, 1) + row[:, 2], out=grid[..., axis]
        )
    return grid


CPU_CHUNK = 4
"""On the CPU, `warp` samples this many images at a time, so each one's float copy stays in cache."""


def warp(
    images: Tensor,
    matrices: Tensor,
    out_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    memory_format: torch.memory_format = torch.contiguous_format,
    out: Tensor | None = None,
    index: Tensor | None = None,
) -> Tensor:
    """Sample (B, 3, out_size, out_size) float32 inputs from uint8 images through output->crop affines.

    Bilinear `grid_sample`; outside the crop is black (pixel value 0), then every channel is
    normalised as (value - mean) / std with mean and std in 0-255 units. On an accelerator the whole
    batch is one call; on the CPU a few images at a time (the same result, several times faster: the
    uint8 -> float copy of a whole batch of crops does not fit in cache). `out`, a float32 tensor of
    the output's shape, is written and returned instead of a new tensor (a new one costs a page fault
    per 4 KiB on the CPU). With `index` (B,), sample images[index] (gathered a chunk at a time).
    """
    batch, channels, height, width = images.shape
    if index is not None:
        batch = len(index)
    theta = _grid_theta(matrices.float(), (width, height), out_size)
    mean_t = _constant(tuple(mean), images.device, torch.float32).view(1, -1, 1, 1)
    std_t = _constant(tuple(std), images.device, torch.float32).view(1, -1, 1, 1)
    step = CPU_CHUNK if images.device.type == "cpu" else max(batch, 1)
    shape = (batch, channels, out_size, out_size)
    if out is None:
        out = torch.empty(shape, device=images.device, memory_format=memory_format)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != images.device:
        raise ValueError(
            f"out must be float32 {shape} on {images.device}, got {out.dtype} {tuple(out.shape)}"
        )
    for start in range(0, batch, step):
        part = slice(start, start + step)
        grid = _affine_grid(theta[part], out_size)
        chunk = images[part] if index is None else images.index_select(0, index[part])
        sampled = F.grid_sample(
            chunk.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        torch.sub(sampled, mean_t, out=out[part]).div_(std_t)  # normalised, in `memory_format`
    return out


def transform_landmarks(landmarks_crop: Tensor, matrices: Tensor, flip: Tensor) -> Tensor:
    """Crop-pixel landmarks (B, 98, 2) -> output pixels; flipped samples take point FLIP[i] as point i."""
    points = apply_affine(invert_affine(matrices), landmarks_crop)
    return torch.where(flip.view(-1, 1, 1), points[:, flip_permutation(points.device)], points)


def augment_batch(
    images: Tensor,
    landmarks: Tensor,
    *,
    params: ViewParams,
    crop_size: int,
    context: float,
    out_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    memory_format: torch.memory_format = torch.contiguous_format,
    out: Tensor | None = None,
    index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Warp a batch of uint8 crops and their crop-pixel landmarks into network inputs and targets.

    Returns normalised float32 inputs (B, 3, out_size, out_size) and targets (B, 98, 2) in [0, 1]
    units of the input (output pixels / out_size), what DeepPose regresses. The inputs are written
    into `out` when it is given (see `warp`). With `index`, the batch is images[index] and
    landmarks[index], gathered as they are warped (no copy of the whole batch of crops).
    """
    if tuple(images.shape[-2:]) != (crop_size, crop_size):
        raise ValueError(f"images are {tuple(images.shape[-2:])}, expected crop_size {crop_size}")
    if index is not None:
        landmarks = landmarks.index_select(0, index)
    matrices = view_matrices(params, crop_size, context, out_size)
    inputs = warp(images, matrices, out_size, mean, std, memory_format, out, index)
    targets = transform_landmarks(landmarks, matrices, params.flip) / out_size
    return inputs, targets
