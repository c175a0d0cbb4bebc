"""Stage convert: WFLW archives -> Parquet face crops (the data contract in DESIGN.md).

Landmarks and rectangles become continuous coordinates once, right after parsing
(`continuous_geometry`); `landmarks_image` and `crop_to_image` speak WFLW's annotation convention again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from .core import geometry
from .data import wflw
from .data.contract import FORMAT_VERSION, write_parquet
from .data.preview import write_preview
from .errors import PipelineError
from .fileio import atomic_paths
from .outputs import ConvertOutputs
from .params import ConvertParams
from .progress import progress_bar

logger = logging.getLogger(__name__)


class ConvertError(PipelineError):
    """Input the convert stage cannot turn into Parquet (names the file and line)."""


@dataclass(frozen=True)
class Face:
    """One parsed annotation line and where it came from."""

    split: str
    face_id: int
    annotation: wflw.Annotation
    source: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.split, self.face_id)


class _HashingReader(io.RawIOBase):
    """A read-only file wrapper that computes the SHA-256 of every byte read through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer)
        self.sha256.update(memoryview(buffer)[:n])
        self.bytes_read += n
        return n


class _StreamedArchive:
    """Stream a .tar.gz once, without extracting it, yielding safe file members and hashing it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sha256 = ""

    def members(self, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of each file member for which `wanted(name)`, in archive order."""
        if not self.path.is_file():
            raise ConvertError(f"{self.path}: archive not found (run `wflw fetch` first)")
        with open(self.path, "rb") as raw:
            reader = _HashingReader(raw)
            try:
                with tarfile.open(fileobj=reader, mode="r|gz") as tar:
                    for info in tar:
                        try:
                            wflw.check_member_path(info.name)
                        except ValueError as err:
                            raise ConvertError(f"{self.path}: archive member {err}") from None
                        if info.isfile() and wanted(info.name):
                            yield info.name, tar.extractfile(info).read()  # type: ignore[union-attr]
                while reader.read(1 << 20):
                    pass
            except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
                raise ConvertError(f"{self.path}: truncated or corrupt archive ({err})") from None
        self.sha256 = reader.sha256.hexdigest()


def continuous_geometry(annotation: wflw.Annotation) -> tuple[np.ndarray, np.ndarray]:
    """The face's landmarks (98, 2) and detection rectangle (4,) in continuous image coordinates."""
    return wflw.to_continuous(annotation.landmarks), wflw.to_continuous(annotation.rect)


def crop_matrix(annotation: wflw.Annotation, rule: geometry.CropRule) -> np.ndarray:
    """The face's continuous crop -> image affine by `rule` (what the warp uses)."""
    landmarks, rect = continuous_geometry(annotation)
    return rule.matrix(geometry.face_box(landmarks, rect, rule.bbox))


def stored_crop_to_image(matrix: np.ndarray) -> np.ndarray:
    """The Parquet `crop_to_image`: the continuous crop affine, its output in WFLW's annotation convention."""
    stored = np.array(matrix, np.float64)
    stored[:, 2] = wflw.to_annotation(stored[:, 2])
    return stored


def _check_geometry(
    annotation: wflw.Annotation, params: ConvertParams, width: int, height: int
) -> str | None:
    """Why this face cannot be cropped, or None."""
    landmarks, rect = continuous_geometry(annotation)
    side = geometry.face_box(landmarks, rect, params.bbox)[2]
    if side <= 1.0:
        return f"degenerate face box ({params.bbox}) of side {side:.2f} px"
    margin = params.max_outside * geometry.face_box(landmarks, (), "landmarks")[2]
    outside = (landmarks[:, 0] < -margin) | (landmarks[:, 0] > width + margin)
    outside |= (landmarks[:, 1] < -margin) | (landmarks[:, 1] > height + margin)
    if outside.any():
        i = int(np.argmax(outside))
        pts = annotation.landmarks
        return (
            f"landmark {i} at ({pts[i, 0]:.1f}, {pts[i, 1]:.1f}) lies far outside the "
            f"{width}x{height} image (tolerance convert.max_outside={params.max_outside} x face size)"
        )
    return None


def _decode(data: bytes, min_scale: float) -> tuple[Image.Image, int, int, float]:
    """Decode an image as RGB, letting JPEG's DCT scaling drop resolution no face needs."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    draft = 1
    while draft * 2 <= min(min_scale, 8.0):
        draft *= 2
    if draft > 1 and image.format == "JPEG":
        image.draft("RGB", (-(-width // draft), -(-height // draft)))
    image = image.convert("RGB")
    reduced = next(d for d in (1, 2, 4, 8) if image.size == (-(-width // d), -(-height // d)))
    return image, width, height, float(reduced)


def process_image(data: bytes, faces: list[Face], params: ConvertParams) -> tuple[list[dict], list[tuple]]:
    """Crop every face of one image: (rows, [(face key, error message)])."""
    rule = geometry.CropRule.of(params)
    matrices = [crop_matrix(face.annotation, rule) for face in faces]
    try:
        image, width, height, reduced = _decode(data, min(m[0, 0] for m in matrices))
    except Exception as err:  # Pillow raises many types for bad image bytes
        return [], [(face.key, f"cannot decode image ({type(err).__name__}: {err})") for face in faces]
    rows, errors = [], []
    for face, matrix in zip(faces, matrices, strict=True):
        problem = _check_geometry(face.annotation, params, width, height)
        if problem:
            errors.append((face.key, problem))
            continue
        crop = rule.warp(image, matrix / reduced)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=params.jpeg_quality)
        rows.append(_row(face, width, height, matrix, buffer.getvalue()))
    return rows, errors


def _row(face: Face, width: int, height: int, matrix: np.ndarray, jpeg: bytes) -> dict:
    """One Parquet row; `matrix` is the continuous crop -> image affine the crop was warped with."""
    ann = face.annotation
    scale, origin = matrix[0, 0], matrix[:, 2]
    crop_points = (continuous_geometry(ann)[0] - origin) / scale
    row = {
        "face_id": face.face_id,
        "split": face.split,
        "image_path": ann.image_path,
        "image_width": width,
        "image_height": height,
        "crop_jpeg": jpeg,
        "crop_to_image": stored_crop_to_image(matrix).reshape(-1).astype(np.float32),
        "landmarks": crop_points.reshape(-1).astype(np.float32),
        "landmarks_image": ann.landmarks.reshape(-1).astype(np.float32),
        "rect": np.asarray(ann.rect, dtype=np.int32),
    }
    row.update(zip(wflw.ATTRIBUTES, ann.attributes, strict=True))
    return row


class _Problems:
    """Fail on the first problem, or (on_error: skip) log and count each one."""

    def __init__(self, on_error: str) -> None:
        self.on_error = on_error
        self.messages: list[str] = []

    def report(self, message: str) -> None:
        if self.on_error == "fail":
            raise ConvertError(message)
        logger.warning("skipping: %s", message)
        self.messages.append(message)


def read_annotations(
    archive: _StreamedArchive, problems: _Problems
) -> tuple[dict[str, list[Face]], dict[str, int]]:
    """Parse both splits' annotation files and count the lines of the test subset lists."""
    faces: dict[str, list[Face]] = {}
    list_counts: dict[str, int] = {}
    split_members = {wflw.annotation_member(split): split for split in wflw.SPLITS}
    subset_members = {wflw.test_list_member(a): a for a in wflw.ATTRIBUTES}
    for name, data in archive.members(lambda name: name in split_members or name in subset_members):
        text = _decode_text(archive, name, data)
        if name in subset_members:
            list_counts[subset_members[name]] = sum(1 for line in text.splitlines() if line.strip())
        else:
            split = split_members[name]
            faces[split] = list(_parse_lines(split, f"{archive.path}:{name}", text, problems))
    missing = [wflw.annotation_member(s) for s in wflw.SPLITS if s not in faces]
    if missing:
        raise ConvertError(f"{archive.path}: annotation archive lacks {', '.join(missing)}")
    return faces, list_counts


def _decode_text(archive: _StreamedArchive, name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConvertError(f"{archive.path}:{name}: not UTF-8 text ({err})") from None


def _parse_lines(split: str, source: str, text: str, problems: _Problems) -> Iterator[Face]:
    for face_id, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        where = f"{source}:{face_id + 1}"
        try:
            yield Face(split, face_id, wflw.parse_line(line), where)
        except wflw.AnnotationError as err:
            problems.report(f"{where}: {err}")


def crop_all(
    archive: _StreamedArchive,
    faces: list[Face],
    params: ConvertParams,
    workers: int,
    problems: _Problems,
) -> list[dict]:
    """Stream the image archive and crop every face on all cores; returns the Parquet rows."""
    by_image: dict[str, list[Face]] = {}
    for face in faces:
        by_image.setdefault(face.annotation.image_path, []).append(face)
    by_key = {face.key: face for face in faces}
    rows: list[dict] = []
    pending: deque[Future] = deque()
    prefix = f"{wflw.IMAGES_ROOT}/"

    def collect(future: Future) -> None:
        done, errors = future.result()
        rows.extend(done)
        for key, message in errors:
            face = by_key[key]
            problems.report(f"{archive.path}:{prefix}{face.annotation.image_path} ({face.source}): {message}")
        progress.update(1)

    with (
        ProcessPoolExecutor(max_workers=workers) as pool,
        progress_bar(total=len(by_image), desc="convert", unit="image") as progress,
        _cancel_on_error(pool),
    ):
        wanted = lambda name: name.startswith(prefix) and name[len(prefix) :] in by_image  # noqa: E731
        for name, data in archive.members(wanted):
            image_faces = by_image.pop(name[len(prefix) :])
            pending.append(pool.submit(process_image, data, image_faces, params))
            while len(pending) > 4 * workers:
                collect(pending.popleft())
        while pending:
            collect(pending.popleft())
    for path, image_faces in by_image.items():
        for face in image_faces:
            problems.report(f"{face.source}: image {path!r} is missing from {archive.path}")
    return rows


@contextmanager
def _cancel_on_error(pool: ProcessPoolExecutor) -> Iterator[None]:
    """Drop queued work at once when the stage fails, instead of finishing it."""
    try:
        yield
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise


def split_validation(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split train rows into (train, val), stratified by the six flags where possible."""
    from sklearn.model_selection import train_test_split

    n_val = round(fraction * len(rows))
    if fraction <= 0 or n_val < 1 or len(rows) - n_val < 1:
        if fraction > 0:
            logger.warning("val_fraction %s of %d faces leaves no val split", fraction, len(rows))
        return rows, []
    labels = ["".join("1" if row[a] else "0" for a in wflw.ATTRIBUTES) for row in rows]
    counts = Counter(labels)
    labels = [label if counts[label] >= 2 else "rare" for label in labels]
    strata = Counter(labels)
    index = np.arange(len(rows))
    try:
        if len(strata) < 2 or min(strata.values()) < 2:
            raise ValueError(f"{len(rows)} faces in {len(counts)} flag combinations are too few")
        train_idx, val_idx = train_test_split(index, test_size=n_val, random_state=seed, stratify=labels)
    except ValueError as err:
        logger.warning("val split cannot be stratified by the flags (%s); splitting at random", err)
        train_idx, val_idx = train_test_split(index, test_size=n_val, random_state=seed)
    return [rows[i] for i in sorted(train_idx)], [rows[i] for i in sorted(val_idx)]


def _flag_counts(rows: list[dict]) -> dict[str, int]:
    return {a: sum(bool(row[a]) for row in rows) for a in wflw.ATTRIBUTES}


def _summary(splits: dict[str, list[dict]], list_counts: dict[str, int], problems: _Problems) -> dict:
    subsets = {split: _flag_counts(rows) for split, rows in splits.items()}
    return {
        "faces": {split: len(rows) for split, rows in splits.items()},
        "subsets": subsets,
        "test_list_counts": list_counts,
        "skipped": {"count": len(problems.messages), "reasons": problems.messages[:100]},
    }


def _check_test_lists(test_rows: list[dict], list_counts: dict[str, int], problems: _Problems) -> None:
    """The list_98pt_test_<subset> files must count the same faces as the test flags."""
    if problems.messages:
        return
    flagged = _flag_counts(test_rows)
    for attribute, listed in list_counts.items():
        if flagged[attribute] != listed:
            problems.report(
                f"{wflw.test_list_member(attribute)} lists {listed} faces but "
                f"{flagged[attribute]} test faces have the {attribute} flag"
            )


def run_convert(params: ConvertParams, raw_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Convert `raw_dir`'s archives into `out_dir`/{train,val,test}.parquet and summary.json.

    val.parquet is always written (with no rows when `val_fraction` is 0) so its path is stable.
    """
    workers = params.workers or os.cpu_count() or 1
    problems = _Problems(params.on_error)
    annotations = _StreamedArchive(raw_dir / wflw.ANNOTATIONS_ARCHIVE)
    images = _StreamedArchive(raw_dir / wflw.IMAGES_ARCHIVE)
    faces, list_counts = read_annotations(annotations, problems)
    logger.info("parsed %s", ", ".join(f"{len(v)} {k} faces" for k, v in faces.items()))
    rows = crop_all(images, [f for split in wflw.SPLITS for f in faces[split]], params, workers, problems)
    splits = {split: [row for row in rows if row["split"] == split] for split in wflw.SPLITS}
    _check_test_lists(splits["test"], list_counts, problems)
    splits["train"], splits["val"] = split_validation(splits["train"], params.val_fraction, params.seed)
    for row in splits["val"]:
        row["split"] = "val"
    empty = [split for split in wflw.SPLITS if not splits[split]]
    if empty:
        raise ConvertError(f"no {' or '.join(empty)} faces left to write (see the messages above)")
    metadata = {
        "format_version": FORMAT_VERSION,
        "source": _source(raw_dir),
        "archives": {annotations.path.name: annotations.sha256, images.path.name: images.sha256},
        "crop": {**asdict(geometry.CropRule.of(params)), "jpeg_quality": params.jpeg_quality},
    }
    summary = {"source": metadata["source"], **_summary(splits, list_counts, problems)}
    _write_outputs(out_dir, splits, metadata, summary)
    outputs = ConvertOutputs(out_dir)
    write_preview(outputs.split("test"), outputs.preview)
    return summary


def _source(raw_dir: Path) -> str:
    """The fetch stage's `source` from its manifest, or 'unknown'."""
    try:
        return json.loads((raw_dir / "manifest.json").read_text())["source"]
    except (OSError, ValueError, KeyError):
        return "unknown"


def _write_outputs(out_dir: Path, splits: dict[str, list[dict]], metadata: dict, summary: dict) -> None:
    """Write every output to a temp file first, then rename them all: no partial output survives."""
    targets = {out_dir / f"{split}.parquet": rows for split, rows in splits.items()}
    with atomic_paths([*targets, out_dir / "summary.json"]) as temps:
        for target, rows in targets.items():
            write_parquet(rows, temps[target], metadata)
        temps[out_dir / "summary.json"].write_text(json.dumps(summary, indent=2) + "\n")
