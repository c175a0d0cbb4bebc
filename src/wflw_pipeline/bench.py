"""Performance benchmarks, `wflw bench loader | train-step | epoch`: a table on stdout, JSON in data/bench.

- `loader`: augmented, normalised network inputs per second from our data path (decoded crops held in
  memory on the training device, one batched affine warp per batch: `engine.inputs_and_targets`)
  against a loader in the reference's (MMPose's) style: a torch Dataset that decodes the ORIGINAL image
  file with Pillow, crops and warps one face with a PIL affine (same flip/scale/rotation/shift ranges,
  drawn per sample), normalises it, in DataLoader workers (one per core). Same faces, same batch size,
  both in one run; the images are synthetic WFLW at WFLW-like sizes, generated and converted here.
- `train-step`: forward + backward + optimiser step of DeepPose on random inputs already on the device,
  with and without `torch.compile`; peak memory; FLOPs (FlopCounterMode) and model FLOP utilisation.
- `epoch`: `engine.train_one_epoch` over an in-memory face set (data + step, end to end) and the time
  the reference schedule (210 epochs of 7,500 faces) would take at that speed.

Benchmarks only measure; they never assert a speed. Torch stack only (no dvc, mlflow, prefect, requests).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import platform
import statistics
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import augment, engine, fileio, wflw
from .dataset import FaceSet, load_faces
from .errors import PipelineError
from .losses import loss_from_params
from .model import DeepPose, build_model
from .params import AugmentParams, ConvertParams, LossParams, SyntheticParams, TrainParams
from .runtime import Precision, RuntimeSetupError, configure_backends
from .runtime import resolve_device as resolve_train_device
from .runtime import resolve_precision as resolve_train_precision
from .train import build_optimizer, lr_factor

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
REFERENCE_FACES = 7500
REFERENCE_EPOCHS = 210
RESNET50_256_GFLOP = 10.7
"""ResNet-50 forward at 256x256: 4.1 GMAC at 224 x (256/224)^2 x 2 FLOP per MAC."""

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
)
"""Dense bf16 tensor-core peak by (a substring of) the CUDA device name, first match wins."""


class BenchError(PipelineError):
    """A benchmark that cannot run as asked (bad size, missing device)."""


# --------------------------------------------------------------------------------------------- common


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


def resolve_device(name: str) -> torch.device:
    try:
        return resolve_train_device(name, key="bench --device")
    except RuntimeSetupError as err:
        raise BenchError(str(err)) from None


def resolve_precision(name: str, channels_last: bool | None, device: torch.device) -> Precision:
    """auto: bf16 autocast on CUDA, fp32 elsewhere; channels_last defaults to on (as train.* does)."""
    return resolve_train_precision(name, True if channels_last is None else channels_last, device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as text too)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _write(out_dir: Path, name: str, result: dict[str, Any], table: str) -> Path:
    path = Path(out_dir) / f"{name}.json"
    fileio.write_json(path, result)
    print(table, flush=True)
    print(f"wrote {path}", flush=True)
    return path


def _header(mode: str, device: torch.device, command: str | None) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "mode": mode,
        "command": command,
        "machine": machine_info(device),
    }


# --------------------------------------------------------------------------------------------- loader


@dataclass(frozen=True)
class BenchData:
    """Synthetic WFLW for the loader benchmark: the original images on disk and their conversion."""

    images_dir: Path
    parquet: Path

    def records(self) -> tuple[list[Path], np.ndarray]:
        """Image file and image-pixel landmarks (N, 98, 2) of every face, in the order of the Parquet rows.

        The landmarks are continuous (pixel i covers [i, i + 1), as the baseline's PIL warp reads them):
        `landmarks_image` holds them as annotated, with pixel centres at integers.
        """
        import pyarrow.parquet as pq

        table = pq.read_table(self.parquet, columns=["image_path", "landmarks_image"])
        paths = [self.images_dir / p for p in table.column("image_path").to_pylist()]
        points = table.column("landmarks_image").combine_chunks().flatten().to_numpy()
        points = wflw.to_continuous(points.astype(np.float64))
        return paths, points.reshape(len(paths), wflw.NUM_POINTS, 2)


def prepare_data(
    work_dir: Path,
    *,
    faces: int,
    min_image_size: int = 800,
    max_image_size: int = 1200,
    crop_size: int = 384,
    context: float = 1.5,
    padding: float = 1.25,
    seed: int = 0,
) -> BenchData:
    """Generate synthetic WFLW archives, extract the images (for the baseline), convert them (for ours).

    Reused when `work_dir` already holds data made with the same settings.
    """
    work_dir = Path(work_dir)
    settings = {
        "faces": faces,
        "min_image_size": min_image_size,
        "max_image_size": max_image_size,
        "crop_size": crop_size,
        "context": context,
        "padding": padding,
        "seed": seed,
    }
    stamp = work_dir / "bench_data.json"
    data = BenchData(work_dir / "images", work_dir / "parquet" / "train.parquet")
    if stamp.is_file() and data.parquet.is_file():
        import json

        if json.loads(stamp.read_text()) == settings:
            logger.info("reusing the benchmark data in %s", work_dir)
            return data
    from .convert import run_convert
    from .synthetic import generate_archives

    raw = work_dir / "raw"
    synthetic = SyntheticParams(
        seed=seed,
        train_faces=faces,
        test_faces=1,
        min_image_size=min_image_size,
        max_image_size=max_image_size,
        workers=0,
    )
    logger.info("generating %d synthetic faces at %d-%d px in %s", faces, min_image_size, max_image_size, raw)
    images_archive, _ = generate_archives(raw, synthetic)
    extract_images(images_archive, data.images_dir)
    # Every field explicit (params have no defaults): the benchmark's own fixed data, not params.yaml's.
    convert = ConvertParams(
        bbox="landmarks",
        padding=padding,
        context=context,
        crop_size=crop_size,
        jpeg_quality=95,
        val_fraction=0.0,
        seed=seed,
        max_outside=0.5,
        on_error="fail",
        workers=0,
    )
    run_convert(convert, raw, data.parquet.parent)
    fileio.write_json(stamp, settings)
    return data


def extract_images(archive: Path, out_dir: Path) -> int:
    """Write every image of a WFLW_images.tar.gz under out_dir (paths relative to WFLW_images)."""
    prefix = f"{wflw.IMAGES_ROOT}/"
    count = 0
    with tarfile.open(archive, mode="r|gz") as tar:
        for info in tar:
            wflw.check_member_path(info.name)
            if info.isfile() and info.name.startswith(prefix):
                target = out_dir / info.name[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(info).read())  # type: ignore[union-attr]
                count += 1
    return count


def reference_matrix(
    landmarks_image: np.ndarray,
    *,
    flip: bool,
    scale: float,
    angle: float,
    shift: tuple[float, float],
    padding: float,
    out_size: int,
) -> np.ndarray:
    """(2, 3) affine: output pixel -> ORIGINAL image pixel, for one face, as the reference builds it.

    The face box is the extent of the landmarks (centre, side = max(w, h)) padded by `padding`; the
    view is that square moved by `shift` x side, scaled by `scale`, turned by `angle` and mirrored,
    exactly the geometry `augment.view_matrices` applies to a stored crop.
    """
    lo, hi = landmarks_image.min(axis=0), landmarks_image.max(axis=0)
    side = float((hi - lo).max()) * padding
    step = scale * side / out_size
    cos, sin = math.cos(angle) * step, math.sin(angle) * step
    mirror = -1.0 if flip else 1.0
    linear = np.array([[cos * mirror, -sin], [sin * mirror, cos]])
    centre = (lo + hi) / 2.0 + np.asarray(shift) * side
    translation = centre - linear.sum(axis=1) * (out_size / 2)
    return np.concatenate([linear, translation[:, None]], axis=1)


class ReferenceStyleDataset(torch.utils.data.Dataset):
    """The reference's per-sample data path: decode the whole original image, crop and warp one face.

    Per item: Pillow decodes the original JPEG (RGB), one bilinear PIL affine warp takes the augmented
    view of the face straight to `out_size` (pixel i covers [i, i + 1), as in augment.py; outside the
    image is black), the pixels are normalised per channel and the landmarks mapped into the view (and
    re-labelled by WFLW's flip permutation when mirrored), in [0, 1] units of the input.

    Augmentation is drawn per sample with `augment.draw_params` (the same distributions as ours); `views`
    fixes the view of each item instead (tests).
    """

    def __init__(
        self,
        image_paths: Sequence[Path],
        landmarks_image: np.ndarray,
        *,
        augmentation: AugmentParams | None,
        padding: float = 1.25,
        out_size: int = 256,
        seed: int = 0,
        views: augment.ViewParams | None = None,
    ) -> None:
        self.paths = [str(p) for p in image_paths]
        self.landmarks = np.asarray(landmarks_image, np.float64)
        self.augmentation = augmentation
        self.padding = padding
        self.out_size = out_size
        self.seed = seed
        self.views = views
        self.mean = np.asarray(engine.IMAGENET_MEAN, np.float32)
        self.inv_std = 1.0 / np.asarray(engine.IMAGENET_STD, np.float32)
        self.flip_permutation = np.asarray(wflw.FLIP)
        self._generator: tuple[int, torch.Generator] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def _view(self, index: int) -> tuple[bool, float, float, tuple[float, float]]:
        if self.views is not None:
            v = self.views
            return (
                bool(v.flip[index]),
                float(v.scale[index]),
                float(v.angle[index]),
                tuple(v.shift[index].tolist()),
            )
        if self.augmentation is None:
            return False, 1.0, 0.0, (0.0, 0.0)
        draws = engine.draw(self.augmentation, 1, self._worker_generator(), torch.device("cpu"))
        return (
            bool(draws.flip[0]),
            float(draws.scale[0]),
            float(draws.angle[0]),
            tuple(draws.shift[0].tolist()),
        )

    def _worker_generator(self) -> torch.Generator:
        """One generator per process (each DataLoader worker gets its own seed)."""
        pid = os.getpid()
        if self._generator is None or self._generator[0] != pid:
            info = torch.utils.data.get_worker_info()
            seed = info.seed if info is not None else self.seed
            self._generator = (pid, torch.Generator().manual_seed(seed % 2**63))
        return self._generator[1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[index]) as file:
            image = file.convert("RGB")
        points = self.landmarks[index]
        flip, scale, angle, shift = self._view(index)
        matrix = reference_matrix(
            points,
            flip=flip,
            scale=scale,
            angle=angle,
            shift=shift,
            padding=self.padding,
            out_size=self.out_size,
        )
        view = image.transform(
            (self.out_size, self.out_size),
            Image.Transform.AFFINE,
            data=tuple(matrix.reshape(-1).tolist()),
            resample=Image.Resampling.BILINEAR,
        )
        pixels = (np.asarray(view, np.float32) - self.mean) * self.inv_std
        inputs = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        linear, translation = matrix[:, :2], matrix[:, 2]
        targets = (points - translation) @ np.linalg.inv(linear).T
        if flip:
            targets = targets[self.flip_permutation]
        return inputs, torch.from_numpy((targets / self.out_size).astype(np.float32))


def baseline_loader(
    dataset: ReferenceStyleDataset,
    *,
    batch_size: int,
    batches: int,
    workers: int,
    pin_memory: bool,
    seed: int,
) -> torch.utils.data.DataLoader:
    """A shuffling DataLoader yielding exactly `batches` full batches (epochs chained, as training does)."""
    sampler = torch.utils.data.RandomSampler(
        dataset, num_samples=batches * batch_size, generator=torch.Generator().manual_seed(seed)
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=True,
        prefetch_factor=2 if workers else None,
    )


def time_baseline(
    dataset: ReferenceStyleDataset,
    device: torch.device,
    *,
    batch_size: int,
    batches: int,
    warmup: int,
    workers: int,
    seed: int,
) -> dict[str, float]:
    """Images/s of the reference-style loader over `batches` batches after `warmup` (workers started)."""
    start = time.perf_counter()
    loader = baseline_loader(
        dataset,
        batch_size=batch_size,
        batches=warmup + batches,
        workers=workers,
        pin_memory=device.type == "cuda",
        seed=seed,
    )
    timed = None
    for i, (inputs, targets) in enumerate(loader):
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if i + 1 == warmup:
            synchronize(device)
            timed = time.perf_counter()
    synchronize(device)
    end = time.perf_counter()
    timed = timed if timed is not None else start
    return {
        "images_per_s": batches * batch_size / (end - timed),
        "startup_s": (timed - start) if warmup else 0.0,
    }


def time_ours(
    faces: FaceSet,
    view: engine.View,
    augmentation: AugmentParams,
    precision: Precision,
    *,
    batch_size: int,
    batches: int,
    warmup: int,
    seed: int,
) -> dict[str, float]:
    """Images/s of our data path: index the in-memory crops, draw, warp the whole batch on the device."""
    device = faces.images.device
    total = (warmup + batches) * batch_size
    order_gen = torch.Generator(device=device).manual_seed(seed)
    order = torch.cat(
        [
            torch.randperm(len(faces), generator=order_gen, device=device)
            for _ in range(-(-total // len(faces)))
        ]
    )
    augment_gen = torch.Generator(device=device).manual_seed(seed + 1)
    timed = time.perf_counter()
    inputs = None
    for i in range(warmup + batches):
        if i == warmup:
            synchronize(device)
            timed = time.perf_counter()
        index = order[i * batch_size : (i + 1) * batch_size]
        draws = engine.draw(augmentation, batch_size, augment_gen, device)
        # as train_one_epoch does: the next batch is written over the last one's inputs (on the CPU)
        out = engine.reusable(inputs, batch_size)
        inputs, _ = engine.inputs_and_targets(faces, index, view, draws, precision, out=out)
    synchronize(device)
    return {"images_per_s": batches * batch_size / (time.perf_counter() - timed)}


def run_loader(
    *,
    out_dir: Path,
    work_dir: Path,
    augmentation: AugmentParams,
    device_name: str = "auto",
    faces: int = 300,
    batch_size: int = 64,
    batches: int = 20,
    warmup: int = 3,
    repeats: int = 3,
    workers: int | None = None,
    min_image_size: int = 800,
    max_image_size: int = 1200,
    crop_size: int = 384,
    input_size: int = 256,
    context: float = 1.5,
    padding: float = 1.25,
    seed: int = 0,
    channels_last: bool | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Ours vs the reference-style loader on the same synthetic faces; writes loader.json."""
    device = resolve_device(device_name)
    _require(faces >= batch_size, f"--faces ({faces}) must be >= --batch-size ({batch_size})")
    _require(batches >= 1 and repeats >= 1 and warmup >= 0, "--batches, --repeats >= 1 and --warmup >= 0")
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    data = prepare_data(
        work_dir,
        faces=faces,
        min_image_size=min_image_size,
        max_image_size=max_image_size,
        crop_size=crop_size,
        context=context,
        padding=padding,
        seed=seed,
    )
    faceset = load_faces(data.parquet, device)
    paths, landmarks = data.records()
    view = engine.View(faceset.crop_size, faceset.context, input_size)
    # The loader's output is fp32 either way; on CUDA in the memory format training feeds the model.
    precision = Precision(None, device.type == "cuda" if channels_last is None else channels_last)
    dataset = ReferenceStyleDataset(
        paths, landmarks, augmentation=augmentation, padding=padding, out_size=input_size, seed=seed
    )
    ours_runs, baseline_runs, startups = [], [], []
    for repeat in range(repeats):
        ours = time_ours(
            faceset,
            view,
            augmentation,
            precision,
            batch_size=batch_size,
            batches=batches,
            warmup=warmup,
            seed=seed + repeat,
        )
        base = time_baseline(
            dataset,
            device,
            batch_size=batch_size,
            batches=batches,
            warmup=warmup,
            workers=workers,
            seed=seed + repeat,
        )
        ours_runs.append(ours["images_per_s"])
        baseline_runs.append(base["images_per_s"])
        startups.append(base["startup_s"])
        logger.info(
            "repeat %d: ours %.0f images/s, baseline %.0f images/s",
            repeat + 1,
            ours_runs[-1],
            baseline_runs[-1],
        )
    ours_median, base_median = _median(ours_runs), _median(baseline_runs)
    image_sizes = [Image.open(p).size for p in paths]
    result = {
        **_header("loader", device, command),
        "faces": len(faceset),
        "image_size_px": {
            "min": min(min(s) for s in image_sizes),
            "max": max(max(s) for s in image_sizes),
            "mean_megapixels": float(np.mean([w * h for w, h in image_sizes]) / 1e6),
        },
        "batch_size": batch_size,
        "batches": batches,
        "warmup_batches": warmup,
        "repeats": repeats,
        "crop_size": crop_size,
        "context": context,
        "input_size": input_size,
        "augment": augmentation.__dict__,
        "ours": {
            "what": "FaceSet on the device + engine.inputs_and_targets (augment.augment_batch)",
            "images_per_s": ours_median,
            "batches_per_s": ours_median / batch_size,
            "runs_images_per_s": ours_runs,
            "memory_format": "channels_last" if precision.channels_last else "contiguous",
        },
        "baseline": {
            "what": "per-sample Pillow decode of the original + PIL affine warp + normalise, DataLoader",
            "workers": workers,
            "images_per_s": base_median,
            "batches_per_s": base_median / batch_size,
            "runs_images_per_s": baseline_runs,
            "worker_startup_s": _median(startups),
        },
        "ratio": ours_median / base_median,
    }
    table = format_table(
        ["loader", "images/s (median)", "batches/s", "runs", "ratio"],
        [
            [
                "ours (on-device batch warp)",
                ours_median,
                ours_median / batch_size,
                _runs(ours_runs),
                result["ratio"],
            ],
            [
                f"baseline ({workers} workers)",
                base_median,
                base_median / batch_size,
                _runs(baseline_runs),
                1.0,
            ],
        ],
    )
    _write(
        out_dir, "loader", result, f"\nloader: {len(faceset)} faces, batch {batch_size}, {device}\n{table}"
    )
    return result


def _runs(values: Sequence[float]) -> str:
    return " ".join(f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in values)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise BenchError(message)


# ----------------------------------------------------------------------------------------- train-step


def forward_flops(arch: str, input_size: int) -> int:
    """FLOPs of one forward pass of DeepPose at batch 1 (FlopCounterMode: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = DeepPose(arch).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, input_size, input_size))
    return int(counter.get_total_flops())


def peak_tflops(
    device: torch.device, precision: Precision, given: float | None
) -> tuple[float | None, str]:
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


def _peak_memory(device: torch.device) -> dict[str, Any]:
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


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build_training(
    arch: str, device: torch.device, precision: Precision, train: TrainParams, seed: int = 0
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """DeepPose (random init) in the run's memory format and the optimiser `wflw train` builds (train.*)."""
    torch.manual_seed(seed)
    model = build_model(arch, "none").to(device).to(memory_format=precision.memory_format())
    return model, build_optimizer(model, train, device)


def _compile(model: torch.nn.Module, mode: str) -> torch.nn.Module:
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
    """Images/s of forward + backward + Adam step on fixed random inputs already on the device."""

    _reset_memory(device)
    model, optimizer = build_training(arch, device, precision, train)
    model.train()
    step_model = _compile(model, compile_mode) if compiled else model
    loss_fn = loss_from_params(loss, input_size)
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = torch.randn(batch_size, 3, input_size, input_size, device=device, generator=generator)
    inputs = inputs.contiguous(memory_format=precision.memory_format())
    targets = torch.rand(batch_size, wflw.NUM_POINTS, 2, device=device, generator=generator)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast(device):
            pred = step_model(inputs)
        value = loss_fn(pred.float(), targets)
        value.backward()
        optimizer.step()
        return value.detach()

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
        "images_per_s": _median(runs),
        "step_ms": 1000.0 * batch_size / _median(runs),
        "runs_images_per_s": runs,
        "first_step_s": first_step,
        "loss_finite": finite,
        **_peak_memory(device),
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
    _require(batch_size >= 1 and steps >= 1 and repeats >= 1, "--batch-size, --steps, --repeats must be >= 1")
    modes = {"auto": [False, True] if cuda else [False], "both": [False, True], "on": [True], "off": [False]}
    precision = resolve_precision(precision_name, channels_last, device)
    configure_backends(device)
    flops = forward_flops(arch, input_size)
    peak_value, peak_source = peak_tflops(device, precision, peak)
    runs: list[dict[str, Any]] = []
    result = {
        **_header("train-step", device, command),
        "complete": False,
        "arch": arch,
        "input_size": input_size,
        "batch_size": batch_size,
        "steps": steps,
        "warmup_steps": warmup,
        "repeats": repeats,
        "precision": "bf16" if precision.dtype is torch.bfloat16 else "fp32",
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
                _runs(r["runs_images_per_s"]),
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
    _write(out_dir, "train_step", result, f"{title}\n{table}")
    return result


# ---------------------------------------------------------------------------------------------- epoch


def synthetic_faces(n: int, crop_size: int, context: float, device: torch.device, seed: int = 0) -> FaceSet:
    """N random uint8 crops with landmarks inside the central view, made on the device (speed only)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(
        0, 256, (n, 3, crop_size, crop_size), dtype=torch.uint8, device=device, generator=generator
    )
    view = crop_size / context
    landmarks = (
        crop_size / 2 + (torch.rand(n, wflw.NUM_POINTS, 2, device=device, generator=generator) - 0.5) * view
    )
    return FaceSet(
        images=images,
        landmarks=landmarks,
        flags=torch.zeros(n, len(wflw.ATTRIBUTES), dtype=torch.bool, device=device),
        face_id=torch.arange(n, device=device),
        crop_to_image=np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (n, 1, 1)),
        crop={"crop_size": crop_size, "context": context},
    )


def run_epoch(
    *,
    out_dir: Path,
    augmentation: AugmentParams,
    loss: LossParams,
    train: TrainParams,
    arch: str = "resnet50",
    faces: int | None = None,
    crop_size: int = 384,
    context: float = 1.5,
    input_size: int = 256,
    batch_size: int | None = None,
    epochs: int = 3,
    device_name: str = "auto",
    precision_name: str = "auto",
    channels_last: bool | None = None,
    compile: str = "auto",
    compile_mode: str = "default",
    reference_faces: int = REFERENCE_FACES,
    reference_epochs: int = REFERENCE_EPOCHS,
    command: str | None = None,
) -> dict[str, Any]:
    """Whole epochs of engine.train_one_epoch (data + step), the projected reference schedule; epoch.json."""

    device = resolve_device(device_name)
    cuda = device.type == "cuda"
    faces = faces or (reference_faces if cuda else 64)
    batch_size = batch_size or (256 if cuda else 16)
    _require(faces >= batch_size, f"--faces ({faces}) must be >= --batch-size ({batch_size})")
    _require(epochs >= 1, "--epochs must be >= 1")
    compiled = {"auto": cuda, "on": True, "off": False}[compile]
    precision = resolve_precision(precision_name, channels_last, device)
    configure_backends(device)
    faceset = synthetic_faces(faces, crop_size, context, device)
    view = engine.View(crop_size, context, input_size)
    model, optimizer = build_training(arch, device, precision, train)
    # The optimiser and LR schedule of the loaded params (train.*), as `wflw train` would run them.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train, max(1, faces // batch_size)))
    step_model = _compile(model, compile_mode) if compiled else model
    loss_fn = loss_from_params(loss, input_size)
    _reset_memory(device)
    rows = []
    for epoch in range(epochs):
        order, augment_gen = engine.epoch_generators(0, epoch, 0, device)
        result = engine.train_one_epoch(
            step_model,
            optimizer,
            scheduler,
            loss_fn,
            faceset,
            view=view,
            augmentation=augmentation,
            batch_size=batch_size,
            order_generator=order,
            augment_generator=augment_gen,
            precision=precision,
            progress=False,
        )
        rows.append(
            {
                "epoch": epoch + 1,
                "seconds": result.seconds,
                "images": result.images,
                "images_per_s": result.images / result.seconds,
                "loss": result.loss,
            }
        )
        logger.info("epoch %d: %.2f s, %.0f images/s", epoch + 1, result.seconds, rows[-1]["images_per_s"])
        partial = {**_header("epoch", device, command), "complete": False, "epochs": rows}
        fileio.write_json(Path(out_dir) / "epoch.json", partial)  # kept if a later epoch is killed
    steady = rows[1:] or rows
    images_per_s = _median([r["images_per_s"] for r in steady])
    per_epoch_images = (reference_faces // batch_size) * batch_size  # drop_last, as train_one_epoch does
    reference_images = reference_epochs * per_epoch_images
    warm_overhead = max(0.0, rows[0]["seconds"] - rows[0]["images"] / images_per_s) if len(rows) > 1 else 0.0
    projected = reference_images / images_per_s
    result = {
        **_header("epoch", device, command),
        "complete": True,
        "arch": arch,
        "faces": faces,
        "crop_size": crop_size,
        "context": context,
        "input_size": input_size,
        "batch_size": batch_size,
        "precision": "bf16" if precision.dtype is torch.bfloat16 else "fp32",
        "channels_last": precision.channels_last,
        "compile": compiled,
        "compile_mode": compile_mode if compiled else None,
        "epochs": rows,
        "images_per_s": images_per_s,
        "first_epoch_overhead_s": warm_overhead,
        "reference": {"faces": reference_faces, "epochs": reference_epochs, "images": reference_images},
        "projected_reference_s": projected,
        "projected_reference_with_warmup_s": projected + warm_overhead,
        "note": "train_one_epoch only (no val prediction, no checkpoint); steady: median of epochs 2..",
        **_peak_memory(device),
    }
    table = format_table(
        ["epoch", "seconds", "images", "images/s", "loss"],
        [[r["epoch"], r["seconds"], r["images"], r["images_per_s"], r["loss"]] for r in rows],
    )
    summary = format_table(
        ["steady images/s", "projected 210 x 7,500 faces", "+ first-epoch overhead", "peak mem GiB"],
        [
            [
                images_per_s,
                _duration(projected),
                _duration(projected + warm_overhead),
                result["peak_memory_gib"],
            ]
        ],
    )
    title = (
        f"\nepoch: {arch} {input_size}px, {faces} faces of {crop_size}px crops, batch {batch_size}, "
        f"{result['precision']}, compile={compiled}, {device}"
    )
    _write(out_dir, "epoch", result, f"{title}\n{table}\n\n{summary}")
    return result


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


MODES: dict[str, Callable[..., dict[str, Any]]] = {
    "loader": run_loader,
    "train-step": run_train_step,
    "epoch": run_epoch,
}
