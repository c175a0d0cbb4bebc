"""Landmark metrics as WFLW reports them (pure functions on numpy arrays of shape (faces, 98, 2))."""

from __future__ import annotations

import numpy as np

from ..data import wflw
from ..errors import PipelineError
from .geometry import input_to_crop


class MetricsError(PipelineError):
    """Inputs the metrics cannot be computed on."""


def nme_per_face(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Mean point-to-point error of each face over its inter-ocular distance ||gt[60] - gt[72]||."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[1:] != (wflw.NUM_POINTS, 2):
        raise MetricsError(f"expected pred and gt of shape (faces, 98, 2), found {pred.shape} and {gt.shape}")
    iod = np.linalg.norm(gt[:, wflw.LEFT_EYE_OUTER] - gt[:, wflw.RIGHT_EYE_OUTER], axis=1)
    if (iod <= 0).any():
        face = int(np.argmin(iod))
        raise MetricsError(f"zero inter-ocular distance (points 60 and 72 coincide) in face {face}")
    return np.linalg.norm(pred - gt, axis=2).mean(axis=1) / iod


def mean_shape_nme(shape: np.ndarray, crop_size: int, context: float, gt: np.ndarray) -> float:
    """NME (%) on faces `gt` (crop pixels) of the baseline that always predicts `shape` (98, 2), the mean
    training shape normalised to the network input as model.pt holds it."""
    crop_shape = input_to_crop(shape, crop_size, context)
    return 100.0 * float(nme_per_face(np.broadcast_to(crop_shape, np.shape(gt)), gt).mean())


def _errors(nme: np.ndarray) -> np.ndarray:
    """Validate per-face NMEs: a non-empty 1-D array of finite, non-negative values."""
    errors = np.asarray(nme, np.float64)
    if errors.ndim != 1:
        raise MetricsError(f"expected one NME per face (a 1-D array), found shape {errors.shape}")
    if errors.size == 0:
        raise MetricsError("no faces: FR, AUC and CED are undefined on an empty set")
    if not np.isfinite(errors).all() or (errors < 0).any():
        face = int(np.argmax(~np.isfinite(errors) | (errors < 0)))
        raise MetricsError(f"NME of face {face} is {errors[face]}: must be finite and >= 0")
    return errors


def _threshold(threshold: float) -> float:
    if not (np.isfinite(threshold) and threshold > 0):
        raise MetricsError(f"threshold must be finite and > 0, found {threshold}")
    return float(threshold)


def failure_rate(nme: np.ndarray, threshold: float = 0.1) -> float:
    """FR@threshold: the fraction of faces with NME > threshold (a face exactly at it is no failure)."""
    errors, limit = _errors(nme), _threshold(threshold)
    return float(np.mean(errors > limit))


def ced(nme: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The cumulative error distribution: for each t in `thresholds`, the fraction of faces with NME <= t."""
    errors = np.sort(_errors(nme))
    points = np.asarray(thresholds, np.float64)
    if points.ndim != 1 or not np.isfinite(points).all():
        raise MetricsError(f"thresholds must be a 1-D array of finite values, found shape {points.shape}")
    return np.searchsorted(errors, points, side="right") / errors.size


def auc(nme: np.ndarray, threshold: float = 0.1) -> float:
    """AUC@threshold: the area under the CED for t in [0, threshold], divided by threshold (0..1).

    Computed exactly, not on a grid: the CED is the step function (1/n) * sum_i [e_i <= t], so
    integral_0^T CED(t) dt = (1/n) * sum_i max(0, T - e_i), each face contributing the length of
    [e_i, T] on which it is counted; AUC = mean_i max(0, 1 - e_i / T). Grid-based implementations
    (e.g. a trapezoid over 1,000 steps) approach this value as their step shrinks and differ from it by
    at most one step / T.
    """
    errors, limit = _errors(nme), _threshold(threshold)
    return float(np.mean(np.clip(1.0 - errors / limit, 0.0, 1.0)))
