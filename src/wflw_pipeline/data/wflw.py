"""The facts of WFLW as code: point layout, flip, attributes, line format, archive layout, and the
conversion between its annotation pixel convention and the pipeline's continuous one (README,
"Coordinates")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

NUM_POINTS = 98
NUM_TOKENS = NUM_POINTS * 2 + 4 + 6 + 1

FLIP: tuple[int, ...] = (
    32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12,
    11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 46, 45, 44, 43, 42, 50, 49, 48, 47, 37, 36,
    35, 34, 33, 41, 40, 39, 38, 51, 52, 53, 54, 59, 58, 57, 56, 55, 72, 71, 70, 69, 68,
    75, 74, 73, 64, 63, 62, 61, 60, 67, 66, 65, 82, 81, 80, 79, 78, 77, 76, 87, 86, 85,
    84, 83, 92, 91, 90, 89, 88, 95, 94, 93, 97, 96,
)  # fmt: skip

LEFT_EYE_OUTER = 60
RIGHT_EYE_OUTER = 72
CHIN = 16

POINT_GROUPS: dict[str, tuple[int, ...]] = {
    "contour": tuple(range(0, 33)),
    "left_brow": tuple(range(33, 42)),
    "right_brow": tuple(range(42, 51)),
    "nose_bridge": tuple(range(51, 55)),
    "nose_base": tuple(range(55, 60)),
    "left_eye": tuple(range(60, 68)),
    "right_eye": tuple(range(68, 76)),
    "outer_lip": tuple(range(76, 88)),
    "inner_lip": tuple(range(88, 96)),
    "left_pupil": (96,),
    "right_pupil": (97,),
}

ATTRIBUTES: tuple[str, ...] = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")
"""The six flags, in the order they stand in an annotation line (and Parquet column names)."""
SUBSETS: tuple[str, ...] = ("test", *ATTRIBUTES)
"""The test set and its six attribute subsets, which evaluate scores, in this order."""

SUBSET_FILE_NAMES: dict[str, str] = {
    "pose": "largepose",
    "expression": "expression",
    "illumination": "illumination",
    "makeup": "makeup",
    "occlusion": "occlusion",
    "blur": "blur",
}
"""Attribute -> the suffix of its `list_98pt_test_<suffix>.txt` file."""

SPLITS: tuple[str, ...] = ("train", "test")

IMAGES_ARCHIVE = "WFLW_images.tar.gz"
ANNOTATIONS_ARCHIVE = "WFLW_annotations.tar.gz"
IMAGES_ROOT = "WFLW_images"
ANNOTATIONS_ROOT = "WFLW_annotations"
RECT_ATTR_DIR = f"{ANNOTATIONS_ROOT}/list_98pt_rect_attr_train_test"
TEST_LIST_DIR = f"{ANNOTATIONS_ROOT}/list_98pt_test"


def annotation_member(split: str) -> str:
    """Archive member holding the 207-token lines of one split."""
    return f"{RECT_ATTR_DIR}/list_98pt_rect_attr_{split}.txt"


def test_list_member(attribute: str | None = None) -> str:
    """Archive member `list_98pt_test.txt`, or the subset list of one attribute."""
    suffix = "" if attribute is None else f"_{SUBSET_FILE_NAMES[attribute]}"
    return f"{TEST_LIST_DIR}/list_98pt_test{suffix}.txt"


ANNOTATION_OFFSET = 0.5
"""Continuous coordinate = annotated coordinate + this (WFLW puts pixel centres at integers)."""


def to_continuous(coords: np.ndarray) -> np.ndarray:
    """Annotated image coordinates (pixel centres at integers) -> continuous ones (pixel i covers [i, i + 1)).

    Works on any array of x/y coordinates: points (..., 2) or a rectangle x_min y_min x_max y_max.
    """
    return np.asarray(coords, np.float64) + ANNOTATION_OFFSET


def to_annotation(coords: np.ndarray) -> np.ndarray:
    """Continuous image coordinates -> WFLW's annotation convention (pixel centres at integers)."""
    return np.asarray(coords, np.float64) - ANNOTATION_OFFSET


class AnnotationError(ValueError):
    """An annotation line that does not follow WFLW's format."""


@dataclass(frozen=True)
class Annotation:
    """One face as annotated: 98 landmarks and the detection rectangle in image pixels in WFLW's
    convention (pixel centres at integers, see `to_continuous`), six flags, image path."""

    landmarks: np.ndarray
    rect: tuple[int, int, int, int]
    attributes: tuple[bool, ...]
    image_path: str

    def flag(self, attribute: str) -> bool:
        return self.attributes[ATTRIBUTES.index(attribute)]


def check_member_path(path: str) -> str:
    """Return `path` if it is a safe relative POSIX path, else raise ValueError."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path or ":" in pure.parts[0]:
        raise ValueError(f"unsafe path {path!r}: must be relative, without '..'")
    return path


def _float(token: str, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise AnnotationError(f"{what} is not a number: {token!r}") from None
    if not math.isfinite(value):
        raise AnnotationError(f"{what} is not finite: {token!r}")
    return value


def _int(token: str, what: str) -> int:
    value = _float(token, what)
    if value != int(value):
        raise AnnotationError(f"{what} is not an integer: {token!r}")
    return int(value)


def parse_line(line: str) -> Annotation:
    """Parse one line of `list_98pt_rect_attr_*.txt` strictly (207 tokens)."""
    tokens = line.split()
    if len(tokens) != NUM_TOKENS:
        raise AnnotationError(f"expected {NUM_TOKENS} tokens, found {len(tokens)}")
    coords = [_float(t, f"coordinate {i}") for i, t in enumerate(tokens[: 2 * NUM_POINTS])]
    rect_tokens = tokens[2 * NUM_POINTS : 2 * NUM_POINTS + 4]
    rect = tuple(_int(t, f"rect value {i}") for i, t in enumerate(rect_tokens))
    flags = []
    for name, token in zip(ATTRIBUTES, tokens[2 * NUM_POINTS + 4 : -1], strict=True):
        if token not in ("0", "1"):
            raise AnnotationError(f"flag {name} must be 0 or 1, found {token!r}")
        flags.append(token == "1")
    try:
        image_path = check_member_path(tokens[-1])
    except ValueError as err:
        raise AnnotationError(f"image path: {err}") from None
    landmarks = np.asarray(coords, dtype=np.float64).reshape(NUM_POINTS, 2)
    return Annotation(landmarks, rect, tuple(flags), image_path)  # type: ignore[arg-type]


def format_line(annotation: Annotation) -> str:
    """Format one face as WFLW does: 6-decimal coordinates, integer rect, 0/1 flags, path."""
    coords = " ".join(f"{v:.6f}" for v in np.asarray(annotation.landmarks).reshape(-1))
    rect = " ".join(str(int(v)) for v in annotation.rect)
    flags = " ".join("1" if f else "0" for f in annotation.attributes)
    return f"{coords} {rect} {flags} {annotation.image_path}"


def format_test_list_line(annotation: Annotation) -> str:
    """One line of `list_98pt_test*.txt`: 196 coordinates, then the image path."""
    coords = " ".join(f"{v:.6f}" for v in np.asarray(annotation.landmarks).reshape(-1))
    return f"{coords} {annotation.image_path}"
