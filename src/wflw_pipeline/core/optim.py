"""The optimizer and the LR schedule of a training run, built from train.* (train and bench use these)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..params import TrainParams


def lr_factor(config: TrainParams, iters_per_epoch: int) -> Callable[[int], float]:
    """LR multiplier per iteration: linear warm-up from warmup_ratio, then step decay or cosine."""
    total = config.epochs * iters_per_epoch

    def factor(iteration: int) -> float:
        warm = 1.0
        if iteration < config.warmup_iters:
            warm = config.warmup_ratio + (1 - config.warmup_ratio) * iteration / config.warmup_iters
        if config.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(iteration, total) / total))
        epoch = iteration // iters_per_epoch
        return warm * config.gamma ** sum(epoch >= m for m in config.milestones)

    return factor


def build_optimizer(model: nn.Module, config: TrainParams, device: torch.device) -> torch.optim.Optimizer:
    """Adam as the reference; on CUDA the fused kernel (one launch for every parameter, same maths)."""
    fused = device.type == "cuda"
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def build_schedule(
    optimizer: torch.optim.Optimizer, config: TrainParams, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule of `lr_factor`, stepped once per optimisation step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, iters_per_epoch))


def build_training(
    model: nn.Module, config: TrainParams, device: torch.device, iters_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer of `model` and its schedule, as a training run of train.* uses them."""
    optimizer = build_optimizer(model, config, device)
    return optimizer, build_schedule(optimizer, config, iters_per_epoch)
