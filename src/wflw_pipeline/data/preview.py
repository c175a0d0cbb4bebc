"""A PNG grid of sample crops with their landmarks: one row per subset (no flag, then each attribute)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from . import wflw
from .contract import read_split
from ..fileio import atomic_path

CELL = 128
"""Side of one face in the grid, in pixels."""
LABEL_WIDTH = 150
BACKGROUND = (24, 24, 24)
DOT_RADIUS = 1.5

GROUP_COLOURS: dict[str, tuple[int, int, int]] = {
    "contour": (0, 230, 0),
    "left_brow": (255, 140, 0),
    "right_brow": (255, 60, 0),
    "nose_bridge": (0, 220, 255),
    "nose_base": (0, 120, 255),
    "left_eye": (255, 255, 0),
    "right_eye": (200, 255, 0),
    "outer_lip": (255, 0, 200),
    "inner_lip": (170, 0, 255),
    "left_pupil": (255, 255, 255),
    "right_pupil": (255, 200, 200),
}
"""Dot colour of each of wflw.POINT_GROUPS."""

ROWS: tuple[str, ...] = ("none", *wflw.ATTRIBUTES)
"""The grid's rows: faces with no flag, then the faces of each attribute."""


def _subset_rows(flags: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Row indices of each subset."""
    any_flag = np.logical_or.reduce([flags[a] for a in wflw.ATTRIBUTES])
    rows = {"none": np.flatnonzero(~any_flag)}
    rows.update({a: np.flatnonzero(flags[a]) for a in wflw.ATTRIBUTES})
    return rows


def _read_faces(parquet_path: Path, wanted: set[int]) -> dict[int, tuple[bytes, np.ndarray]]:
    """crop_jpeg and landmarks (98 x 2) of the wanted rows, read batch by batch."""
    faces: dict[int, tuple[bytes, np.ndarray]] = {}
    offset = 0
    for batch in pq.ParquetFile(parquet_path).iter_batches(columns=["crop_jpeg", "landmarks"]):
        chosen = [i for i in range(batch.num_rows) if offset + i in wanted]
        if chosen:
            crops = batch.column("crop_jpeg")
            points = np.asarray(batch.column("landmarks").flatten(), dtype=np.float64).reshape(
                -1, wflw.NUM_POINTS, 2
            )
            for i in chosen:
                faces[offset + i] = (crops[i].as_py(), points[i])
        offset += batch.num_rows
    return faces


def _cell(jpeg: bytes, landmarks: np.ndarray) -> Image.Image:
    """One crop scaled to CELL x CELL with its landmarks as dots coloured by group."""
    crop = Image.open(io.BytesIO(jpeg)).convert("RGB")
    scale = np.array([CELL / crop.width, CELL / crop.height])
    cell = crop.resize((CELL, CELL), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(cell)
    for group, indices in wflw.POINT_GROUPS.items():
        for x, y in landmarks[list(indices)] * scale - 0.5:  # PIL puts pixel centres on integers
            draw.ellipse(
                (x - DOT_RADIUS, y - DOT_RADIUS, x + DOT_RADIUS, y + DOT_RADIUS), fill=GROUP_COLOURS[group]
            )
    return cell


def write_preview(parquet_path: Path, out_png: Path, per_row: int = 8, seed: int = 0) -> None:
    """Write a PNG grid of `per_row` random faces per subset (seeded), labelled with the subset's size."""
    parquet_path, out_png = Path(parquet_path), Path(out_png)
    table = read_split(parquet_path, columns=list(wflw.ATTRIBUTES))
    flags = {a: table.column(a).to_numpy().astype(bool) for a in wflw.ATTRIBUTES}
    rows = _subset_rows(flags)
    rng = np.random.default_rng(seed)
    picks = {
        name: np.sort(rng.choice(indices, size=min(per_row, len(indices)), replace=False))
        for name, indices in rows.items()
    }
    faces = _read_faces(parquet_path, {int(i) for chosen in picks.values() for i in chosen})
    grid = Image.new("RGB", (LABEL_WIDTH + per_row * CELL, len(ROWS) * CELL), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=16)
    for row, name in enumerate(ROWS):
        draw.text((10, row * CELL + 10), f"{name}\n{len(rows[name])} faces", fill=(235, 235, 235), font=font)
        for column, index in enumerate(picks[name]):
            grid.paste(_cell(*faces[int(index)]), (LABEL_WIDTH + column * CELL, row * CELL))
    with atomic_path(out_png) as temp:
        grid.save(temp, format="PNG")
