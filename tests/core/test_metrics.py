"""core/metrics.py: NME, FR, CED and AUC as WFLW reports them, worked out by hand."""

import numpy as np
import pytest

from wflw_pipeline.core.metrics import MetricsError, auc, ced, failure_rate, mean_shape_nme, nme_per_face
from wflw_pipeline.data import wflw


def _face(iod: float = 10.0) -> np.ndarray:
    """98 points on a line; the eye corners 60 and 72 are `iod` apart."""
    points = np.zeros((98, 2))
    points[:, 0] = np.linspace(0, 20, 98)
    points[wflw.LEFT_EYE_OUTER] = (0.0, 5.0)
    points[wflw.RIGHT_EYE_OUTER] = (iod, 5.0)
    return points


def test_a_face_exactly_at_the_threshold_is_no_failure_and_counts_in_the_ced():
    gt = np.stack([_face(), _face()])
    pred = gt.copy()
    pred[0] += (1.0, 0.0)  # every point 1 px off, inter-ocular distance 10: NME exactly 0.1
    pred[1] += (0.0, 2.0)  # NME 0.2
    nme = nme_per_face(pred, gt)
    assert nme.tolist() == [0.1, 0.2]
    assert failure_rate(nme, 0.1) == 0.5
    assert ced(nme, np.array([0.0999, 0.1, 0.2])).tolist() == [0.0, 0.5, 1.0]


def test_the_mean_shape_nme_worked_out_by_hand():
    gt = np.zeros((1, wflw.NUM_POINTS, 2))
    gt[0, wflw.RIGHT_EYE_OUTER] = (4.0, 0.0)  # inter-ocular distance 4
    shape = np.full((wflw.NUM_POINTS, 2), 0.5)  # the input's centre: crop pixel (2, 2) for crop 4, context 2
    # every point sqrt(2^2 + 2^2) px away (point 72 too), over 4 -> 0.7071, in %
    assert mean_shape_nme(shape, 4, 2.0, gt) == pytest.approx(50 * np.sqrt(2), abs=1e-12)


def test_fr_ced_and_auc_of_a_small_set_worked_out_by_hand():
    nme = np.array([0.15, 0.02, 0.1, 0.05])
    assert failure_rate(nme, 0.1) == 0.25
    assert failure_rate(nme, 0.04) == 0.75
    assert ced(nme, np.array([0.0, 0.02, 0.03, 0.05, 0.1, 0.2])).tolist() == [0, 0.25, 0.25, 0.5, 0.75, 1]
    # CED steps: 0.25 on [0.02, 0.05), 0.5 on [0.05, 0.1), 0.75 at 0.1:
    # area = 0.25 * 0.03 + 0.5 * 0.05 = 0.0325, over 0.1 -> 0.325
    assert auc(nme, 0.1) == pytest.approx(0.325, abs=1e-12)
    # up to 0.05: area = 0.25 * 0.03 = 0.0075, over 0.05 -> 0.15
    assert auc(nme, 0.05) == pytest.approx(0.15, abs=1e-12)
    assert auc(np.zeros(3), 0.1) == 1.0 and auc(np.full(3, 0.3), 0.1) == 0.0


def test_exact_auc_is_what_a_fine_grid_tends_to():
    nme = np.random.default_rng(0).gamma(2.0, 0.025, size=200)
    grid = np.linspace(0, 0.1, 100_001)
    assert auc(nme, 0.1) == pytest.approx(np.trapezoid(ced(nme, grid), grid) / 0.1, abs=1e-4)


def test_zero_inter_ocular_distance_and_shape_mismatch_are_clear_errors():
    gt = np.stack([_face(), _face(iod=0.0)])
    with pytest.raises(MetricsError, match=r"zero inter-ocular distance .* face 1"):
        nme_per_face(gt + 1, gt)
    with pytest.raises(MetricsError, match=r"\(faces, 98, 2\).*\(2, 98, 2\) and \(1, 98, 2\)"):
        nme_per_face(gt, gt[:1])
    with pytest.raises(MetricsError, match=r"\(faces, 98, 2\)"):
        nme_per_face(np.zeros((1, 68, 2)), np.zeros((1, 68, 2)))
    with pytest.raises(MetricsError, match=r"1-D array.*\(2, 2\)"):
        failure_rate(np.zeros((2, 2)))
    with pytest.raises(MetricsError, match="no faces"):
        auc(np.zeros(0))
    with pytest.raises(MetricsError, match="finite"):
        ced(np.array([0.1, np.nan]), np.array([0.1]))
    with pytest.raises(MetricsError, match="threshold"):
        auc(np.array([0.1]), 0.0)
