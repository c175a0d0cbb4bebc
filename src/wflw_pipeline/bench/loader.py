"""`wflw bench loader`: our on-device batch augmentation vs a reference-style per-sample DataLoader."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import tarfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import fileio
from ..core import engine
from ..core.geometry import LANDMARK_RULES, face_box
from ..core.runtime import Precision
from ..data import augment, wflw
from ..data.dataset import FaceSet, load_faces
from ..params import AugmentParams, Params
from ..tables import format_table
from .common import (
    endless_batches,
    format_runs,
    header,
    median,
    require,
    synchronize,
    training_device,
    write_result,
)

logger = logging.getLogger(__name__)


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


def prepare_data(work_dir: Path, params: Params, faces: int) -> BenchData:
    """Generate `faces` synthetic WFLW faces of data.synthetic.*, extract the images (for the baseline) and
    convert them with convert.* (for ours; every face in train).

    Reused when `work_dir` already holds data made with the same settings.
    """
    require(
        params.convert.bbox in LANDMARK_RULES,
        f"bench loader: the baseline crops around the landmarks (convert.bbox: {', '.join(LANDMARK_RULES)})",
    )
    work_dir = Path(work_dir)
    synthetic = replace(params.data.synthetic, train_faces=faces, test_faces=1)
    convert = replace(params.convert, val_fraction=0.0)
    settings = {"synthetic": asdict(synthetic), "convert": asdict(convert)}
    stamp = work_dir / "bench_data.json"
    data = BenchData(work_dir / "images", work_dir / "parquet" / "train.parquet")
    if stamp.is_file() and data.parquet.is_file() and json.loads(stamp.read_text()) == settings:
        logger.info("reusing the benchmark data in %s", work_dir)
        return data
    from ..convert import run_convert
    from ..data.synthetic import generate_archives

    raw = work_dir / "raw"
    logger.info("generating %d synthetic faces in %s", faces, raw)
    images_archive, _ = generate_archives(raw, synthetic)
    extract_images(images_archive, data.images_dir)
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
    bbox: str,
    padding: float,
    out_size: int,
) -> np.ndarray:
    """(2, 3) affine: output pixel -> ORIGINAL image pixel, for one face, as the reference builds it.

    The face box is the landmarks' box by rule `bbox` (geometry.face_box) padded by `padding`; the
    view is that square moved by `shift` x side, scaled by `scale`, turned by `angle` and mirrored,
    exactly the geometry `augment.view_matrices` applies to a stored crop.
    """
    cx, cy, side = face_box(landmarks_image, (), bbox)
    side *= padding
    step = scale * side / out_size
    cos, sin = math.cos(angle) * step, math.sin(angle) * step
    mirror = -1.0 if flip else 1.0
    linear = np.array([[cos * mirror, -sin], [sin * mirror, cos]])
    centre = np.array([cx, cy]) + np.asarray(shift) * side
    translation = centre - linear.sum(axis=1) * (out_size / 2)
    return np.concatenate([linear, translation[:, None]], axis=1)


class ReferenceStyleDataset(torch.utils.data.Dataset):
    """The reference's per-sample data path: decode the whole original image, crop and warp one face.

    Per item: Pillow decodes the original JPEG (RGB), one bilinear PIL affine warp takes the augmented
    view of the face (its landmark box padded by `padding`, as the conversion pads it) straight to
    `out_size` (pixel i covers [i, i + 1), as in augment.py; outside the image is black), the pixels
    are normalised per channel and the landmarks mapped into the view (and re-labelled by WFLW's flip
    permutation when mirrored), in [0, 1] units of the input.

    Augmentation is drawn per sample with `augment.draw_params` (the same distributions as ours); `views`
    fixes the view of each item instead (tests).
    """

    def __init__(
        self,
        image_paths: Sequence[Path],
        landmarks_image: np.ndarray,
        *,
        augmentation: AugmentParams | None,
        bbox: str,
        padding: float,
        out_size: int,
        seed: int = 0,
        views: augment.ViewParams | None = None,
    ) -> None:
        self.paths = [str(p) for p in image_paths]
        self.bbox, self.padding = bbox, padding
        self.landmarks = np.asarray(landmarks_image, np.float64)
        self.augmentation = augmentation
        self.out_size = out_size
        self.seed = seed
        self.views = views
        self.mean = np.asarray(engine.IMAGENET.mean, np.float32)
        self.inv_std = 1.0 / np.asarray(engine.IMAGENET.std, np.float32)
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
            bbox=self.bbox,
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
    faces: FaceSet, params: Params, precision: Precision, *, batches: int, warmup: int
) -> dict[str, float]:
    """Images/s of our data path: engine.EpochBatches of the in-memory crops, warped on the device."""
    device = faces.images.device
    stream = endless_batches(faces, params, precision)
    for _ in itertools.islice(stream, warmup):
        pass
    synchronize(device)
    timed = time.perf_counter()
    for _ in itertools.islice(stream, batches):
        pass
    synchronize(device)
    return {"images_per_s": batches * params.train.batch_size / (time.perf_counter() - timed)}


def run_loader(
    *,
    params: Params,
    faces: int,
    batches: int,
    warmup: int,
    repeats: int,
    workers: int | None,
    work_dir: Path,
    out_dir: Path,
    command: str | None,
) -> dict[str, Any]:
    """Ours vs the reference-style loader on the same synthetic faces; writes loader.json."""
    device, _ = training_device(params.train)
    batch_size, input_size, seed = params.train.batch_size, params.model.input_size, params.train.seed
    require(faces >= batch_size, f"--faces ({faces}) must be >= train.batch_size ({batch_size})")
    require(batches >= 1 and repeats >= 1 and warmup >= 0, "--batches, --repeats >= 1 and --warmup >= 0")
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    data = prepare_data(work_dir, params, faces)
    faceset = load_faces(data.parquet, device)
    paths, landmarks = data.records()
    # The loader's output is fp32 either way; on CUDA in the memory format training feeds the model.
    precision = Precision(None, device.type == "cuda")
    dataset = ReferenceStyleDataset(
        paths,
        landmarks,
        augmentation=params.augment,
        bbox=params.convert.bbox,
        padding=params.convert.padding,
        out_size=input_size,
        seed=seed,
    )
    ours_runs, baseline_runs, startups = [], [], []
    for repeat in range(repeats):
        ours = time_ours(faceset, params, precision, batches=batches, warmup=warmup)
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
    ours_median, base_median = median(ours_runs), median(baseline_runs)
    image_sizes = [Image.open(p).size for p in paths]
    result = {
        **header("loader", device, command),
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
        "crop_size": faceset.crop_size,
        "context": faceset.context,
        "input_size": input_size,
        "augment": asdict(params.augment),
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
            "worker_startup_s": median(startups),
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
                format_runs(ours_runs),
                result["ratio"],
            ],
            [
                f"baseline ({workers} workers)",
                base_median,
                base_median / batch_size,
                format_runs(baseline_runs),
                1.0,
            ],
        ],
    )
    write_result(
        out_dir, "loader", result, f"\nloader: {len(faceset)} faces, batch {batch_size}, {device}\n{table}"
    )
    return result
