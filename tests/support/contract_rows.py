"""Rows of the Parquet data contract (data/contract.py) made by hand, for tests that write split files."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from wflw_pipeline.data import wflw


def crop_jpeg(colour: tuple[int, int, int], size: int) -> bytes:
    """A `size` x `size` crop of one colour, as convert stores it (JPEG)."""
    pixels = np.full((size, size, 3), colour, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def contract_row(
    face_id: int,
    crop: bytes,
    landmarks: np.ndarray,
    *,
    matrix: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    flags: tuple[bool, ...] = (False,) * len(wflw.ATTRIBUTES),
    split: str = "test",
) -> dict:
    """One face as `write_parquet` takes it: `landmarks` (98, 2) in crop pixels, `matrix` crop -> image."""
    row = {
        "face_id": face_id,
        "split": split,
        "image_path": f"0--Parade/face_{face_id}.jpg",
        "image_width": 640,
        "image_height": 480,
        "crop_jpeg": crop,
        "crop_to_image": list(matrix),
        "landmarks": np.asarray(landmarks, np.float32).reshape(-1).tolist(),
        "landmarks_image": np.asarray(landmarks, np.float32).reshape(-1).tolist(),
        "rect": [10, 20, 110, 120],
    }
    return {**row, **dict(zip(wflw.ATTRIBUTES, flags, strict=True))}
