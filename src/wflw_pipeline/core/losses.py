"""Coordinate-regression losses: Wing, SoftWing, L1, SmoothL1, each in normalised or pixel units.

Every loss takes `pred` and `target` of shape (B, 98, 2) in normalised units (what DeepPose outputs:
[0, 1] spans the network input), penalises each coordinate's |pred - target|, sums over the points
and x/y, and averages over the batch.

Units of the penalty (`units`):
- `normalized` (default, the MMPose reference): the differences as they are, in input sizes. Typical
  errors are ~0.01, far below Wing's omega = 10, so Wing acts as omega / epsilon = 5 x L1 and SoftWing
  (omega1 = 2) is exactly L1.
- `pixels` (the Wing paper): the differences times `input_size`, i.e. in input pixels. Wing(pixels,
  omega, epsilon) equals Wing(normalized, omega / input_size, epsilon / input_size) x input_size.

Points that augmentation pushed off the input (`outside`): `count` penalises them like any other;
`ignore` gives them weight 0, as MMPose's WingLoss(use_target_weight=True) with RegressionLabel's weights:
a point counts only where both coordinates lie in MMPose's [0, size - 1] (pixel centres at integers),
which is [0.5, size - 0.5] in this project's convention. Either way the sum is averaged over the batch.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

from ..params import LossParams

Units = Literal["normalized", "pixels"]
UNITS: tuple[str, ...] = ("normalized", "pixels")
Outside = Literal["count", "ignore"]
OUTSIDE: tuple[str, ...] = ("count", "ignore")


def _require_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


class PointLoss(nn.Module):
    """Base class: `penalty(|difference|)` summed over points and x/y, averaged over the batch."""

    def __init__(
        self, units: Units = "normalized", input_size: int = 256, outside: Outside = "count"
    ) -> None:
        super().__init__()
        if units not in UNITS:
            raise ValueError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
        if outside not in OUTSIDE:
            raise ValueError(f"outside must be one of {', '.join(OUTSIDE)}, got {outside!r}")
        _require_positive(input_size=input_size)
        self.units = units
        self.input_size = input_size
        self.outside = outside
        self.factor = float(input_size) if units == "pixels" else 1.0

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        distance = (pred - target).abs() * self.factor
        if self.outside == "ignore":
            distance = distance * inside_input(target, self.input_size).unsqueeze(-1)
        return self.penalty(distance).flatten(1).sum(dim=1).mean()

    def penalty(self, distance: Tensor) -> Tensor:
        """The loss of each coordinate's absolute difference (in this loss's units)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"units={self.units!r}, input_size={self.input_size}, outside={self.outside!r}"


def inside_input(target: Tensor, input_size: int) -> Tensor:
    """(B, 98) float: 1 where a target point (normalised) lies on the input, both coordinates in
    [0.5, input_size - 0.5] px (MMPose's [0, size - 1]), else 0."""
    pixels = target * input_size
    return ((pixels >= 0.5) & (pixels <= input_size - 0.5)).all(dim=-1).to(target.dtype)


class WingLoss(PointLoss):
    """Wing loss (Feng et al., CVPR 2018): omega*ln(1 + d/epsilon) if d < omega, else d - C.

    C = omega - omega*ln(1 + omega/epsilon) joins the two branches continuously.
    """

    def __init__(
        self,
        omega: float = 10.0,
        epsilon: float = 2.0,
        units: Units = "normalized",
        input_size: int = 256,
        outside: Outside = "count",
    ) -> None:
        super().__init__(units, input_size, outside)
        _require_positive(omega=omega, epsilon=epsilon)
        self.omega = omega
        self.epsilon = epsilon
        self.C = omega - omega * math.log1p(omega / epsilon)

    def penalty(self, distance: Tensor) -> Tensor:
        near = self.omega * (distance / self.epsilon).log1p()
        return near.where(distance < self.omega, distance - self.C)


class SoftWingLoss(PointLoss):
    """Soft Wing loss (Lin et al., TIP 2021), as MMPose: d if d < omega1, else omega2*ln(1 + d/epsilon) + B.

    B = omega1 - omega2*ln(1 + omega1/epsilon) joins the two branches continuously.
    """

    def __init__(
        self,
        omega1: float = 2.0,
        omega2: float = 20.0,
        epsilon: float = 0.5,
        units: Units = "normalized",
        input_size: int = 256,
        outside: Outside = "count",
    ) -> None:
        super().__init__(units, input_size, outside)
        _require_positive(omega1=omega1, omega2=omega2, epsilon=epsilon)
        self.omega1 = omega1
        self.omega2 = omega2
        self.epsilon = epsilon
        self.B = omega1 - omega2 * math.log1p(omega1 / epsilon)

    def penalty(self, distance: Tensor) -> Tensor:
        far = self.omega2 * (distance / self.epsilon).log1p() + self.B
        return distance.where(distance < self.omega1, far)


class L1Loss(PointLoss):
    """|d|."""

    def penalty(self, distance: Tensor) -> Tensor:
        return distance


class SmoothL1Loss(PointLoss):
    """0.5*d^2/beta if d < beta, else d - 0.5*beta (in normalised units with beta = 1: always 0.5*d^2)."""

    def __init__(
        self,
        beta: float = 1.0,
        units: Units = "normalized",
        input_size: int = 256,
        outside: Outside = "count",
    ) -> None:
        super().__init__(units, input_size, outside)
        _require_positive(beta=beta)
        self.beta = beta

    def penalty(self, distance: Tensor) -> Tensor:
        quadratic = 0.5 * distance.square() / self.beta
        return quadratic.where(distance < self.beta, distance - 0.5 * self.beta)


LOSSES: dict[str, type[PointLoss]] = {
    "wing": WingLoss,
    "softwing": SoftWingLoss,
    "l1": L1Loss,
    "smoothl1": SmoothL1Loss,
}


def build_loss(name: str, **kwargs: float | str) -> PointLoss:
    """The loss called `name` (wing, softwing, l1, smoothl1), built with its keyword arguments."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    return LOSSES[name](**kwargs)


def loss_from_params(config: LossParams, input_size: int) -> PointLoss:
    """The loss `config` describes, in its units, for a network input of `input_size` px."""
    options: dict[str, float | str] = {
        "units": config.units,
        "input_size": input_size,
        "outside": config.outside_points,
    }
    if config.name == "wing":
        options.update(omega=config.wing.omega, epsilon=config.wing.epsilon)
    elif config.name == "softwing":
        options.update(
            omega1=config.softwing.omega1, omega2=config.softwing.omega2, epsilon=config.softwing.epsilon
        )
    elif config.name == "smoothl1":
        options.update(beta=config.smoothl1_beta)
    return build_loss(config.name, **options)
