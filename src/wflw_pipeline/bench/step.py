"""`wflw bench train-step`: `engine.train_step` timed, with and without torch.compile; FLOPs and MFU.

The timed step is the one `engine.train_one_epoch` runs (forward under autocast, the loss in fp32,
backward, Adam, the LR schedule), on a model, optimiser and scheduler built as `wflw train` builds them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from .. import engine, fileio, wflw
from ..losses import loss_from_params
from ..model import DeepPose, build_model
from ..params import LossParams, TrainParams
from ..runtime import Precision, configure_backends
from ..train import build_optimizer, lr_factor
from .common import (
    REFERENCE_FACES,
    format_runs,
    format_table,
    header,
    median,
    peak_memory,
    precision_label,
    require,
    reset_memory,
    resolve_device,
    resolve_precision,
    synchronize,
    write_result,
)

logger = logging.getLogger(__name__)

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
)
"""Dense bf16 tensor-core peak by (a substring of) the CUDA device name, first match wins."""


def forward_flops(arch: str, input_size: int) -> int:
    """FLOPs of one forward pass of DeepPose at batch 1 (FlopCounterMode: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = DeepPose(arch).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, input_size, input_size))
    return int(counter.get_total_flops())


def peak_tflops(device: torch.device, precision: Precision, given: float | None) -> tuple[float | None, str]:
    """The peak to divide by: `given`, else the dense bf16 table entry of this GPU, else None (n/a)."""
    if given is not None:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return None, "n/a on CPU (give --peak-tflops)"
    if precision.dtype != torch.bfloat16:
        return None, "n/a: the table is dense bf16 (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"dense bf16 peak of {key}"
    return None, f"n/a: {name} not in the table (give --peak-tflops)"


def build_training(
    arch: str, device: torch.device, precision: Precision, train: TrainParams, iters_per_epoch: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """DeepPose (random init) in the run's memory format, and the optimiser and LR schedule (LambdaLR of
    `train.lr_factor`) that `wflw train` builds from train.*."""
    torch.manual_seed(0)
    model = build_model(arch, "none").to(device).to(memory_format=precision.memory_format())
    optimizer = build_optimizer(model, train, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train, iters_per_epoch))
    return model, optimizer, scheduler


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    return torch.compile(model, mode=None if mode == "default" else mode)


def time_train_step(
    *,
    arch: str,
    input_size: int,
    batch_size: int,
    steps: int,
    warmup: int,
    repeats: int,
    device: torch.device,
    precision: Precision,
    compiled: bool,
    compile_mode: str,
    loss: LossParams,
    train: TrainParams,
) -> dict[str, Any]:
    """Images/s of `engine.train_step` on fixed random inputs already on the device.

    The LR schedule is the reference run's at this batch size (epochs of 7,500 faces).
    """
    reset_memory(device)
    iters_per_epoch = max(1, REFERENCE_FACES // batch_size)
    model, optimizer, scheduler = build_training(arch, device, precision, train, iters_per_epoch)
    model.train()
    step_model = compile_model(model, compile_mode) if compiled else model
    loss_fn = loss_from_params(loss, input_size)
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = torch.randn(batch_size, 3, input_size, input_size, device=device, generator=generator)
    inputs = inputs.contiguous(memory_format=precision.memory_format())
    targets = torch.rand(batch_size, wflw.NUM_POINTS, 2, device=device, generator=generator)

    def step() -> torch.Tensor:
        return engine.train_step(step_model, optimizer, scheduler, loss_fn, inputs, targets, precision)

    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    first_step = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        step()
    runs = []
    last = None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            last = step()
        synchronize(device)
        runs.append(steps * batch_size / (time.perf_counter() - start))
    finite = bool(torch.isfinite(last).item()) if last is not None else True
    result = {
        "compile": compiled,
        "compile_mode": compile_mode if compiled else None,
        "images_per_s": median(runs),
        "step_ms": 1000.0 * batch_size / median(runs),
        "runs_images_per_s": runs,
        "first_step_s": first_step,
        "loss_finite": finite,
        **peak_memory(device),
    }
    if compiled:
        torch._dynamo.reset()
    return result


def run_train_step(
    *,
    out_dir: Path,
    loss: LossParams,
    train: TrainParams,
    arch: str = "resnet50",
    input_size: int = 256,
    batch_size: int | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    repeats: int = 3,
    device_name: str = "auto",
    precision_name: str = "auto",
    channels_last: bool | None = None,
    compile: str = "auto",
    compile_mode: str = "default",
    peak: float | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Train-step throughput with and without torch.compile, peak memory, FLOPs and MFU; train_step.json."""
    device = resolve_device(device_name)
    cuda = device.type == "cuda"
    batch_size = batch_size or (256 if cuda else 8)
    steps = steps or (200 if cuda else 3)
    warmup = warmup if warmup is not None else (10 if cuda else 1)
    require(batch_size >= 1 and steps >= 1 and repeats >= 1, "--batch-size, --steps, --repeats must be >= 1")
    modes = {"auto": [False, True] if cuda else [False], "both": [False, True], "on": [True], "off": [False]}
    precision = resolve_precision(precision_name, channels_last, device)
    configure_backends(device)
    flops = forward_flops(arch, input_size)
    peak_value, peak_source = peak_tflops(device, precision, peak)
    runs: list[dict[str, Any]] = []
    result = {
        **header("train-step", device, command),
        "complete": False,
        "arch": arch,
        "input_size": input_size,
        "batch_size": batch_size,
        "steps": steps,
        "warmup_steps": warmup,
        "repeats": repeats,
        "precision": precision_label(precision),
        "channels_last": precision.channels_last,
        "forward_gflop_per_image": flops / 1e9,
        "train_gflop_per_image": 3 * flops / 1e9,
        "flop_note": "FlopCounterMode, one forward at batch 1; training = 3 x forward",
        "peak_tflops": peak_value,
        "peak_source": peak_source,
        "runs": runs,
    }
    for compiled in modes[compile]:
        logger.info(
            "train-step %s %dpx batch %d on %s, compile=%s", arch, input_size, batch_size, device, compiled
        )
        run = time_train_step(
            arch=arch,
            input_size=input_size,
            batch_size=batch_size,
            steps=steps,
            warmup=warmup,
            repeats=repeats,
            device=device,
            precision=precision,
            compiled=compiled,
            compile_mode=compile_mode,
            loss=loss,
            train=train,
        )
        achieved = 3 * flops * run["images_per_s"] / 1e12
        run["achieved_tflops"] = achieved
        run["mfu"] = achieved / peak_value if peak_value else None
        runs.append(run)
        fileio.write_json(Path(out_dir) / "train_step.json", result)  # kept if a later mode is killed
    result["complete"] = True
    table = format_table(
        ["compile", "images/s (median)", "step ms", "first step s", "TFLOP/s", "MFU", "peak mem GiB", "runs"],
        [
            [
                r["compile_mode"] or "off",
                r["images_per_s"],
                r["step_ms"],
                r["first_step_s"],
                r["achieved_tflops"],
                f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else None,
                r["peak_memory_gib"],
                format_runs(r["runs_images_per_s"]),
            ]
            for r in runs
        ],
    )
    title = (
        f"\ntrain-step: {arch} {input_size}x{input_size}, batch {batch_size}, {result['precision']}, "
        f"{'channels_last' if precision.channels_last else 'contiguous'}, {device}; forward "
        f"{flops / 1e9:.2f} GFLOP/image; peak: {peak_source}"
        f"{'' if cuda else ' (peak mem = process peak RSS)'}"
    )
    write_result(out_dir, "train_step", result, f"{title}\n{table}")
    return result
