"""The synthetic WFLW: format, determinism, layout, and what each flag means in the pixels."""

from __future__ import annotations

import dataclasses
import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from wflw_pipeline.data import synthetic, wflw
from wflw_pipeline.params import ParamsError, SyntheticParams

SMALL = SyntheticParams(
    seed=5, train_faces=20, test_faces=10, min_image_size=200, max_image_size=400, workers=1
)


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _lines(members: dict[str, bytes], member: str) -> list[str]:
    return members[member].decode().splitlines()


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> tuple[dict[str, bytes], dict[str, bytes]]:
    out = tmp_path_factory.mktemp("synthetic")
    images, annotations = synthetic.generate_archives(out, SMALL)
    assert (images.name, annotations.name) == (wflw.IMAGES_ARCHIVE, wflw.ANNOTATIONS_ARCHIVE)
    assert sorted(p.name for p in out.iterdir()) == sorted([wflw.IMAGES_ARCHIVE, wflw.ANNOTATIONS_ARCHIVE])
    return _members(images), _members(annotations)


def _unit(job_flags: str) -> tuple[bool, ...]:
    return tuple(c == "1" for c in job_flags)


def _job(flags: str, seed: int = 0, size: int = 400) -> synthetic.ImageJob:
    """One image holding one face with the given flags (a string like '000001')."""
    return synthetic.ImageJob(seed, "test", 1, seed, "0--Parade/x.jpg", (_unit(flags),), size, size)


def _normalised(landmarks: np.ndarray) -> np.ndarray:
    """Landmarks with the outer eye corners moved to (-0.5, 0) and (0.5, 0)."""
    left, right = landmarks[wflw.LEFT_EYE_OUTER], landmarks[wflw.RIGHT_EYE_OUTER]
    axis = right - left
    scale = np.hypot(*axis)
    cos, sin = axis / scale
    rotation = np.array([[cos, -sin], [sin, cos]])
    return (landmarks - (left + right) / 2) @ rotation / scale


def _luminance(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    parallel = dataclasses.replace(SMALL, workers=2)
    first = synthetic.generate_archives(tmp_path / "a", SMALL)
    again = synthetic.generate_archives(tmp_path / "b", parallel)
    other = synthetic.generate_archives(tmp_path / "c", dataclasses.replace(SMALL, seed=6))
    for a, b, c in zip(first, again, other, strict=True):
        assert a.read_bytes() == b.read_bytes()
        assert a.read_bytes() != c.read_bytes()


def test_archives_follow_wflw_format(small_dataset):
    images, annotations = small_dataset
    test_annotations = []
    for split, expected in (("train", SMALL.train_faces), ("test", SMALL.test_faces)):
        lines = _lines(annotations, wflw.annotation_member(split))
        assert len(lines) == expected
        parsed = [wflw.parse_line(line) for line in lines]
        seen: list[str] = []
        for annotation in parsed:
            if not seen or seen[-1] != annotation.image_path:
                assert annotation.image_path not in seen  # the faces of an image are consecutive
                seen.append(annotation.image_path)
            image = Image.open(io.BytesIO(images[f"{wflw.IMAGES_ROOT}/{annotation.image_path}"]))
            assert image.format == "JPEG"
            assert all(SMALL.min_image_size <= side <= SMALL.max_image_size for side in image.size)
            points = annotation.landmarks  # WFLW's convention: the image spans [-0.5, size - 0.5]
            assert (points >= -0.5).all() and (points <= np.array(image.size) - 0.5).all()
            x0, y0, x1, y1 = annotation.rect
            assert 0 <= x0 < x1 < image.width and 0 <= y0 < y1 < image.height
            event, name = annotation.image_path.split("/")
            assert event in synthetic.EVENTS and name.startswith(event.split("--")[0] + "_")
        if split == "test":
            test_annotations = parsed
    paths = {
        split: {
            wflw.parse_line(line).image_path for line in _lines(annotations, wflw.annotation_member(split))
        }
        for split in wflw.SPLITS
    }
    assert not paths["train"] & paths["test"]
    assert len(images) == len(paths["train"]) + len(paths["test"])
    assert _lines(annotations, wflw.test_list_member()) == [
        wflw.format_test_list_line(a) for a in test_annotations
    ]
    for attribute in wflw.ATTRIBUTES:
        listed = _lines(annotations, wflw.test_list_member(attribute))
        assert listed == [wflw.format_test_list_line(a) for a in test_annotations if a.flag(attribute)]
    assert f"{wflw.RECT_ATTR_DIR}/README" in annotations and f"{wflw.TEST_LIST_DIR}/README" in annotations


def test_some_images_hold_several_faces(small_dataset):
    _, annotations = small_dataset
    paths = [
        wflw.parse_line(line).image_path for line in _lines(annotations, wflw.annotation_member("train"))
    ]
    counts = np.unique(paths, return_counts=True)[1]
    assert counts.max() >= 2 and counts.min() == 1


def test_plan_matches_wflw_proportions():
    jobs = synthetic.plan_jobs(dataclasses.replace(SMALL, seed=1, train_faces=4000, test_faces=2500))
    # WFLW's test subsets (list_98pt_test_<subset>.txt), faces of 2,500; written out here, not read
    # from synthetic.FLAG_RATES, so a wrong rate in that table fails
    wflw_test_subsets = {
        "pose": 326,
        "expression": 314,
        "illumination": 698,
        "makeup": 206,
        "occlusion": 736,
        "blur": 773,
    }
    for split, total in (("train", 4000), ("test", 2500)):
        flags = np.array([face for job in jobs if job.split == split for face in job.flags])
        assert flags.shape == (total, len(wflw.ATTRIBUTES))
        for column, attribute in enumerate(wflw.ATTRIBUTES):
            expected = wflw_test_subsets[attribute] / 2500
            assert abs(flags[:, column].mean() - expected) < 0.03, attribute
        assert 1.35 < total / sum(job.split == split for job in jobs) < 1.7  # WFLW: 10,000 / 6,551
    assert len({job.relpath for job in jobs}) == len(jobs)


def test_pose_flag_means_a_large_pose():
    rng = np.random.default_rng(0)
    for _ in range(300):
        small = synthetic.sample_pose(rng, large=False)
        assert abs(small.yaw) <= 20 and abs(small.pitch) <= 12 and abs(small.roll) <= 12
        large = synthetic.sample_pose(rng, large=True)
        assert abs(large.yaw) >= 40 or abs(large.roll) >= 30 or abs(large.pitch) >= 25


def test_expression_flag_moves_mouth_and_brows_and_only_then():
    moved = []
    for seed in range(12):
        neutral, _ = _render_face_landmarks(_job("000000", seed))
        strong, _ = _render_face_landmarks(_job("010000", seed))
        shift = np.linalg.norm(_normalised(strong) - _normalised(neutral), axis=1)
        moved.append(shift[33:51].max() > 0.05 or shift[76:96].max() > 0.05)
        assert shift[list(wflw.POINT_GROUPS["nose_bridge"])].max() < 1e-6  # the rest of the face stays
    assert all(moved)


def _render_face_landmarks(job: synthetic.ImageJob) -> tuple[np.ndarray, Image.Image]:
    image, (annotation,) = synthetic.render_image(job)
    return annotation.landmarks, image


def test_unflagged_faces_are_frontal_with_closed_mouth(small_dataset):
    _, annotations = small_dataset
    lines = _lines(annotations, wflw.annotation_member("train")) + _lines(
        annotations, wflw.annotation_member("test")
    )
    for annotation in map(wflw.parse_line, lines):
        points = annotation.landmarks
        eyes = points[wflw.RIGHT_EYE_OUTER] - points[wflw.LEFT_EYE_OUTER]
        if not annotation.flag("pose"):
            assert abs(math.degrees(math.atan2(eyes[1], eyes[0]))) < 15  # little roll
            if not annotation.flag("expression"):
                assert np.linalg.norm(points[94] - points[90]) < 0.04 * np.linalg.norm(eyes)


def _detail(image: Image.Image, points: np.ndarray) -> float:
    """Mean absolute difference of neighbouring pixels within the landmarks' box."""
    x0, y0 = np.floor(points.min(axis=0)).astype(int)
    x1, y1 = np.ceil(points.max(axis=0)).astype(int)
    face = _luminance(image)[y0:y1, x0:x1]
    return float(np.abs(np.diff(face, axis=0)).mean() + np.abs(np.diff(face, axis=1)).mean())


def test_blur_flag_removes_high_frequencies_in_the_face():
    for seed in range(3):
        sharp_points, sharp = _render_face_landmarks(_job("000000", seed))
        blurred_points, blurred = _render_face_landmarks(_job("000001", seed))
        assert np.array_equal(sharp_points, blurred_points)
        assert _detail(blurred, sharp_points) < 0.6 * _detail(sharp, sharp_points)


def test_occluder_hides_a_share_of_the_points():
    for seed in range(20):
        job = _job("000000", seed)
        face = synthetic.sample_face(job, 0)
        points = synthetic.project_face(face).landmarks * 100
        size = float(np.ptp(points, axis=0).max())
        polygons = synthetic._occluder(np.random.default_rng(seed), points, size)
        mask = Image.new("L", (2000, 2000), 0)
        for polygon in polygons:
            ImageDraw.Draw(mask).polygon((polygon + 1000 - 0.5).ravel().tolist(), fill=255)
        hidden = np.asarray(mask)[(points[:, 1] + 1000).astype(int), (points[:, 0] + 1000).astype(int)] > 0
        assert 0.15 <= hidden.mean() <= 0.40


def test_landmarks_sit_on_the_drawn_features():
    for seed in range(6):
        points, image = _render_face_landmarks(_job("000000", seed, size=600))
        lum = _luminance(image)
        x, y = np.round(points).astype(int).T  # WFLW's convention: pixel (row y, column x) centred on (x, y)
        for pupil in (96, 97):
            assert lum[y[pupil], x[pupil]] < lum[y[52], x[52]] - 15  # the dark pupil vs the skin of the nose


def _pupil_centre(lum: np.ndarray, point: np.ndarray) -> np.ndarray | None:
    """Centre of the dark disc around `point` in pixel indices (pixel (row y, column x) centred on
    (x, y)), darkness-weighted; None when something else dark (the lid's liner) touches it."""
    cx, cy = np.round(point).astype(int)
    ys, xs = np.mgrid[cy - 16 : cy + 17, cx - 16 : cx + 17]
    window = lum[cy - 16 : cy + 17, cx - 16 : cx + 17]
    distance = np.hypot(xs - point[0], ys - point[1])
    dark = window < 0.5 * np.median(window[distance < 14])
    for radius in range(3, 14):
        rim = (distance >= radius) & (distance < radius + 1.5)
        if not dark[rim].any():
            inside = distance < radius
            low, high = window[inside].min(), window[rim].min()
            weight = np.clip((high - window) / (high - low), 0, 1) * inside
            return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
    return None


def test_written_landmarks_follow_wflw_pixel_convention_on_the_drawn_pupils(monkeypatch):
    """The pupil (a dark disc centred on points 96 and 97) is found where the annotation line says, with
    pixel centres at integers as in WFLW; the iris and sclera are made light so that the pupil stands out."""
    sample_face = synthetic.sample_face

    def light_eyes(job: synthetic.ImageJob, index: int) -> synthetic.Face:
        face = sample_face(job, index)
        light = dataclasses.replace(face.look, iris=(235, 235, 235), sclera=(235, 235, 235))
        return dataclasses.replace(face, look=light)

    monkeypatch.setattr(synthetic, "sample_face", light_eyes)
    offsets = []
    for seed in range(24):
        image, (annotation,) = synthetic.render_image(_job("000000", seed, size=900))
        annotation = wflw.parse_line(wflw.format_line(annotation))  # as written (render_job's line)
        for pupil in (96, 97):
            centre = _pupil_centre(_luminance(image), annotation.landmarks[pupil])
            if centre is not None:
                offsets.append(centre - annotation.landmarks[pupil])
    offsets = np.array(offsets)
    assert len(offsets) >= 16
    # each pupil within half a pixel (Pillow draws its 10-gon's corners on whole pixels), and exact on
    # average: a drawing or writing convention half a pixel off moves the mean by 0.5 on both axes (the
    # renderer once drew half a pixel up-left of its points and wrote them unconverted: a whole pixel)
    assert np.abs(offsets).max() < 0.5, offsets
    assert np.abs(offsets.mean(axis=0)).max() < 0.1, offsets.mean(axis=0)


def test_annotations_archive_takes_any_lines_and_lists_the_parsable_test_faces(tmp_path):
    good = wflw.Annotation(
        np.arange(196.0).reshape(98, 2), (0, 0, 10, 10), _unit("100001"), "0--Parade/a.jpg"
    )
    lines = {"train": ["not a line at all"], "test": [wflw.format_line(good), "1 2 3"]}
    path = tmp_path / wflw.ANNOTATIONS_ARCHIVE
    synthetic.write_annotations_archive(path, lines)
    members = _members(path)
    assert _lines(members, wflw.annotation_member("train")) == ["not a line at all"]
    assert _lines(members, wflw.annotation_member("test")) == lines["test"]
    assert _lines(members, wflw.test_list_member()) == [wflw.format_test_list_line(good)]
    assert _lines(members, wflw.test_list_member("blur")) == [wflw.format_test_list_line(good)]
    assert _lines(members, wflw.test_list_member("makeup")) == []


def test_images_archive_holds_the_given_bytes(tmp_path):
    path = tmp_path / wflw.IMAGES_ARCHIVE
    synthetic.write_images_archive(path, [("1--Handshaking/b.jpg", b"xyz"), ("0--Parade/a.jpg", b"abc")])
    assert _members(path) == {
        "WFLW_images/1--Handshaking/b.jpg": b"xyz",
        "WFLW_images/0--Parade/a.jpg": b"abc",
    }
    with tarfile.open(path, "r:gz") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname) for m in tar.getmembers()} == {
            (synthetic.TAR_MTIME, 0, 0, "")
        }


def test_bad_params_are_refused_before_any_output(tmp_path):
    with pytest.raises(ParamsError, match=r"data.synthetic: need >= 1 face per split"):
        synthetic.generate_archives(tmp_path / "out", dataclasses.replace(SMALL, test_faces=0))
    assert not (tmp_path / "out").exists()
