"""Face boxes, the crop rule and its warp, the view of the network input, and the coordinate maps between
them (continuous pixels throughout; the README explains the pixel convention)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..params import ConvertParams

BBOX_RULES: tuple[str, ...] = ("landmarks", "landmarks_ceil", "rect")
"""How a face box is found: the extent of the landmarks (the reference protocol), the same with its side
rounded up to a whole pixel (MMPose's WFLW annotations), or a given rectangle."""
LANDMARK_RULES: tuple[str, ...] = ("landmarks", "landmarks_ceil")
"""The rules that box the landmarks themselves: predict can re-crop around the points it predicted."""

Box = tuple[float, float, float]
"""A square face box: centre x, centre y, side."""


def square_box(lo: np.ndarray, hi: np.ndarray) -> Box:
    """The square around the box [lo, hi] (side = the longer edge)."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    (cx, cy), (w, h) = (lo + hi) / 2.0, hi - lo
    return float(cx), float(cy), float(max(w, h))


def face_box(landmarks: np.ndarray, rect: np.ndarray, bbox: str) -> Box:
    """The square face box (before padding) by rule `bbox`: `landmarks` extent or the `rect` x0 y0 x1 y1."""
    if bbox in LANDMARK_RULES:
        cx, cy, side = square_box(landmarks.min(axis=0), landmarks.max(axis=0))
        return (cx, cy, float(math.ceil(side))) if bbox == "landmarks_ceil" else (cx, cy, side)
    if bbox == "rect":
        rect = np.asarray(rect, np.float64)
        return square_box(rect[:2], rect[2:])
    raise ValueError(f"unknown bbox rule {bbox!r}: choose one of {', '.join(BBOX_RULES)}")


@dataclass(frozen=True)
class CropRule:
    """How a face becomes a stored crop: its box by `bbox`, times `padding` x `context`, warped to
    `crop_size` px. convert makes the training crops with it; predict and export read it from model.pt."""

    bbox: str
    padding: float
    context: float
    crop_size: int

    @classmethod
    def of(cls, params: ConvertParams) -> CropRule:
        """The rule convert crops with."""
        return cls(params.bbox, params.padding, params.context, params.crop_size)

    def matrix(self, box: Box) -> np.ndarray:
        """2x3 affine mapping crop pixels to image pixels for the crop of the face box `box`."""
        cx, cy, side = box
        region = side * self.padding * self.context
        scale = region / self.crop_size
        return np.array([[scale, 0.0, cx - region / 2], [0.0, scale, cy - region / 2]])

    def warp(self, image: Image.Image, matrix: np.ndarray) -> Image.Image:
        """The crop of `image` through the crop -> image affine `matrix`, box-reduced first when it
        shrinks 2x or more."""
        scale, offset = float(matrix[0, 0]), np.asarray(matrix[:, 2], np.float64)
        factor = int(scale) if scale >= 2 else 1
        if factor > 1:
            image = image.reduce(factor)
            scale, offset = scale / factor, offset / factor
        data = (scale, 0.0, offset[0], 0.0, scale, offset[1])
        return image.transform(
            (self.crop_size, self.crop_size),
            Image.Transform.AFFINE,
            data=data,
            resample=Image.Resampling.BILINEAR,
        )


@dataclass(frozen=True)
class View:
    """How a stored crop becomes the network input: its central crop_size / context px, resized to
    input_size."""

    crop_size: int
    context: float
    input_size: int


def crop_to_image(points: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Map crop-pixel points (N, P, 2) through each face's 2x3 crop -> image affine (N, 2, 3)."""
    points, matrices = np.asarray(points, np.float64), np.asarray(matrices, np.float64)
    return np.einsum("nij,npj->npi", matrices[:, :, :2], points) + matrices[:, None, :, 2]


def input_to_crop(points: np.ndarray, crop_size: int, context: float) -> np.ndarray:
    """Normalised network-input points ([0, 1] spans the input) -> crop pixels, for the un-augmented view."""
    view = crop_size / context
    return (np.asarray(points, np.float64) - 0.5) * view + crop_size / 2
