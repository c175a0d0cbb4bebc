"""Parquet split -> decoded uint8 tensors held in (device) memory, and batch index streams."""

from __future__ import annotations

import math
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from . import wflw
from .contract import read_metadata, read_split
from ..errors import PipelineError


class DatasetError(PipelineError):
    """A Parquet split that is missing or does not follow the data contract."""


@dataclass(frozen=True)
class FaceSet:
    """One split in memory: crops (N, 3, S, S) uint8, landmarks (N, 98, 2) in crop pixels, flags (N, 6)."""

    images: torch.Tensor
    landmarks: torch.Tensor
    flags: torch.Tensor
    face_id: torch.Tensor
    crop_to_image: np.ndarray
    crop: dict[str, Any]

    def __len__(self) -> int:
        return int(self.face_id.shape[0])

    @property
    def crop_size(self) -> int:
        return int(self.crop["crop_size"])

    @property
    def context(self) -> float:
        return float(self.crop["context"])

    def to(self, device: torch.device | str) -> FaceSet:
        return replace(
            self,
            images=self.images.to(device),
            landmarks=self.landmarks.to(device),
            flags=self.flags.to(device),
            face_id=self.face_id.to(device),
        )


def _decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def load_faces(path: Path, device: torch.device | str = "cpu", threads: int = 8) -> FaceSet:
    """Decode every crop of one Parquet split once and keep the tensors on `device`."""
    path = Path(path)
    crop = read_metadata(path)["crop"]
    table = read_split(path)
    size = int(crop["crop_size"])
    jpegs = table.column("crop_jpeg").to_pylist()
    images = np.empty((len(jpegs), size, size, 3), np.uint8)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for i, pixels in enumerate(pool.map(_decode, jpegs)):
            if pixels.shape != (size, size, 3):
                raise DatasetError(f"{path}: crop of row {i} is {pixels.shape[:2]}, metadata says {size}")
            images[i] = pixels
    landmarks = table.column("landmarks").combine_chunks().flatten().to_numpy()
    flags = np.stack([table.column(name).to_numpy(zero_copy_only=False) for name in wflw.ATTRIBUTES], axis=1)
    matrices = table.column("crop_to_image").combine_chunks().flatten().to_numpy()
    return FaceSet(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        landmarks=torch.from_numpy(landmarks.astype(np.float32).reshape(-1, wflw.NUM_POINTS, 2)),
        flags=torch.from_numpy(flags.astype(bool).reshape(len(jpegs), len(wflw.ATTRIBUTES))),
        face_id=torch.from_numpy(table.column("face_id").to_numpy().copy()),
        crop_to_image=matrices.astype(np.float64).reshape(-1, 2, 3),
        crop=crop,
    ).to(device)


def batch_indices(
    n: int,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """Index batches of one epoch; with DDP each rank takes its share of every global batch. A short last
    batch is topped up with the epoch's first faces to a multiple of world_size (as PyTorch's and MMPose's
    distributed samplers pad), so that every rank takes the same number of steps."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    global_batch = batch_size * world_size
    for start in range(0, n, global_batch):
        chunk = order[start : start + global_batch]
        if len(chunk) < global_batch:
            if drop_last:
                return
            chunk = torch.cat([chunk, order[: -len(chunk) % world_size]])
        yield chunk[rank::world_size]


def iters_per_epoch(faces: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Optimisation steps per epoch: the full global batches, then the short last one unless `drop_last`
    (it is kept as well when there is no full one). A short batch that would give each process a single
    face is dropped all the same: BatchNorm cannot train on one face where the last stage is 1 x 1."""
    full, rest = divmod(faces, batch_size * world_size)
    short = rest > 0 and (full == 0 or (not drop_last and math.ceil(rest / world_size) > 1))
    return full + short


def random_faces(n: int, crop_size: int, context: float, device: torch.device | str) -> FaceSet:
    """`n` random uint8 crops with landmarks inside the central view, made on `device` from seed 0.

    For speed measurements: the same shapes and types as a loaded split, no file needed.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(
        0, 256, (n, 3, crop_size, crop_size), dtype=torch.uint8, device=device, generator=generator
    )
    spread = torch.rand(n, wflw.NUM_POINTS, 2, device=device, generator=generator) - 0.5
    return FaceSet(
        images=images,
        landmarks=crop_size / 2 + spread * (crop_size / context),
        flags=torch.zeros(n, len(wflw.ATTRIBUTES), dtype=torch.bool, device=device),
        face_id=torch.arange(n, device=device),
        crop_to_image=np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (n, 1, 1)),
        crop={"crop_size": crop_size, "context": context},
    )
