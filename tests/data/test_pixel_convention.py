"""WFLW's pixel convention at the boundary: annotations put pixel centres at integers (as MMPose does),
the pipeline is continuous inside (pixel i covers [i, i + 1)).

The mirrored-image test: bright squares centred on known pixels, annotated in WFLW's convention; the
image mirrored with numpy and the annotation mirrored as MMPose does (x' = w - 1 - x, points re-labelled
by FLIP). Both faces go through convert, and in each crop every landmark must sit on the centre of its
square, so a flipped face's landmarks land on the same image features as the original's.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import default_params, face_line, ring_landmarks, write_raw
from PIL import Image

from wflw_pipeline import convert
from wflw_pipeline.data import wflw

WIDTH, HEIGHT = 181, 150
SIDE = 5  # odd, so that a square can be centred on a pixel centre
BACKGROUND, MARK = 30, 230
MARKED = tuple(range(0, 98, 7))
"""Points drawn as squares (about 27 image px apart on the ring, far more than a square)."""
CROP = 256  # about 0.6 image px per crop px: a half-pixel error is ~0.8 crop px


def _landmarks() -> np.ndarray:
    """98 points at integer positions (pixel centres in WFLW's convention), off the image's centre line."""
    return np.round(ring_landmarks(80.0, 72.0, 42.0))


def _image(points: np.ndarray) -> np.ndarray:
    """A grey image with a bright SIDE x SIDE square centred on the pixel of each marked point."""
    pixels = np.full((HEIGHT, WIDTH), BACKGROUND, np.uint8)
    half = SIDE // 2
    for x, y in points[list(MARKED)].astype(int):
        pixels[y - half : y + half + 1, x - half : x + half + 1] = MARK
    return pixels


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(pixels[:, :, None], 3, axis=2)).save(buffer, format="PNG")
    return buffer.getvalue()


def _mirror(points: np.ndarray) -> np.ndarray:
    """MMPose's horizontal flip of annotated points: x' = w - 1 - x, then re-labelled by FLIP."""
    mirrored = points.copy()
    mirrored[:, 0] = WIDTH - 1 - mirrored[:, 0]
    return mirrored[list(wflw.FLIP)]


def _convert(tmp_path, bbox: str) -> dict[str, dict]:
    """Convert the original face (train) and the mirrored one (test); their Parquet rows."""
    original = _landmarks()
    mirrored = _mirror(original)
    pixels = _image(original)
    # the image mirrored by numpy shows the squares exactly where the mirrored annotation puts them
    assert np.array_equal(pixels[:, ::-1], _image(mirrored[list(wflw.FLIP)]))
    write_raw(
        tmp_path / "raw",
        {
            "train": [face_line(original, "0--Parade/face.jpg")],
            "test": [face_line(mirrored, "0--Parade/face_mirrored.jpg")],
        },
        {"0--Parade/face.jpg": _png(pixels), "0--Parade/face_mirrored.jpg": _png(pixels[:, ::-1])},
    )
    params = replace(
        default_params().convert, bbox=bbox, crop_size=CROP, val_fraction=0.0, workers=1, jpeg_quality=100
    )
    convert.run_convert(params, tmp_path / "raw", tmp_path / "out")
    return {
        split: pq.read_table(tmp_path / "out" / f"{split}.parquet").to_pylist()[0]
        for split in ("train", "test")
    }


def _crop(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["crop_jpeg"])).convert("L"), np.float64)


def _centroid(crop: np.ndarray, near: np.ndarray, radius: float) -> np.ndarray:
    """Intensity-weighted centre (continuous crop coordinates) of the bright square near `near`."""
    x0, y0 = np.floor(near - radius).astype(int)
    x1, y1 = np.ceil(near + radius).astype(int) + 1
    window = crop[y0:y1, x0:x1] - BACKGROUND
    weights = np.clip(window, 0, None)
    ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5  # pixel (row, column) is centred on (column + 0.5, row + 0.5)
    return np.array([(weights * xs).sum(), (weights * ys).sum()]) / weights.sum()


@pytest.mark.parametrize("bbox", ["landmarks", "rect"])
def test_mirrored_face_landmarks_sit_on_the_same_features(tmp_path, bbox):
    rows = _convert(tmp_path, bbox)
    marked = {"train": list(MARKED), "test": [wflw.FLIP[i] for i in MARKED]}
    for split, row in rows.items():
        crop = _crop(row)
        points = np.array(row["landmarks"], np.float64).reshape(98, 2)
        scale = row["crop_to_image"][0]
        radius = 1.5 * SIDE / scale  # the square and a margin, in crop px
        for i in marked[split]:
            centre = _centroid(crop, points[i], radius)
            assert np.abs(centre - points[i]).max() < 0.15, (split, i, centre, points[i])
    # the mirrored face's crop is the mirror of the original's, with its points re-labelled by FLIP
    original, mirrored = (
        np.array(rows[s]["landmarks"], np.float64).reshape(98, 2) for s in ("train", "test")
    )
    expected = original[list(wflw.FLIP)]
    expected[:, 0] = CROP - expected[:, 0]
    np.testing.assert_allclose(mirrored, expected, atol=1e-3)
    difference = np.abs(_crop(rows["test"]) - _crop(rows["train"])[:, ::-1])
    assert difference.max() <= 2 and difference.mean() < 0.1, (difference.max(), difference.mean())


@pytest.mark.parametrize("bbox", ["landmarks", "rect"])
def test_crop_to_image_of_the_crop_landmarks_is_landmarks_image_exactly(tmp_path, bbox):
    rows = _convert(tmp_path, bbox)
    marked = {"train": list(MARKED), "test": [wflw.FLIP[i] for i in MARKED]}
    for split, row in rows.items():
        matrix = np.array(row["crop_to_image"], np.float64).reshape(2, 3)
        crop_points = np.array(row["landmarks"], np.float64).reshape(98, 2)
        image_points = np.array(row["landmarks_image"], np.float64).reshape(98, 2)
        mapped = crop_points @ matrix[:, :2].T + matrix[:, 2]
        # float32 storage: a few ulps of the largest coordinate; the half-pixel convention shift is 0.5
        np.testing.assert_allclose(mapped, image_points, rtol=0, atol=8 * np.spacing(np.float32(WIDTH)))
        # evaluate's path: a prediction exactly on a feature found in the crop, mapped through
        # crop_to_image, lands on the annotated point (no error for a perfect prediction)
        crop = _crop(row)
        radius = 1.5 * SIDE / matrix[0, 0]
        found = np.array([_centroid(crop, crop_points[i], radius) for i in marked[split]])
        on_image = found @ matrix[:, :2].T + matrix[:, 2]
        np.testing.assert_allclose(on_image, image_points[marked[split]], rtol=0, atol=0.1)
    np.testing.assert_array_equal(
        np.array(rows["train"]["landmarks_image"]).reshape(98, 2), _landmarks().astype(np.float32)
    )


def test_to_continuous_and_to_annotation_are_inverse_half_pixel_shifts():
    points = np.array([[0.0, 0.0], [12.0, 7.25], [-0.5, 99.5]])
    assert wflw.ANNOTATION_OFFSET == 0.5
    np.testing.assert_array_equal(wflw.to_continuous(points), points + 0.5)
    np.testing.assert_array_equal(wflw.to_annotation(points), points - 0.5)
    np.testing.assert_array_equal(wflw.to_annotation(wflw.to_continuous(points)), points)
    np.testing.assert_array_equal(wflw.to_continuous(wflw.to_annotation(points)), points)
    # the pixel centred on annotated x = 3 covers [3, 4) continuously; a rect shifts on all four values
    assert wflw.to_continuous(np.array([3.0]))[0] == 3.5
    np.testing.assert_array_equal(wflw.to_continuous((10, 20, 30, 40)), [10.5, 20.5, 30.5, 40.5])
    # an image of width w spans [-0.5, w - 0.5] as annotated and [0, w] continuously; mirrors agree
    w, x = 181, np.array([17.25, 0.0])
    np.testing.assert_array_equal(wflw.to_continuous(w - 1 - x), w - wflw.to_continuous(x))
