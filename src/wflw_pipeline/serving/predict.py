"""Landmarks on a user's own photos: read, find the faces, crop them by the model's CropRule, predict, draw.

A face's first box is the detector's (or --bbox); a model trained on boxes around the landmarks then
gets `predict.refine` more passes, each cropping around the points the pass before predicted. The
detector is dlib's HOG frontal-face detector (the `detect` extra): nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from .. import fileio
from ..core.geometry import LANDMARK_RULES, CropRule, crop_to_image, face_box, square_box
from ..core.runtime import resolve_device
from ..data import wflw
from ..errors import EXIT_REFUSED, PipelineError
from ..params import Params, PredictParams
from ..progress import progress_bar
from .inference import LandmarkPredictor
from .model_uri import model_file

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
"""What a folder is searched for (case-insensitive); files named explicitly are tried whatever they are."""
COORDINATES = "image pixels of the upright image, pixel centres at integers (WFLW's convention)"
PARTS: dict[str, tuple[tuple[int, ...], bool, str]] = {
    "contour": (tuple(range(0, 33)), False, "#ffd400"),
    "left_brow": (tuple(range(33, 42)), True, "#ff7f0e"),
    "right_brow": (tuple(range(42, 51)), True, "#ff7f0e"),
    "nose_bridge": (tuple(range(51, 55)), False, "#2ca02c"),
    "nose_base": (tuple(range(55, 60)), False, "#2ca02c"),
    "left_eye": (tuple(range(60, 68)), True, "#17becf"),
    "right_eye": (tuple(range(68, 76)), True, "#17becf"),
    "outer_lip": (tuple(range(76, 88)), True, "#e377c2"),
    "inner_lip": (tuple(range(88, 96)), True, "#d62728"),
}
"""WFLW's parts drawn as lines: (point indices, closed, colour); the pupils 96 and 97 are dots."""


class PredictError(PipelineError):
    """A predict run that cannot start (bad --bbox, no detector), or one where some images failed."""


class PredictFailed(PredictError):
    """Some images failed or showed no face; each was reported."""

    exit_code = EXIT_REFUSED


class ImageProblem(Exception):
    """One image that cannot be used (unreadable, truncated, too large): the message is one line."""


class Predictor(Protocol):
    """What maps crops to landmarks: inference.LandmarkPredictor, or an onnxruntime session's wrapper."""

    crop_size: int

    def predict(self, crops: Any, batch_size: int = ...) -> np.ndarray: ...


@dataclass(frozen=True)
class Face:
    """A face box x1 y1 x2 y2 in continuous image pixels and the detector's score (None for --bbox)."""

    box: tuple[float, float, float, float]
    score: float | None


@dataclass
class Source:
    """One image to predict and where its outputs go (`name`.json, `name`.overlay.png under --out)."""

    path: Path
    name: str


@dataclass
class Summary:
    """What a run did: images given, faces found, failures (path, one-line reason), seconds per step."""

    images: int = 0
    faces: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start


# Inputs --------------------------------------------------------------------------------------------------


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """`x1,y1,x2,y2` (image pixels, WFLW's convention) -> continuous box; PredictError when malformed."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or not np.isfinite(values).all() or values[2] <= values[0] or values[3] <= values[1]:
        raise PredictError(f"--bbox {text!r}: expected x1,y1,x2,y2 with x2 > x1 and y2 > y1")
    x1, y1, x2, y2 = wflw.to_continuous(np.array(values))
    return float(x1), float(y1), float(x2), float(y2)


def find_images(paths: Sequence[Path]) -> list[Source]:
    """The files given and the images (IMAGE_SUFFIXES) in the folders given, recursively, sorted; output
    names are relative to the folder given, made unique with -2, -3..."""
    sources: list[Source] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            sources += [Source(p, str(p.relative_to(path))) for p in found]
        else:
            sources.append(Source(path, path.name))
    taken: dict[str, int] = {}
    for source in sources:
        count = taken[source.name] = taken.get(source.name, 0) + 1
        if count > 1:
            source.name = f"{source.name}-{count}"
    return sources


def read_image(path: Path) -> Image.Image:
    """The image as 8-bit RGB, upright (EXIF orientation applied); ImageProblem with a one-line reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # big photos are fine
            with Image.open(path) as opened:
                image = ImageOps.exif_transpose(opened)
                image.load()
    except FileNotFoundError:
        raise ImageProblem("file not found") from None
    except IsADirectoryError:
        raise ImageProblem("is a folder") from None
    except UnidentifiedImageError:
        raise ImageProblem("not an image Pillow can read (JPEG, PNG, WebP, ...)") from None
    except Image.DecompressionBombError as err:
        raise ImageProblem(f"too large to decode safely ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageProblem(f"truncated or corrupt image ({type(err).__name__}: {err})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit and 32-bit grey scaled down (not clipped), transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(image, np.float64) / 257.0
        return Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.round(np.asarray(image)), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# Faces ---------------------------------------------------------------------------------------------------


class Detector:
    """dlib's HOG frontal-face detector on the image shrunk to `max_side`, `upsample` times doubled."""

    def __init__(self, upsample: int, max_side: int, min_score: float) -> None:
        if importlib.util.find_spec("dlib") is None:
            raise PredictError(
                "no face detector: dlib is not installed (pip install 'wflw_pipeline[detect]'), "
                "or pass the face box with --bbox x1,y1,x2,y2"
            )
        import dlib

        self.hog = dlib.get_frontal_face_detector()
        self.upsample = upsample
        self.max_side = max_side
        self.min_score = min_score

    def __call__(self, image: Image.Image) -> list[Face]:
        """The faces found, best score first, boxes in continuous pixels of `image`."""
        scale = min(1.0, self.max_side / max(image.size))
        small = image
        if scale < 1.0:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            small = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
            scale = small.width / image.width
        rects, scores, _ = self.hog.run(np.asarray(small), self.upsample, self.min_score)
        faces = [
            Face((r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale), s)
            for r, s in zip(rects, scores, strict=True)
        ]
        return sorted(faces, key=lambda face: -float(face.score or 0.0))


def landmarks(
    images: Sequence[Image.Image],
    boxes: Sequence[Sequence[Face]],
    predictor: Predictor,
    rule: CropRule,
    *,
    refine: int,
    batch_size: int,
) -> list[np.ndarray]:
    """Each image's faces' landmarks (F, 98, 2) in continuous image pixels, all faces in batches."""
    owners = [i for i, faces in enumerate(boxes) for _ in faces]
    matrices = [rule.matrix(square_box(f.box[:2], f.box[2:])) for faces in boxes for f in faces]
    passes = 1 + (refine if rule.bbox in LANDMARK_RULES else 0)
    points = np.zeros((0, wflw.NUM_POINTS, 2))
    for step in range(passes if matrices else 0):
        if step:
            matrices = [rule.matrix(face_box(p, (), rule.bbox)) for p in points]
        crops = np.stack([np.asarray(rule.warp(images[i], m)) for i, m in zip(owners, matrices, strict=True)])
        crop_points = predictor.predict(crops, batch_size=batch_size)
        points = crop_to_image(crop_points, np.stack(matrices))
    return [points[[j for j, owner in enumerate(owners) if owner == i]] for i in range(len(images))]


# Outputs -------------------------------------------------------------------------------------------------


def result_json(
    source: Source, image: Image.Image, faces: Sequence[Face], points: np.ndarray, model: str
) -> dict:
    """The JSON of one image: its size, the model, each face's box, score and 98 points."""
    return {
        "image": str(source.path),
        "width": image.width,
        "height": image.height,
        "model": model,
        "coordinates": COORDINATES,
        "faces": [
            {
                "box": [round(float(v), 2) for v in wflw.to_annotation(np.array(face.box))],
                "score": None if face.score is None else round(float(face.score), 4),
                "landmarks": np.round(wflw.to_annotation(face_points), 2).tolist(),
            }
            for face, face_points in zip(faces, points, strict=True)
        ],
    }


def overlay(image: Image.Image, faces: Sequence[Face], points: np.ndarray, max_side: int) -> Image.Image:
    """The image (shrunk to `max_side`) with each face's box, points and parts drawn as lines."""
    scale = min(1.0, max_side / max(image.size))
    canvas = image.copy()
    if scale < 1.0:
        canvas = canvas.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        scale = canvas.width / image.width
    draw = ImageDraw.Draw(canvas)
    for face, face_points in zip(faces, points, strict=True):
        xy = face_points * scale
        size = float(np.ptp(xy, axis=0).max())
        width, radius = max(1, round(size / 80)), max(1.0, size / 100)
        draw.rectangle([v * scale for v in face.box], outline="#ffffff", width=width)
        for indices, closed, colour in PARTS.values():
            line = [tuple(p) for p in xy[list(indices) + ([indices[0]] if closed else [])]]
            draw.line(line, fill=colour, width=width, joint="curve")
        for x, y in xy:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill="#ff0000")
    return canvas


def write_outputs(
    out_dir: Path,
    source: Source,
    image: Image.Image,
    faces: Sequence[Face],
    points: np.ndarray,
    model: str,
    overlay_max_side: int,
) -> None:
    """`name`.json and `name`.overlay.png under `out_dir`, each written atomically."""
    fileio.write_json(out_dir / f"{source.name}.json", result_json(source, image, faces, points, model))
    with fileio.atomic_path(out_dir / f"{source.name}.overlay.png") as temp:
        overlay(image, faces, points, overlay_max_side).save(temp, format="PNG")


# The run -------------------------------------------------------------------------------------------------

GROUP_PIXELS = 64_000_000
"""Images held decoded at once, at most (about 200 MB), whatever the batch size."""


@dataclass
class Pending:
    """Images read and searched for faces, waiting for their model batch."""

    sources: list[Source] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    faces: list[list[Face]] = field(default_factory=list)

    def full(self, batch_size: int) -> bool:
        pixels = sum(image.width * image.height for image in self.images)
        return sum(map(len, self.faces)) >= batch_size or pixels >= GROUP_PIXELS


def predict_images(
    sources: Sequence[Source],
    predictor: Predictor,
    rule: CropRule,
    find_faces: Callable[[Image.Image], list[Face]],
    config: PredictParams,
    out_dir: Path | None,
    model: str,
) -> Summary:
    """Predict every image, `config.batch_size` faces per model batch; write the outputs unless `out_dir`
    is None (benchmarks). A failed image is reported in one line and the rest go on."""
    summary = Summary(images=len(sources))
    pending = Pending()
    with progress_bar(total=len(sources), unit="image", desc="predict") as bar:
        for source in sources:
            with summary.timed("decode"):
                try:
                    image = read_image(source.path)
                except ImageProblem as problem:
                    _fail(summary, source, str(problem))
                    bar.update()
                    continue
            with summary.timed("detect"):
                pending.faces.append(find_faces(image))
            pending.sources.append(source)
            pending.images.append(image)
            if pending.full(config.batch_size):
                _finish(pending, predictor, rule, config, out_dir, model, summary)
                bar.update(len(pending.sources))
                pending = Pending()
        _finish(pending, predictor, rule, config, out_dir, model, summary)
        bar.update(len(pending.sources))
    return summary


def _finish(
    pending: Pending,
    predictor: Predictor,
    rule: CropRule,
    config: PredictParams,
    out_dir: Path | None,
    model: str,
    summary: Summary,
) -> None:
    """Predict the pending images' faces in one go, write their outputs, report those without a face."""
    with summary.timed("crop+model"):
        found = landmarks(
            pending.images, pending.faces, predictor, rule, refine=config.refine, batch_size=config.batch_size
        )
    for source, image, faces, points in zip(
        pending.sources, pending.images, pending.faces, found, strict=True
    ):
        if out_dir is not None:
            with summary.timed("write"):
                write_outputs(out_dir, source, image, faces, points, model, config.overlay_max_side)
        summary.faces += len(faces)
        if not faces:
            _fail(summary, source, "no face found (pass --bbox x1,y1,x2,y2, or lower predict.min_score)")


def _fail(summary: Summary, source: Source, reason: str) -> None:
    summary.failures.append((str(source.path), reason))
    logger.warning("%s: %s", source.path, reason)


def check(summary: Summary) -> None:
    """PredictFailed (exit code 1) naming how many images failed, when any did."""
    if summary.failures:
        raise PredictFailed(
            f"{len(summary.failures)} of {summary.images} images failed or showed no face (each one reported)"
        )


SYNTHETIC_ONLY = (
    "%s was trained on synthetic faces only (data.source: synthetic): on real photos it does about as well "
    'as always predicting the mean face shape; train on real WFLW for real photos (README, "Real WFLW")'
)
"""Warned once by `wflw predict` when the model learnt from synthetic faces (README, `wflw predict`)."""


def run_predict(
    params: Params, model: str | None, paths: Sequence[Path], bbox: str | None, out: Path
) -> Summary:
    """`wflw predict`: every image of `paths` through the model of --model (default the champion), faces
    from the detector or the one --bbox; PredictFailed when any image failed."""
    config = params.predict
    if out.exists() and not out.is_dir():
        raise PredictError(f"--out {out}: is a file; name a folder (it is created if missing)")
    box = parse_bbox(bbox) if bbox else None
    sources = find_images(paths)
    with tempfile.TemporaryDirectory(prefix="wflw-model-") as folder:
        model_path, name = model_file(params, model, Path(folder))
        predictor = LandmarkPredictor.load(model_path, resolve_device(config.device, key="predict.device"))
    if predictor.trained.data.get("source") == "synthetic":
        logger.warning(SYNTHETIC_ONLY, name)
    find_faces = _given(box) if box else Detector(config.upsample, config.detect_max_side, config.min_score)
    rule = predictor.trained.crop
    summary = predict_images(sources, predictor, rule, find_faces, config, out, name)
    steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in summary.seconds.items())
    logger.info("%d images, %d faces -> %s (%s)", summary.images, summary.faces, out, steps)
    check(summary)
    return summary


def _given(box: tuple[float, float, float, float]) -> Callable[[Image.Image], list[Face]]:
    """The finder of --bbox: the same one face in every image."""
    return lambda image: [Face(box, None)]
