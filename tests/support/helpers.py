"""Small hand-made WFLW-format datasets for tests of convert and the CLI; the repository's params."""

from __future__ import annotations

import io
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from paths import PARAMS_YAML
from PIL import Image

from wflw_pipeline import convert, train
from wflw_pipeline.core.geometry import View
from wflw_pipeline.core.model import load_trained
from wflw_pipeline.core.runtime import resolve_precision
from wflw_pipeline.data import synthetic, wflw
from wflw_pipeline.data.dataset import load_faces
from wflw_pipeline.evaluate import predict_split
from wflw_pipeline.outputs import TrainOutputs
from wflw_pipeline.params import Params, load_params

"""The repository's params.yaml: the one source of default params (the dataclasses have none)."""


def default_params() -> Params:
    """The repository's params.yaml, loaded; build variants with `dataclasses.replace`."""
    return load_params(PARAMS_YAML)


def ring_landmarks(cx: float, cy: float, radius: float) -> np.ndarray:
    """98 points on an ellipse-ish ring; 60 and 72 (the eye corners) apart horizontally."""
    angles = np.linspace(0, 2 * np.pi, 98, endpoint=False)
    points = np.stack([cx + radius * np.cos(angles), cy + 0.8 * radius * np.sin(angles)], axis=1)
    points[wflw.LEFT_EYE_OUTER] = (cx - 0.5 * radius, cy - 0.2 * radius)
    points[wflw.RIGHT_EYE_OUTER] = (cx + 0.5 * radius, cy - 0.2 * radius)
    return np.round(points, 3)


def jpeg(width: int, height: int, squares: list[tuple[float, float]] = (), side: int = 6) -> bytes:
    """A dark JPEG with white squares centred on the given points in WFLW's convention (pixel centres at
    integers: a square's continuous centre is its point + 0.5; exact for an odd `side` and integer points)."""
    pixels = np.full((height, width, 3), 40, np.uint8)
    for x, y in squares:
        x0, y0 = math.floor(x + 1 - side / 2), math.floor(y + 1 - side / 2)
        pixels[max(y0, 0) : y0 + side, max(x0, 0) : x0 + side] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def face_line(landmarks: np.ndarray, path: str, flags: tuple[int, ...] = (0,) * 6) -> str:
    lo, hi = landmarks.min(axis=0), landmarks.max(axis=0)
    rect = (int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1]))
    return wflw.format_line(wflw.Annotation(landmarks, rect, tuple(map(bool, flags)), path))


def write_raw(raw_dir: Path, lines: dict[str, list[str]], images: dict[str, bytes]) -> tuple[Path, Path]:
    """Write both archives of a hand-made dataset into raw_dir."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    images_path = raw_dir / wflw.IMAGES_ARCHIVE
    annotations_path = raw_dir / wflw.ANNOTATIONS_ARCHIVE
    synthetic.write_images_archive(images_path, sorted(images.items()))
    synthetic.write_annotations_archive(annotations_path, lines)
    return images_path, annotations_path


def small_dataset(raw_dir: Path, train: int = 4, test: int = 3) -> dict[str, list[str]]:
    """`train` + `test` faces, two per image where possible, with varied flags; returns the lines."""
    lines: dict[str, list[str]] = {"train": [], "test": []}
    squares: dict[str, list[tuple[float, float]]] = {}
    for split, count in (("train", train), ("test", test)):
        for i in range(count):
            path = f"0--Parade/{split}_{i // 2}.jpg"
            centre = (120.0 + 260 * (i % 2), 160.0)
            points = ring_landmarks(*centre, radius=60 + 5 * i)
            flags = tuple(int(j == i % 6) for j in range(6))
            lines[split].append(face_line(points, path, flags))
            squares.setdefault(path, []).extend(tuple(p) for p in points[::7])
    write_raw(raw_dir, lines, {path: jpeg(520, 320, marks) for path, marks in squares.items()})
    return lines


def tiny_parquet(root: Path, test: int) -> Path:
    """root/parquet: 8 train, 2 val and `test` hand-made faces in crops of 48 px."""
    small_dataset(root / "raw", train=10, test=test)
    config = replace(default_params().convert, crop_size=48, val_fraction=0.2, workers=1)
    convert.run_convert(config, root / "raw", root / "parquet")
    return root / "parquet"


def tiny_trained(root: Path) -> tuple[Path, Path]:
    """(parquet dir, model.pt) of a resnet18 trained 1 epoch at input 32 on 10 + 8 hand-made faces."""
    parquet = tiny_parquet(root, test=8)
    base = default_params()
    params = replace(
        base,
        model=replace(base.model, arch="resnet18", pretrained="none", input_size=32),
        train=replace(base.train, epochs=1, batch_size=4, warmup_iters=1, device="cpu", threads=1),
    )
    outputs = TrainOutputs(root / "model", root / "train")
    train.run_train(params, parquet, outputs)
    return parquet, outputs.model


def decoded_crops(split: Path) -> np.ndarray:
    """The split's `crop_jpeg` decoded as dataset.py does: uint8 (N, S, S, 3)."""
    jpegs = pq.read_table(split, columns=["crop_jpeg"]).column("crop_jpeg").to_pylist()
    return np.stack([np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")) for jpeg in jpegs])


def evaluate_predictions(split: Path, model_path: Path) -> np.ndarray:
    """`evaluate.predict_split`'s crop-pixel predictions, flip test off, fp32 on the CPU (as run_evaluate)."""
    params = replace(default_params().evaluate, flip_test=False, device="cpu", precision="fp32")
    trained = load_trained(model_path, "cpu")
    precision = resolve_precision(params.precision, trained.channels_last, torch.device("cpu"))
    faces = load_faces(split)
    view = View(faces.crop_size, faces.context, trained.view.input_size)
    result = predict_split(
        trained, faces, split, view=view, params=params, precision=precision, progress=False
    )
    return result.pred_crop


def with_normalize(model_path: Path, out: Path, mean: list[float], std: list[float]) -> Path:
    """A copy of `model_path` whose model.pt says to normalise with `mean` and `std`."""
    state = torch.load(model_path, weights_only=True)
    state["normalize"] = {"mean": mean, "std": std}
    torch.save(state, out)
    return out
