"""`wflw bench train-step`: variants of the training step, timed in turns in one process; FLOPs and MFU.

The baseline is the step `engine.train_one_epoch` runs (`engine.train_step`: forward under autocast, the
loss in fp32, backward, Adam, the LR schedule), on a model, optimiser and scheduler built as `wflw train`
builds them (core.optim) from the params file. A variant changes how that step executes, never what it
computes: BatchNorm in training mode, the loss of loss.*, Adam and the LambdaLR schedule of train.*,
bf16 autocast (CUDA) with DeepPose's fp32 head. A variant is a base, then Inductor options joined by "+"
(`compile+conv1x1+coord`); BASES and OPTIONS say what each does. Every variant runs at every batch size
asked for: all the (variant, batch size) pairs are built first (each compiles, if it does, on its first
step), then timed in turns, each pair's block of steps once per repeat (A, B, C, A, B, C, ...) on the same
random inputs, so a drift of clock or load hits all alike.

Not a variant: cuDNN's fused BatchNorm+ReLU and BatchNorm+add+ReLU (cudnnBatchNormalizationForwardTrainingEx
with CUDNN_BATCHNORM_OPS_BN_ACTIVATION / _BN_ADD_ACTIVATION, NHWC). PyTorch does not expose them:
aten::cudnn_batch_norm takes no activation and no residual input (PyTorch calls cuDNN with
CUDNN_BATCHNORM_OPS_BN), and aten::cudnn_convolution_relu / cudnn_convolution_add_relu are convolution +
bias (+ residual) + ReLU for inference, with BatchNorm folded into the weights (impossible with batch
statistics) and no derivative. What the `compile` baseline does instead: Inductor generates one kernel for
training-mode BatchNorm's normalisation (with its running-statistics update) and the ReLU, one for
BatchNorm + residual add + ReLU, and fuses their backward with ReLU's, in channels_last (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch

from .. import fileio
from ..core import engine
from ..core.losses import loss_from_params
from ..core.model import DeepPose
from ..core.optim import lr_factor
from ..core.runtime import Precision, compile_model
from ..data import wflw
from ..data.dataset import iters_per_epoch
from ..params import Params
from ..tables import format_table
from .common import (
    build_training,
    format_runs,
    header,
    median,
    peak_memory,
    require,
    reset_memory,
    synchronize,
    training_device,
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


BASES: dict[str, str] = {
    "eager": "engine.train_step, the model not compiled",
    "compile": "engine.train_step on the model compiled as train compiles it (runtime.compile_model), "
    "static shapes: Inductor, default options",
    "graph-step": "the whole step of the compiled model (forward, loss, zero_grad + backward, fused Adam) "
    "captured as one CUDA graph and replayed; Adam capturable, its lr a device tensor that the LambdaLR "
    "schedule rewrites between replays (CUDA only)",
    "graph-eager": "graph-step around the model not compiled (CUDA only)",
}
"""What each variant's base runs."""

OPTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "conv1x1": ({"conv_1x1_as_mm": True}, "Inductor conv_1x1_as_mm: 1x1 convolutions as matmuls"),
    "coord": (
        {"coordinate_descent_tuning": True},
        "Inductor coordinate_descent_tuning: each Triton kernel's launch configuration tuned at its "
        "first run",
    ),
    "autotune": (
        {"max_autotune": True},
        "Inductor max_autotune: convolutions and matmuls benchmarked against Triton templates at compile "
        "time; no CUDA graphs (with coord: mode max-autotune-no-cudagraphs)",
    ),
    "cudagraphs": (
        {"triton.cudagraphs": True},
        "Inductor triton.cudagraphs (mode reduce-overhead): the forward and the backward graph each "
        "replayed as a CUDA graph, Adam outside them (CUDA only)",
    ),
}
"""Option name -> (the Inductor options it sets, what it does). Options apply to compile and graph-step."""

MODE_OPTIONS: dict[str, tuple[str, ...]] = {
    "default": (),
    "reduce-overhead": ("cudagraphs",),
    "max-autotune-no-cudagraphs": ("autotune", "coord"),
    "max-autotune": ("autotune", "coord", "cudagraphs"),
}
"""torch.compile's modes as our options (the Inductor options of torch._inductor.list_mode_options)."""

GRAPH_WARMUP = 3
"""Real steps a graph variant runs before its capture, on a side stream as torch.cuda.graphs asks: they
compile, let cuDNN pick its algorithms and create Adam's state."""


@dataclass(frozen=True)
class Variant:
    """One way of executing the training step: a base of BASES and options of OPTIONS."""

    name: str
    base: str
    options: tuple[str, ...] = ()

    @property
    def compiled(self) -> bool:
        return self.base in ("compile", "graph-step")

    @property
    def graph(self) -> bool:
        """The whole step is one CUDA graph (GraphStep)."""
        return self.base in ("graph-step", "graph-eager")

    def inductor_options(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for option in self.options:
            merged.update(OPTIONS[option][0])
        return merged

    def compile_mode(self) -> str | None:
        """The torch.compile mode with these Inductor options ("custom": none), None if not compiled."""
        if not self.compiled:
            return None
        return next((m for m, o in MODE_OPTIONS.items() if set(o) == set(self.options)), "custom")

    def needs_cuda(self) -> str | None:
        """Why this variant runs on CUDA only, or None."""
        if self.graph:
            return "the whole step as a CUDA graph needs CUDA"
        if "cudagraphs" in self.options:
            return "Inductor's CUDA graphs need CUDA"
        return None

    def describe(self) -> str:
        return "; ".join([BASES[self.base], *(OPTIONS[option][1] for option in self.options)])


def parse_variant(name: str) -> Variant:
    """`base[+option...]`, e.g. `compile+conv1x1`; an unknown or misplaced name is a BenchError."""
    base, *options = [token.strip() for token in name.strip().split("+")]
    require(base in BASES, f"--variants: {name!r} must start with one of {', '.join(BASES)}")
    for option in options:
        require(option in OPTIONS, f"--variants: {name!r}: unknown option {option!r} ({', '.join(OPTIONS)})")
    require(len(set(options)) == len(options), f"--variants: {name!r} names an option twice")
    require(
        not options or base in ("compile", "graph-step"),
        f"--variants: {name!r}: options apply to compile and graph-step only",
    )
    require(
        not (base == "graph-step" and "cudagraphs" in options),
        f"--variants: {name!r}: graph-step is already one CUDA graph",
    )
    return Variant("+".join([base, *options]), base, tuple(options))


def parse_variants(names: str | Sequence[str]) -> list[Variant]:
    """A comma-separated list (or a sequence) of variant names, each once."""
    if isinstance(names, str):
        names = names.split(",")
    variants = [parse_variant(name) for name in names if name.strip()]
    require(bool(variants), "--variants: name at least one variant")
    seen = [v.name for v in variants]
    require(len(set(seen)) == len(seen), f"--variants: a variant is named twice in {seen}")
    return variants


class TensorLR:
    """train.*'s LambdaLR for an optimiser whose lr is a tensor on the device, the tensor a graph reads.

    The schedule is computed on the host as LambdaLR computes it (base lr x lr_factor(step), in floats)
    and written into that same tensor (fill_: no host-device sync), so a captured graph sees each new lr
    without being captured again.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, base_lr: float, factor: Callable[[int], float]
    ) -> None:
        self.optimizer = optimizer
        self.tensors = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["initial_lr"] = base_lr  # LambdaLR's base lr: a float, so its arithmetic stays on the host
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self._into_tensors()

    def step(self) -> None:
        self.scheduler.step()
        self._into_tensors()

    def _into_tensors(self) -> None:
        for group, tensor in zip(self.optimizer.param_groups, self.tensors, strict=True):
            if group["lr"] is not tensor:  # torch versions whose schedulers assign a float
                tensor.fill_(float(group["lr"]))
                group["lr"] = tensor

    @property
    def last_epoch(self) -> int:
        return self.scheduler.last_epoch


def build_graph_training(
    params: Params, device: torch.device, precision: Precision, iters: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer, TensorLR]:
    """build_training for a step captured as a CUDA graph: the same model (same seed); the optimiser
    `wflw train` builds with the same settings, but fused and capturable (its step count on the device)
    and its lr a device tensor; the schedule as TensorLR."""
    model, reference, _ = build_training(params, device, precision, iters)
    options = dict(reference.defaults)
    base_lr = float(options["lr"])
    options.update(
        lr=torch.tensor(base_lr, dtype=torch.float32, device=device),
        fused=True,
        capturable=True,
        foreach=None,
    )
    optimizer = type(reference)(model.parameters(), **options)
    return model, optimizer, TensorLR(optimizer, base_lr, lr_factor(params.train, iters))


class _Unscheduled:
    """A schedule that does nothing: the captured step leaves the schedule to the host, between replays."""

    def step(self) -> None:
        pass


UNSCHEDULED = cast(torch.optim.lr_scheduler.LRScheduler, _Unscheduled())


class GraphStep:
    """`engine.train_step` captured as one CUDA graph and replayed (torch.cuda.graphs' whole-network capture).

    `warmup` real steps run first on a side stream (they compile, pick cuDNN algorithms, create Adam's
    state); then engine.train_step, with the schedule left out, is captured once on static input buffers.
    Each call copies the batch into those buffers, replays the graph (forward, loss, zero_grad + backward,
    Adam) and steps the schedule, which writes the next lr into the tensor the graph reads (TensorLR).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: TensorLR,
        loss_fn: torch.nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        precision: Precision,
        warmup: int = GRAPH_WARMUP,
    ) -> None:
        device = inputs.device
        self.scheduler = scheduler
        self.inputs, self.targets = inputs.clone(), targets.clone()  # the graph's static buffers
        schedule = cast(torch.optim.lr_scheduler.LRScheduler, scheduler)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        start = time.perf_counter()
        self.first_step_s = 0.0
        self.warmup_losses: list[torch.Tensor] = []
        with torch.cuda.stream(side):
            for i in range(max(warmup, 1)):
                self.warmup_losses.append(
                    engine.train_step(
                        model, optimizer, schedule, loss_fn, self.inputs, self.targets, precision
                    )
                )
                if i == 0:
                    side.synchronize()
                    self.first_step_s = time.perf_counter() - start
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = engine.train_step(
                model, optimizer, UNSCHEDULED, loss_fn, self.inputs, self.targets, precision
            )
        torch.cuda.synchronize(device)
        self.capture_s = time.perf_counter() - start

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        self.graph.replay()
        self.scheduler.step()
        return self.loss.clone()


@dataclass
class Prepared:
    """A variant at one batch size, built and warmed up: `step()` runs one training step."""

    variant: Variant
    batch_size: int
    step: Callable[[], torch.Tensor]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    first_step_s: float
    capture_s: float | None
    setup_s: float
    setup_losses: list[torch.Tensor] = field(default_factory=list)
    last: torch.Tensor | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    runs: list[float] = field(default_factory=list)


def prepare(
    variant: Variant,
    *,
    params: Params,
    device: torch.device,
    precision: Precision,
    loss_fn: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    warmup: int,
) -> Prepared:
    """Build `variant` for a batch of `inputs` (the LR schedule of params' run at that batch size),
    run its first step (timed: compile included) and its warm-up (their losses in `setup_losses`)."""
    started = time.perf_counter()
    batch_size = len(inputs)
    iters = iters_per_epoch(params.data.synthetic.train_faces, batch_size, drop_last=params.train.drop_last)
    build = build_graph_training if variant.graph else build_training
    model, optimizer, scheduler = build(params, device, precision, iters)
    model.train()
    step_model = model
    if variant.compiled:
        options = variant.inductor_options() or None
        step_model = compile_model(model, params.train.compile_cache, options=options)
    capture_s = None
    if variant.graph:
        graph = GraphStep(
            step_model, optimizer, scheduler, loss_fn, inputs, targets, precision, max(warmup, GRAPH_WARMUP)
        )
        first_step_s, capture_s = graph.first_step_s, graph.capture_s
        step = partial(graph, inputs, targets)
        losses = [*graph.warmup_losses, step()]  # the warm-up steps, then the first replay
    else:

        def step() -> torch.Tensor:
            return engine.train_step(step_model, optimizer, scheduler, loss_fn, inputs, targets, precision)

        synchronize(device)
        start = time.perf_counter()
        losses = [step()]
        synchronize(device)
        first_step_s = time.perf_counter() - start
        losses += [step() for _ in range(max(warmup - 1, 0))]
    synchronize(device)
    return Prepared(
        variant, batch_size, step, model, optimizer, scheduler, first_step_s, capture_s,
        time.perf_counter() - started, setup_losses=losses, last=losses[-1],
    )  # fmt: skip


def _random_batch(batch_size: int, input_size: int, device: torch.device, precision: Precision):
    """Inputs and [0, 1] targets drawn from seed 0: every variant at this batch size trains on these."""
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = torch.randn(batch_size, 3, input_size, input_size, device=device, generator=generator)
    targets = torch.rand(batch_size, wflw.NUM_POINTS, 2, device=device, generator=generator)
    return inputs.contiguous(memory_format=precision.memory_format()), targets


def _room_for(pairs: int) -> contextlib.AbstractContextManager:
    """Dynamo's recompile limit raised for `pairs` compiled models sharing DeepPose.forward, and hitting it
    made an error (past the limit Dynamo would silently run the model eagerly); no automatic dynamic
    shapes, so that each batch size gets its own static graph, as train's one batch size does."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    changes: dict[str, Any] = {name: max(getattr(config, name), 2 * pairs + 8)}
    changes["automatic_dynamic_shapes"] = False
    for key in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, key):
            changes[key] = max(getattr(config, key), 4 * pairs + 16)
            break
    for key in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(config, key):
            changes[key] = True
            break
    return config.patch(changes)


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:2000]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_variants(
    variants: Sequence[Variant],
    batch_sizes: Sequence[int],
    *,
    params: Params,
    steps: int,
    warmup: int,
    repeats: int,
    device: torch.device,
    precision: Precision,
    progress: Callable[[list[Prepared], list[dict[str, Any]]], None] = lambda done, not_run: None,
) -> tuple[list[Prepared], list[dict[str, Any]]]:
    """Every variant at every batch size: built in turn (graph variants last), then timed in turns.

    Returns the pairs timed and the ones not run ({variant, batch_size, reason, note}): CUDA-only ones
    off CUDA, and any whose building or timing raised (the others go on). `progress` is called as
    results come in.
    """
    cuda = device.type == "cuda"
    input_size = params.model.input_size
    loss_fn = loss_from_params(params.loss, input_size)
    pairs = [(v, b) for b in batch_sizes for v in variants]
    order = sorted(range(len(pairs)), key=lambda i: pairs[i][0].graph)  # graph captures last
    batches = {b: _random_batch(b, input_size, device, precision) for b in batch_sizes}
    prepared: dict[int, Prepared] = {}
    not_run: list[dict[str, Any]] = []

    def drop(index: int, reason: str, note: str, runs: list[float] | None = None) -> None:
        variant, batch_size = pairs[index]
        not_run.append({"variant": variant.name, "batch_size": batch_size, "reason": reason, "note": note})
        if runs:
            not_run[-1]["runs_images_per_s"] = runs
        logger.warning("train-step %s at batch %d not run: %s", variant.name, batch_size, note)

    def timed() -> list[Prepared]:
        return [prepared[i] for i in range(len(pairs)) if i in prepared]

    with _room_for(len(pairs)):
        for index in order:
            variant, batch_size = pairs[index]
            if not cuda and variant.needs_cuda():
                drop(index, "cuda-only", f"skipped on {device.type}: {variant.needs_cuda()}")
                continue
            inputs, targets = batches[batch_size]
            logger.info(
                "train-step %s at batch %d: building (compiles on the first step)", variant.name, batch_size
            )
            if cuda:
                synchronize(device)
                resident = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            try:
                pair = prepare(
                    variant, params=params, device=device, precision=precision, loss_fn=loss_fn,
                    inputs=inputs, targets=targets, warmup=warmup,
                )  # fmt: skip
            except Exception as err:  # a variant this torch or GPU cannot run must not stop the others
                logger.exception("train-step %s at batch %d failed to build", variant.name, batch_size)
                drop(index, "error", _error(err))
                _free(device)
                continue
            if cuda:
                own = torch.cuda.max_memory_allocated(device) - resident
                own += inputs.nbytes + targets.nbytes
                pair.memory = {"peak_memory_gib": own / 2**30, "memory_kind": "cuda_max_allocated_own"}
            prepared[index] = pair
            logger.info(
                "train-step %s at batch %d: first step %.1f s, built in %.1f s",
                variant.name, batch_size, pair.first_step_s, pair.setup_s,
            )  # fmt: skip
            progress(timed(), not_run)
        for repeat in range(repeats):
            for index in [i for i in range(len(pairs)) if i in prepared]:
                pair = prepared[index]
                try:
                    synchronize(device)
                    start = time.perf_counter()
                    for _ in range(steps):
                        pair.last = pair.step()
                    synchronize(device)
                except Exception as err:
                    logger.exception("train-step %s at batch %d failed", pair.variant.name, pair.batch_size)
                    drop(index, "error", _error(err), pair.runs)
                    del prepared[index]
                    _free(device)
                    continue
                pair.runs.append(steps * pair.batch_size / (time.perf_counter() - start))
            logger.info(
                "train-step repeat %d/%d: %s", repeat + 1, repeats,
                ", ".join(f"{p.variant.name}@{p.batch_size} {p.runs[-1]:.0f}" for p in timed()),
            )  # fmt: skip
            progress(timed(), not_run)
    if not cuda:
        for pair in timed():
            pair.memory = peak_memory(device)
    return timed(), not_run


def _row(pair: Prepared, flops: int, peak: float | None) -> dict[str, Any]:
    variant = pair.variant
    images_per_s = median(pair.runs) if pair.runs else None
    achieved = 3 * flops * images_per_s / 1e12 if images_per_s else None
    return {
        "variant": variant.name,
        "base": variant.base,
        "options": list(variant.options),
        "inductor_options": variant.inductor_options(),
        "compile": variant.compiled,
        "compile_mode": variant.compile_mode(),
        "batch_size": pair.batch_size,
        "images_per_s": images_per_s,
        "step_ms": 1000.0 * pair.batch_size / images_per_s if images_per_s else None,
        "runs_images_per_s": list(pair.runs),
        "first_step_s": pair.first_step_s,
        "capture_s": pair.capture_s,
        "setup_s": pair.setup_s,
        "loss_finite": bool(torch.isfinite(pair.last).item()) if pair.last is not None else None,
        **pair.memory,
        "achieved_tflops": achieved,
        "mfu": achieved / peak if achieved is not None and peak else None,
    }


def _add_ratios(rows: list[dict[str, Any]], baseline: str, first_batch: int) -> None:
    """ratio: images/s over the baseline's (the first variant at the first batch size); ratio_same_batch:
    over the first variant's at the same batch size. None where that pair was not timed."""
    by_batch = {r["batch_size"]: r["images_per_s"] for r in rows if r["variant"] == baseline}
    for row in rows:
        value, first, same = row["images_per_s"], by_batch.get(first_batch), by_batch.get(row["batch_size"])
        row["ratio"] = value / first if value and first else None
        row["ratio_same_batch"] = value / same if value and same else None


def run_train_step(
    *,
    params: Params,
    variants: str | None,
    batch_sizes: Sequence[int] | None,
    steps: int | None,
    warmup: int | None,
    repeats: int,
    peak: float | None,
    out_dir: Path,
    command: str | None,
) -> dict[str, Any]:
    """Train-step throughput of each variant at each batch size, timed in turns; peak memory, FLOPs, MFU;
    train_step.json. Without `variants`, the step as train.compile runs it; without `batch_sizes`, at
    train.batch_size."""
    device, precision = training_device(params.train)
    cuda = device.type == "cuda"
    chosen = parse_variants(variants or ("compile" if params.train.compile else "eager"))
    sizes = list(batch_sizes or [params.train.batch_size])
    require(len(set(sizes)) == len(sizes), f"--batch-sizes: a size is named twice in {sizes}")
    steps = steps or (200 if cuda else 3)
    warmup = warmup if warmup is not None else (10 if cuda else 1)
    require(min(sizes) >= 1 and steps >= 1 and repeats >= 1, "batch sizes, --steps, --repeats must be >= 1")
    arch, input_size = params.model.arch, params.model.input_size
    reset_memory(device)
    flops = forward_flops(arch, input_size)
    peak_value, peak_source = peak_tflops(device, precision, peak)
    result: dict[str, Any] = {
        **header("train-step", device, command),
        "complete": False,
        "arch": arch,
        "input_size": input_size,
        "batch_size": sizes[0],
        "batch_sizes": sizes,
        "variants": [{"name": v.name, "description": v.describe()} for v in chosen],
        "baseline": f"{chosen[0].name} at batch {sizes[0]}",
        "order": "every (variant, batch size) built first, then timed in turns: each pair's block of steps "
        "once per repeat, on the same random inputs",
        "steps": steps,
        "warmup_steps": warmup,
        "repeats": repeats,
        "precision": precision.name,
        "channels_last": precision.channels_last,
        "forward_gflop_per_image": flops / 1e9,
        "train_gflop_per_image": 3 * flops / 1e9,
        "flop_note": "FlopCounterMode, one forward at batch 1; training = 3 x forward",
        "peak_tflops": peak_value,
        "peak_source": peak_source,
        "memory_note": "CUDA: the most memory the pair held at once while built and warmed up (model, Adam "
        "state, activations, graph pool, its inputs), over what other pairs held; CPU: process peak RSS",
        "runs": [],
        "not_run": [],
    }

    def record(done: list[Prepared], not_run: list[dict[str, Any]]) -> None:
        result["runs"] = [_row(pair, flops, peak_value) for pair in done]
        _add_ratios(result["runs"], chosen[0].name, sizes[0])
        result["not_run"] = list(not_run)
        fileio.write_json(Path(out_dir) / "train_step.json", result)  # kept if the run is killed later

    logger.info(
        "train-step %s %dpx on %s: %s at batch %s",
        arch, input_size, device, ", ".join(v.name for v in chosen), ", ".join(map(str, sizes)),
    )  # fmt: skip
    done, not_run = time_variants(
        chosen, sizes, params=params, steps=steps, warmup=warmup, repeats=repeats,
        device=device, precision=precision, progress=record,
    )  # fmt: skip
    record(done, not_run)
    if any(v.compiled for v in chosen):
        torch._dynamo.reset()
    result["complete"] = True
    rows = result["runs"]
    several = len(sizes) > 1
    table = format_table(
        ["variant", "batch", "images/s (median)", "vs first", *(["vs same batch"] if several else []),
         "step ms", "first step s", "TFLOP/s", "MFU", "peak mem GiB", "runs"],
        [
            [
                r["variant"], r["batch_size"], r["images_per_s"], _times(r["ratio"]),
                *([_times(r["ratio_same_batch"])] if several else []),
                r["step_ms"], r["first_step_s"], r["achieved_tflops"],
                f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else None,
                r["peak_memory_gib"], format_runs(r["runs_images_per_s"]),
            ]
            for r in rows
        ],
    )  # fmt: skip
    skipped = "".join(
        f"\nnot run: {n['variant']} at batch {n['batch_size']}: {n['note'].splitlines()[0][:300]}"
        for n in result["not_run"]
    )
    title = (
        f"\ntrain-step: {arch} {input_size}x{input_size}, batch {', '.join(map(str, sizes))}, "
        f"{result['precision']}, {'channels_last' if precision.channels_last else 'contiguous'}, {device}; "
        f"{repeats} repeats of {steps} steps, variants in turns; forward {flops / 1e9:.2f} GFLOP/image; "
        f"peak: {peak_source}{'' if cuda else ' (peak mem = process peak RSS)'}"
    )
    write_result(out_dir, "train_step", result, f"{title}\n{table}{skipped}")
    return result


def _times(ratio: float | None) -> str | None:
    return f"{ratio:.3f}x" if ratio is not None else None
