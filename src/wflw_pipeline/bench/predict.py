"""`wflw bench predict`: faces per second end to end on a user's photos (decode, detect, crop, model),
PyTorch against onnxruntime on the same images, in turns.

The photos are the one real portrait that ships inside a dependency (matplotlib's sample
`grace_hopper.jpg`, 512 x 600), saved as JPEGs at several sizes like phone photos shrunk for the web.
Both backends run `predict.predict_images` with the detector of `wflw predict` and params predict.*,
writing nothing; only the model differs. The ONNX file is exported from the checkpoint and checked
against it first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import torch
from PIL import Image

from ..params import PredictParams
from ..serving.export import OnnxPredictor, export_checked
from ..serving.inference import LandmarkPredictor
from ..serving.predict import Detector, Predictor, Source, Summary, predict_images
from ..tables import format_table
from .common import format_runs, header, median, require, write_result

SIDES = (480, 640, 800, 1024, 1280, 1600)
"""Long sides of the test photos, in turns."""
STEPS = ("decode", "detect", "crop+model")


def photo() -> Image.Image:
    """matplotlib's sample portrait (in its wheel: nothing is downloaded)."""
    return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")


def write_photos(folder: Path, count: int) -> list[Source]:
    """`count` JPEGs of the portrait at the SIDES in turns, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    image, sources = photo(), []
    for i in range(count):
        side = SIDES[i % len(SIDES)]
        scale = side / max(image.size)
        path = folder / f"photo_{i:03d}_{side}.jpg"
        image.resize((round(image.width * scale), round(image.height * scale))).save(path, quality=90)
        sources.append(Source(path, path.name))
    return sources


def run_predict(
    *,
    checkpoint: Path,
    config: PredictParams,
    images: int,
    repeats: int,
    work_dir: Path,
    out_dir: Path,
    command: str | None,
) -> dict[str, Any]:
    """Time `repeats` passes over `images` photos with each backend in turns: faces/s, seconds per step."""
    require(images >= 1 and repeats >= 1, "bench predict: --images and --repeats must be >= 1")
    require(
        config.device in ("auto", "cpu"),
        "bench predict: onnxruntime runs on the CPU here: predict.device=cpu",
    )
    device = torch.device("cpu")
    sources = write_photos(work_dir / "photos", images)
    torch_model = LandmarkPredictor.load(checkpoint, device)
    onnx_path = work_dir / "model.onnx"
    max_diff = export_checked(checkpoint, onnx_path)
    backends: dict[str, Predictor] = {
        "pytorch": torch_model,
        "onnxruntime": OnnxPredictor(onnx_path, torch_model.crop_size),
    }
    rule = torch_model.trained.crop
    detector = Detector(config.upsample, config.detect_max_side, config.min_score)
    predict_images(sources[:2], torch_model, rule, detector, config, None, "warm-up")
    runs: dict[str, list[Summary]] = {name: [] for name in backends}
    for _ in range(repeats):
        for name, predictor in backends.items():
            runs[name].append(predict_images(sources, predictor, rule, detector, config, None, name))
    rows = [_row(name, summaries) for name, summaries in runs.items()]
    base = rows[0]["faces_per_s"]
    for row in rows:
        row["ratio"] = row["faces_per_s"] / base
    result = {
        **header("predict", device, command),
        "checkpoint": str(checkpoint),
        "images": images,
        "sides": list(SIDES),
        "repeats": repeats,
        "predict": config.__dict__,
        "onnx_max_abs_diff_px": max_diff,
        "rows": rows,
    }
    table = format_table(
        ["backend", "faces/s (median)", "runs", "ratio", *(f"{step} ms/face" for step in STEPS)],
        [
            [r["backend"], r["faces_per_s"], format_runs(r["runs"]), f"{r['ratio']:.2f}",
             *(r["ms_per_face"][step] for step in STEPS)]
            for r in rows
        ],
    )  # fmt: skip
    write_result(out_dir, "predict", result, table)
    return result


def _row(name: str, summaries: list[Summary]) -> dict[str, Any]:
    """One backend's figures: faces/s of each pass and their median, median ms per face of each step."""
    faces = summaries[0].faces
    require(faces > 0, "bench predict: the detector found no face in the photos")
    rates = [s.faces / sum(s.seconds.values()) for s in summaries]
    return {
        "backend": name,
        "faces": faces,
        "failures": len(summaries[0].failures),
        "faces_per_s": median(rates),
        "runs": rates,
        "ms_per_face": {step: median([1e3 * s.seconds[step] / faces for s in summaries]) for step in STEPS},
    }
