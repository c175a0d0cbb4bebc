"""What every benchmark shares: where it ran, the training setup of params, timing helpers, tables, JSON."""

from __future__ import annotations

import datetime
import itertools
import os
import platform
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import fileio
from ..core import engine, optim
from ..core.model import build_model
from ..core.runtime import Precision, configure_backends, resolve_device, resolve_precision
from ..data.dataset import FaceSet
from ..errors import PipelineError
from ..params import Params, TrainParams

FORMAT_VERSION = 1


class BenchError(PipelineError):
    """A benchmark that cannot run as asked (bad size)."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise BenchError(message)


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where and when a figure was measured."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_model": _cpu_model(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda
        )
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def training_device(train: TrainParams) -> tuple[torch.device, Precision]:
    """train.device and train.precision as `wflw train` resolves them, the backends configured as it does."""
    device = resolve_device(train.device)
    configure_backends(device)
    return device, resolve_precision(train.precision, train.channels_last, device)


def build_training(
    params: Params, device: torch.device, precision: Precision, iters_per_epoch: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """DeepPose of model.* (random init from train.seed: nothing is downloaded) in the run's memory
    format, with the optimizer and LR schedule `wflw train` builds from train.*."""
    torch.manual_seed(params.train.seed)
    model = build_model(params.model.arch, "none").to(device).to(memory_format=precision.memory_format())
    return model, *optim.build_training(model, params.train, device, iters_per_epoch)


def endless_batches(
    faces: FaceSet, params: Params, precision: Precision
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """engine.EpochBatches of train.batch_size over `faces`, epoch after epoch, drawn as train draws them."""
    view = engine.View(faces.crop_size, faces.context, params.model.input_size)
    for epoch in itertools.count():
        order, augmentation = engine.epoch_generators(params.train.seed, epoch, 0, faces.images.device)
        yield from engine.EpochBatches(
            faces,
            view=view,
            augmentation=params.augment,
            batch_size=params.train.batch_size,
            drop_last=params.train.drop_last,
            order_generator=order,
            augment_generator=augmentation,
            precision=precision,
        )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """CUDA: max allocated since reset_memory; elsewhere the process's peak RSS."""
    if device.type == "cuda":
        return {
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "memory_kind": "cuda_max_allocated",
        }
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except ImportError:
        return {"peak_memory_gib": None, "memory_kind": "n/a"}
    return {"peak_memory_gib": rss, "memory_kind": "process_peak_rss"}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def format_runs(values: Sequence[float]) -> str:
    """The repeats of one figure, in a table cell."""
    return " ".join(f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in values)


def header(mode: str, device: torch.device, command: str | None) -> dict[str, Any]:
    """The fields every result JSON starts with."""
    return {
        "format_version": FORMAT_VERSION,
        "mode": mode,
        "command": command,
        "machine": machine_info(device),
    }


def write_result(out_dir: Path, name: str, result: dict[str, Any], table: str) -> Path:
    """<out_dir>/<name>.json, and the table on stdout."""
    path = Path(out_dir) / f"{name}.json"
    fileio.write_json(path, result)
    print(table, flush=True)
    print(f"wrote {path}", flush=True)
    return path
