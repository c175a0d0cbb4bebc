import math
from dataclasses import replace

import pytest
import torch
from helpers import default_params

from wflw_pipeline.core.losses import (
    L1Loss,
    SmoothL1Loss,
    SoftWingLoss,
    WingLoss,
    build_loss,
    inside_input,
    loss_from_params,
)


def one_difference(d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target (1, 98, 2) differing by d in the x of point 0 only."""
    target = torch.zeros(1, 98, 2, dtype=torch.float64)
    pred = target.clone()
    pred[0, 0, 0] = d
    return pred, target


def loss_of(loss: torch.nn.Module, d: float) -> float:
    return loss(*one_difference(d)).item()


def test_wing_near_branch_by_hand():
    # |d| = 0.5 < omega = 10: 10 * ln(1 + 0.5 / 2)
    assert loss_of(WingLoss(), 0.5) == pytest.approx(10 * math.log(1.25))
    assert loss_of(WingLoss(), -0.5) == pytest.approx(10 * math.log(1.25))


def test_wing_far_branch_by_hand():
    # |d| = 12 >= omega = 10: 12 - C with C = 10 - 10 * ln(1 + 10 / 2) = 10 - 10 ln 6
    assert loss_of(WingLoss(), 12.0) == pytest.approx(12 - (10 - 10 * math.log(6)))


def test_softwing_both_branches_by_hand():
    # d = 1.5 < omega1 = 2: d itself
    assert loss_of(SoftWingLoss(), 1.5) == pytest.approx(1.5)
    # d = 3 >= omega1: 20 * ln(1 + 3 / 0.5) + B with B = 2 - 20 * ln(1 + 2 / 0.5) = 2 - 20 ln 5
    assert loss_of(SoftWingLoss(), 3.0) == pytest.approx(20 * math.log(7) + 2 - 20 * math.log(5))


def test_l1_and_smooth_l1_by_hand():
    assert loss_of(L1Loss(), -0.25) == pytest.approx(0.25)
    # beta = 1: 0.5 * 0.25^2 / 1 below beta, 3 - 0.5 * 1 above
    assert loss_of(SmoothL1Loss(), 0.25) == pytest.approx(0.5 * 0.0625)
    assert loss_of(SmoothL1Loss(), 3.0) == pytest.approx(2.5)


@pytest.mark.parametrize(
    ("loss", "corner"),
    [(WingLoss(), 10.0), (SoftWingLoss(), 2.0), (SmoothL1Loss(beta=0.5), 0.5)],
    ids=["wing", "softwing", "smoothl1"],
)
def test_branches_meet_continuously(loss, corner):
    assert loss_of(loss, corner - 1e-9) == pytest.approx(loss_of(loss, corner), abs=1e-6)


def test_pixels_units_scale_differences_by_input_size():
    # a normalised difference of 3/256 is 3 input pixels at 256 px: 10 * ln(1 + 3 / 2)
    assert loss_of(WingLoss(units="pixels", input_size=256), 3 / 256) == pytest.approx(10 * math.log(2.5))
    assert loss_of(L1Loss(units="pixels", input_size=128), 0.5) == pytest.approx(64.0)


def test_pixels_equals_normalized_with_omega_and_epsilon_over_input_size():
    pred, target = torch.rand(4, 98, 2, dtype=torch.float64), torch.rand(4, 98, 2, dtype=torch.float64)
    pred[0, 0, 0] = target[0, 0, 0] + 0.5  # one error past omega = 10 px, in the far branch
    pixels = WingLoss(units="pixels", input_size=256)(pred, target)
    normalized = WingLoss(omega=10 / 256, epsilon=2 / 256)(pred, target)
    assert pixels.item() == pytest.approx(256 * normalized.item())
    assert pixels.item() == pytest.approx(WingLoss()(pred * 256, target * 256).item())


def test_sum_over_points_and_coordinates_mean_over_batch():
    target = torch.zeros(2, 98, 2)
    pred = torch.zeros(2, 98, 2)
    pred[0] = 0.1  # 196 errors of 0.1 in the first face, none in the second
    assert L1Loss()(pred, target).item() == pytest.approx(196 * 0.1 / 2)
    assert WingLoss()(pred, target).item() == pytest.approx(196 * 10 * math.log(1.05) / 2)


@pytest.mark.parametrize("name", ["wing", "softwing", "l1", "smoothl1"])
def test_gradients_are_finite_at_zero_difference(name):
    pred = torch.zeros(2, 98, 2, requires_grad=True)
    build_loss(name)(pred, torch.zeros(2, 98, 2)).backward()
    assert torch.isfinite(pred.grad).all()


def test_build_loss_passes_options_and_rejects_unknown_names():
    loss = build_loss("wing", omega=5.0, epsilon=1.0, units="pixels", input_size=64)
    assert isinstance(loss, WingLoss) and (loss.omega, loss.epsilon, loss.factor) == (5.0, 1.0, 64.0)
    with pytest.raises(ValueError, match="wing, softwing, l1, smoothl1"):
        build_loss("mse")


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="units"):
        WingLoss(units="mm")
    with pytest.raises(ValueError, match="epsilon"):
        WingLoss(epsilon=0.0)
    with pytest.raises(ValueError, match="beta"):
        SmoothL1Loss(beta=0.0)


def test_inside_input_is_mmposes_0_to_size_minus_1_in_this_projects_pixel_convention():
    size = 10  # normalised 0.05 and 0.95 are pixels 0.5 and 9.5: MMPose's 0 and 9
    target = torch.tensor([[[0.05, 0.95], [0.049, 0.5], [0.5, 0.951], [0.5, 0.5], [-0.2, 1.2]]])
    assert inside_input(target, size).tolist() == [[1.0, 0.0, 0.0, 1.0, 0.0]]


def test_a_point_a_rotation_pushed_off_the_input_adds_nothing_to_the_loss_or_its_gradient():
    target = torch.full((1, 98, 2), 0.5)
    corner = torch.tensor([0.45, 0.45])  # point (0.95, 0.95), relative to the centre, turned by 45 degrees:
    turned = torch.tensor(
        [[math.cos(math.pi / 4), -math.sin(math.pi / 4)], [math.sin(math.pi / 4), math.cos(math.pi / 4)]]
    )
    target[0, 7] = 0.5 + turned @ corner  # (0.5, 1.136): below the input
    assert target[0, 7].tolist() == pytest.approx([0.5, 0.5 + 0.45 * math.sqrt(2)])
    pred = (target + 0.01).requires_grad_()
    ignore = WingLoss(input_size=64, outside="ignore")
    loss = ignore(pred, target)
    loss.backward()
    per_coordinate = 10 * math.log1p(0.01 / 2)
    assert loss.item() == pytest.approx(97 * 2 * per_coordinate, rel=1e-5)
    assert pred.grad[0, 7].tolist() == [0.0, 0.0] and bool((pred.grad[0, :7] != 0).all())
    assert WingLoss(input_size=64)(pred, target).item() == pytest.approx(98 * 2 * per_coordinate, rel=1e-5)


def test_loss_from_params_passes_outside_points():
    config = default_params().loss
    assert loss_from_params(replace(config, outside_points="count"), 64).outside == "count"
    assert loss_from_params(replace(config, outside_points="ignore"), 64).outside == "ignore"
    with pytest.raises(ValueError, match="outside must be one of count, ignore, got 'drop'"):
        WingLoss(outside="drop")
