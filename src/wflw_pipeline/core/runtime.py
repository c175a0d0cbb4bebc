"""Where and how the core runs: device, precision, backends and this process's place in a DDP job."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import PipelineError

logger = logging.getLogger(__name__)


class RuntimeSetupError(PipelineError):
    """A device or precision that this machine cannot provide (names the param key)."""


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None = fp32) and memory format of one run."""

    dtype: torch.dtype | None
    channels_last: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def name(self) -> str:
        return "fp32" if self.dtype is None else str(self.dtype).removeprefix("torch.").replace("float", "f")


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Distributed:
        return cls(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast(self, value: object) -> object:
        """Rank 0's `value` on every rank (the value itself without DDP)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def resolve_device(name: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an unavailable explicit choice is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if name == "auto":
        name = next(kind for kind, ok in available.items() if ok)
    if not available[name]:
        raise RuntimeSetupError(f"{key}: {name} is not available on this machine (use auto or cpu)")
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


def device_facts(device: torch.device) -> dict[str, str]:
    """What a run ran on, as train's metrics.json records it: the device type, the GPU's name (else the
    type), the torch version."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"device": device.type, "device_name": name, "torch_version": torch.__version__}


def resolve_precision(precision: str, channels_last: bool, device: torch.device) -> Precision:
    """`auto`: bf16 autocast on CUDA, fp32 elsewhere; or the precision asked for."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return Precision(torch.bfloat16 if use_bf16 else None, channels_last)


def configure_backends(device: torch.device) -> None:
    """Let cuDNN pick the fastest convolution algorithms for our fixed input shapes (CUDA only)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
"""Where Inductor keeps its caches: the FX graph cache (compiled kernels, Triton's bundled in) and the
AOTAutograd cache (the forward/backward split) live under it; read by torch at each cache access."""


def setup_compile_cache(folder: str | Path | None, key: str = "train.compile_cache") -> Path | None:
    """Keep torch.compile's caches across processes, in `folder` (None: torch's default location).

    Call before the first compile. Turns on Inductor's FX graph cache and the AOTAutograd cache (both on
    by default in torch 2.14; set here so an old default or a config change cannot silently drop them)
    and points TORCHINDUCTOR_CACHE_DIR at `folder`, made absolute (compile workers inherit it) and
    created. A second run of the same model then loads the compiled graphs instead of compiling them;
    Dynamo still traces the model (seconds), and cuDNN still picks its algorithms (per process).
    Returns the folder used, or None for torch's default.
    """
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    if folder is None:
        return None
    path = Path(folder).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RuntimeSetupError(f"{key}: cannot create {path} ({err.strerror or err})") from None
    os.environ[COMPILE_CACHE_ENV] = str(path)
    return path


def compile_model(
    model: nn.Module,
    cache: str | Path | None,
    key: str = "train.compile_cache",
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """`torch.compile(model)` with its caches in `cache` (setup_compile_cache); `options`: Inductor's.

    The one compile of the package. Shapes are static: train's full batches make one graph, and a short
    last batch (train.drop_last: false) one more, rather than a dynamic-shape graph for every batch;
    validation runs on the uncompiled module, so eval mode never reaches a graph.
    """
    folder = setup_compile_cache(cache, key)
    logger.info("torch.compile, caches in %s", folder or "torch's default location")
    return torch.compile(model, dynamic=False, options=options)
