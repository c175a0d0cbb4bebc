"""Face boxes, crop affines and the view of the network input: the geometry convert, evaluate and
inference share.

Coordinates are continuous everywhere inside the pipeline: pixel i covers [i, i + 1), so an image of
side n spans [0, n] and mirrors as x -> n - x. WFLW's annotations put pixel centres at integers (as
MMPose does); convert turns them into continuous coordinates once (`wflw.to_continuous`) before any
box or affine here is computed, and the Parquet `crop_to_image` maps crop pixels back to image pixels
in the annotation convention (see convert).
"""

from __future__ import annotations

import numpy as np

BBOX_RULES: tuple[str, ...] = ("landmarks", "rect")
"""How a face box is found: the extent of the landmarks (the reference protocol) or a given rectangle."""


def square_box(lo: np.ndarray, hi: np.ndarray) -> tuple[float, float, float]:
    """Centre x, centre y and side of the square around the box [lo, hi] (side = the longer edge)."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    (cx, cy), (w, h) = (lo + hi) / 2.0, hi - lo
    return float(cx), float(cy), float(max(w, h))


def face_box(landmarks: np.ndarray, rect: np.ndarray, bbox: str) -> tuple[float, float, float]:
    """The square face box (before padding) by rule `bbox`: `landmarks` extent or the `rect` x0 y0 x1 y1."""
    if bbox == "landmarks":
        return square_box(landmarks.min(axis=0), landmarks.max(axis=0))
    if bbox == "rect":
        rect = np.asarray(rect, np.float64)
        return square_box(rect[:2], rect[2:])
    raise ValueError(f"unknown bbox rule {bbox!r}: choose one of {', '.join(BBOX_RULES)}")


def crop_matrix(
    box: tuple[float, float, float], padding: float, context: float, crop_size: int
) -> np.ndarray:
    """2x3 affine mapping crop pixels to image pixels for a square crop of side box x padding x context."""
    cx, cy, side = box
    region = side * padding * context
    scale = region / crop_size
    return np.array([[scale, 0.0, cx - region / 2], [0.0, scale, cy - region / 2]])


def crop_to_image(points: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Map crop-pixel points (N, P, 2) through each face's 2x3 crop->image affine (N, 2, 3).

    With the Parquet `crop_to_image`, the result is in image pixels as annotated (WFLW's convention),
    comparable with `landmarks_image`.
    """
    points, matrices = np.asarray(points, np.float64), np.asarray(matrices, np.float64)
    return np.einsum("nij,npj->npi", matrices[:, :, :2], points) + matrices[:, None, :, 2]


def input_to_crop(points: np.ndarray, crop_size: int, context: float) -> np.ndarray:
    """Normalised network-input points ([0, 1] spans the input) -> crop pixels, for the un-augmented view.

    The input shows the central crop_size / context square of the crop.
    """
    view = crop_size / context
    return (np.asarray(points, np.float64) - 0.5) * view + crop_size / 2
