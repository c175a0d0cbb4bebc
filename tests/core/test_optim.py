from dataclasses import replace

import pytest
import torch
from helpers import default_params

from wflw_pipeline.core import optim

REFERENCE = replace(
    default_params().train,
    epochs=210,
    warmup_iters=500,
    warmup_ratio=0.001,
    schedule="step",
    milestones=(170, 200),
    gamma=0.1,
    lr=5e-4,
    weight_decay=0.0,
)


def test_lr_schedule_matches_the_reference_by_hand():
    factor = optim.lr_factor(REFERENCE, iters_per_epoch=15)
    assert factor(0) == pytest.approx(0.001)
    assert factor(250) == pytest.approx(0.5005)  # halfway up the warm-up: 0.001 + 0.999 * 0.5
    assert factor(500) == pytest.approx(1.0)
    assert factor(169 * 15 + 14) == pytest.approx(1.0)
    assert factor(170 * 15) == pytest.approx(0.1)
    assert factor(200 * 15) == pytest.approx(0.01)
    cosine = optim.lr_factor(replace(REFERENCE, schedule="cosine", warmup_iters=0), iters_per_epoch=10)
    assert cosine(0) == pytest.approx(1.0)
    assert cosine(1050) == pytest.approx(0.5)
    assert cosine(2100) == pytest.approx(0.0)


def test_warm_up_starts_at_warmup_ratio_and_multiplies_the_decay():
    config = replace(REFERENCE, epochs=4, warmup_iters=10, warmup_ratio=0.2, milestones=(1, 3), gamma=0.5)
    factor = optim.lr_factor(config, iters_per_epoch=4)
    assert factor(0) == pytest.approx(0.2)
    assert factor(3) == pytest.approx(0.2 + 0.8 * 3 / 10)  # epoch 0, still warming up: 0.44
    assert factor(4) == pytest.approx((0.2 + 0.8 * 4 / 10) * 0.5)  # epoch 1 (one milestone) in the warm-up
    assert factor(10) == pytest.approx(0.5)
    assert factor(12) == pytest.approx(0.25)  # epoch 3: both milestones
    cosine = optim.lr_factor(replace(config, schedule="cosine"), iters_per_epoch=4)  # 16 iterations
    assert cosine(4) == pytest.approx(0.52 * 0.5 * (1 + 2**-0.5))  # warm-up x cos at a quarter
    assert cosine(8) == pytest.approx(0.84 * 0.5)  # halfway: cos = 0, warm-up 0.2 + 0.8 x 8 / 10
    assert cosine(12) == pytest.approx(0.5 * (1 - 2**-0.5))
    assert cosine(20) == pytest.approx(0.0)  # past the end it stays at 0


def test_build_training_is_adam_with_the_lambda_schedule_stepped_per_iteration():
    model = torch.nn.Linear(2, 1)
    config = replace(REFERENCE, lr=0.1, weight_decay=0.01, warmup_iters=2, warmup_ratio=0.5)
    optimizer, scheduler = optim.build_training(model, config, torch.device("cpu"), iters_per_epoch=3)
    assert isinstance(optimizer, torch.optim.Adam) and not optimizer.defaults["fused"]
    assert optimizer.defaults["weight_decay"] == 0.01
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # 0.1 x warmup_ratio
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.75)
