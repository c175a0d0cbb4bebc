"""`wflw predict` on whole images: the crop convert makes, points in image pixels, the detector on a real
photo, every kind of bad input reported in one line while the rest of the batch goes on."""

from __future__ import annotations

import json
import logging
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import yaml
from helpers import PARAMS_YAML, default_params, tiny_trained
from PIL import Image

from wflw_pipeline import cli, convert
from wflw_pipeline.core.geometry import CropRule, face_box, square_box
from wflw_pipeline.core.metrics import nme_per_face
from wflw_pipeline.data import synthetic, wflw
from wflw_pipeline.outputs import TrainOutputs
from wflw_pipeline.serving.predict import Detector, Face, ImageProblem, landmarks, parse_bbox, read_image

HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
HOPPER_BOX = (179.5, 138.5, 366.5, 325.5)
"""dlib's box of the one face in matplotlib's sample portrait, as `wflw predict` reports it (measured)."""


def synthetic_image(index: int = 0) -> tuple[Image.Image, list[wflw.Annotation]]:
    """One image of the embedded default's test split, rendered, and its faces' annotations."""
    jobs = [job for job in synthetic.plan_jobs(default_params().data.synthetic) if job.split == "test"]
    return synthetic.render_image(jobs[index])


def rect_bbox(annotation: wflw.Annotation) -> str:
    return ",".join(str(int(v)) for v in annotation.rect)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny trained model.pt (crops of 48 px, input 32)."""
    return tiny_trained(tmp_path_factory.mktemp("predict"))[1]


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    data = yaml.safe_load(PARAMS_YAML.read_text())
    data["predict"].update(device="cpu", batch_size=4)
    path.write_text(yaml.safe_dump(data))
    return path


def predict(params: Path, model: Path, out: Path, *args: str) -> int:
    return cli.main(["predict", *args, "--model", str(model), "--out", str(out), "--params", str(params)])


def result(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


# The crop and the points -------------------------------------------------------------------------------


class Oracle:
    """A 'model' that answers the crop-pixel landmarks convert computed for the one face it is shown."""

    def __init__(self, crop_points: np.ndarray, crop_size: int) -> None:
        self.crop_points = crop_points
        self.crop_size = crop_size

    def predict(self, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
        return np.repeat(self.crop_points[None], len(crops), axis=0).astype(np.float32)


class Recorder(Oracle):
    """An Oracle that keeps every batch of crops it is shown."""

    def __init__(self, crop_points: np.ndarray, crop_size: int) -> None:
        super().__init__(crop_points, crop_size)
        self.shown: list[np.ndarray] = []

    def predict(self, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
        self.shown.append(crops)
        return super().predict(crops, batch_size)


def test_the_crop_of_the_landmark_box_is_converts_crop():
    image, annotations = synthetic_image()
    config = default_params().convert
    rule = CropRule.of(config)
    for annotation in annotations:
        points = wflw.to_continuous(annotation.landmarks)
        matrix = convert.crop_matrix(annotation, rule)
        box = Face((*points.min(axis=0), *points.max(axis=0)), None)
        recorder = Recorder((points - matrix[:, 2]) / matrix[0, 0], config.crop_size)
        (found,) = landmarks([image], [[box]], recorder, rule, refine=0, batch_size=4)
        np.testing.assert_array_equal(recorder.shown[0][0], np.asarray(rule.warp(image, matrix)))
        np.testing.assert_allclose(found[0], points, atol=1e-3)


def test_crop_points_come_back_as_the_annotated_image_points():
    image, (annotation, *_) = synthetic_image()
    config = default_params().convert
    rule = CropRule("rect", config.padding, config.context, config.crop_size)
    matrix = convert.crop_matrix(annotation, rule)
    crop_points = (wflw.to_continuous(annotation.landmarks) - matrix[:, 2]) / matrix[0, 0]
    box = Face(tuple(wflw.to_continuous(np.array(annotation.rect, float))), None)
    (points,) = landmarks(
        [image], [[box]], Oracle(crop_points, config.crop_size), rule, refine=2, batch_size=4
    )
    np.testing.assert_allclose(wflw.to_annotation(points[0]), annotation.landmarks, atol=1e-3)


def test_a_landmark_model_is_recropped_around_its_points_and_a_rect_model_is_not():
    image, (annotation, *_) = synthetic_image()
    truth = wflw.to_continuous(annotation.landmarks)
    box = Face((10.0, 10.0, 60.0, 60.0), None)
    for bbox, passes in (("landmarks", 3), ("landmarks_ceil", 3), ("rect", 1)):
        rule = CropRule(bbox, 1.25, 1.5, 48)
        matrix = rule.matrix(square_box(truth.min(axis=0), truth.max(axis=0)))
        oracle = Recorder((truth - matrix[:, 2]) / matrix[0, 0], 48)
        landmarks([image], [[box]], oracle, rule, refine=2, batch_size=4)
        assert len(oracle.shown) == passes
    # the first crop is around the box: centre (35, 35), side 50 x 1.25 x 1.5 = 93.75 px in 48
    first = np.array([[93.75 / 48, 0.0, 35 - 93.75 / 2], [0.0, 93.75 / 48, 35 - 93.75 / 2]])
    np.testing.assert_array_equal(oracle.shown[0][0], np.asarray(rule.warp(image, first)))


def test_a_model_of_mmposes_box_is_recropped_around_its_points_by_that_box():
    image, (annotation, *_) = synthetic_image()
    truth = wflw.to_continuous(annotation.landmarks)
    rule = CropRule("landmarks_ceil", 1.25, 1.5, 48)
    box = Face((10.0, 10.0, 60.0, 60.0), None)
    first = rule.matrix(square_box(np.array([10.0, 10.0]), np.array([60.0, 60.0])))
    crop_points = (truth - first[:, 2]) / first[0, 0]  # the first pass finds the true points
    oracle = Recorder(crop_points, 48)
    landmarks([image], [[box]], oracle, rule, refine=1, batch_size=4)
    side = face_box(truth, (), "landmarks")[2]
    assert side != int(side)
    second = rule.matrix(face_box(truth, (), "landmarks_ceil"))  # the side rounded up, as convert crops
    np.testing.assert_array_equal(oracle.shown[1][0], np.asarray(rule.warp(image, second)))


def test_bbox_is_read_in_wflws_pixel_convention():
    assert parse_bbox("10,20,110,220.5") == (10.5, 20.5, 110.5, 221.0)
    for bad in ("10,20,110", "a,b,c,d", "10,20,5,220", "10,20,110,nan"):
        with pytest.raises(ValueError, match=r"--bbox .*: expected x1,y1,x2,y2"):
            parse_bbox(bad)


# The command -------------------------------------------------------------------------------------------


def test_predict_writes_json_and_overlay_per_image_and_exits_0(model, params, tmp_path):
    image, (annotation, *_) = synthetic_image()
    image.save(tmp_path / "face.jpg", quality=95)
    assert (
        predict(params, model, tmp_path / "out", str(tmp_path / "face.jpg"), "--bbox", rect_bbox(annotation))
        == 0
    )
    found = result(tmp_path / "out", "face.jpg")
    assert (found["width"], found["height"], found["model"]) == (image.width, image.height, str(model))
    (face,) = found["faces"]
    assert face["score"] is None and face["box"] == [float(v) for v in annotation.rect]
    points = np.array(face["landmarks"])
    assert points.shape == (98, 2)
    assert ((points >= 0) & (points <= [image.width, image.height])).all()
    overlay = Image.open(tmp_path / "out" / "face.jpg.overlay.png")
    assert overlay.size == image.size and overlay.mode == "RGB"
    assert np.abs(np.asarray(overlay, int) - np.asarray(image, int)).max() > 100  # something is drawn


def test_folders_are_searched_recursively_and_outputs_keep_their_names(model, params, tmp_path):
    image, (annotation, *_) = synthetic_image()
    (tmp_path / "in" / "sub").mkdir(parents=True)
    image.save(tmp_path / "in" / "a.jpg", quality=95)
    image.save(tmp_path / "in" / "sub" / "b.webp")
    image.save(tmp_path / "in" / "sub" / "c.PNG")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    image.save(tmp_path / "a.jpg", quality=95)  # the same name as a file in the folder
    inputs = [str(tmp_path / "in"), str(tmp_path / "a.jpg")]
    assert predict(params, model, tmp_path / "out", *inputs, "--bbox", rect_bbox(annotation)) == 0
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.json"))
    assert names == ["a.jpg-2.json", "a.jpg.json", "sub/b.webp.json", "sub/c.PNG.json"]
    assert result(tmp_path / "out", "a.jpg-2")["image"] == str(tmp_path / "a.jpg")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` RGB pixels (and whose data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_bad_files_are_reported_in_one_line_each_and_the_rest_go_on(model, params, tmp_path, caplog):
    image, (annotation, *_) = synthetic_image()
    good = tmp_path / "good.jpg"
    image.save(good, quality=95)
    data = good.read_bytes()
    bad = {
        "text.jpg": (b"hello, not a picture\n", "not an image Pillow can read"),
        "truncated.jpg": (data[: len(data) // 3], "truncated or corrupt image"),
        "huge.png": (_png_header_only(30000, 30000), "too large to decode safely"),
        "empty.png": (b"", "not an image Pillow can read"),
    }
    for name, (content, _) in bad.items():
        (tmp_path / name).write_bytes(content)
    paths = [str(tmp_path / name) for name in bad] + [str(good), str(tmp_path / "missing.jpg")]
    with caplog.at_level(logging.WARNING):
        code = predict(params, model, tmp_path / "out", *paths, "--bbox", rect_bbox(annotation))
    assert code == 1
    lines = {
        r.getMessage().split(": ", 1)[0]: r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    }
    for name, (_, reason) in bad.items():
        assert reason in lines[str(tmp_path / name)]
        assert "\n" not in lines[str(tmp_path / name)]
    assert lines[str(tmp_path / "missing.jpg")].endswith("file not found")
    assert [p.name for p in (tmp_path / "out").glob("*.json")] == ["good.jpg.json"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["5 of 6 images failed or showed no face (each one reported)"]


def _points(out: Path, name: str) -> np.ndarray:
    return np.array([face["landmarks"] for face in result(out, name)["faces"]])


def test_grey_rgba_and_16_bit_images_predict_as_their_8_bit_rgb(model, params, tmp_path):
    image, (annotation, *_) = synthetic_image()
    grey = image.convert("L")
    grey.convert("RGB").save(tmp_path / "rgb.png")
    grey.save(tmp_path / "grey.png")
    Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    rgba = np.dstack([np.asarray(image), np.full(grey.size[::-1], 255, np.uint8)])
    rgba[:40, :40, 3] = 0  # a transparent corner: drawn on white
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    on_white = np.asarray(image).copy()
    on_white[:40, :40] = 255
    Image.fromarray(on_white).save(tmp_path / "white.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    names = ["rgb.png", "grey.png", "grey16.png", "rgba.png", "white.png"]
    paths = [str(tmp_path / name) for name in names]
    assert predict(params, model, tmp_path / "out", *paths, "--bbox", rect_bbox(annotation)) == 0
    np.testing.assert_array_equal(_points(tmp_path / "out", "grey.png"), _points(tmp_path / "out", "rgb.png"))
    np.testing.assert_array_equal(
        _points(tmp_path / "out", "grey16.png"), _points(tmp_path / "out", "rgb.png")
    )
    np.testing.assert_array_equal(
        _points(tmp_path / "out", "rgba.png"), _points(tmp_path / "out", "white.png")
    )
    np.testing.assert_array_equal(
        np.asarray(read_image(tmp_path / "grey16.png")), np.asarray(grey.convert("RGB"))
    )


def test_an_exif_rotated_photo_is_read_upright_and_its_face_found(tmp_path):
    upright = Image.open(HOPPER).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways stores
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to view (undoes ROTATE_90)
    stored.save(tmp_path / "sideways.jpg", quality=95, exif=exif)
    read = read_image(tmp_path / "sideways.jpg")
    assert read.size == upright.size
    assert np.abs(np.asarray(read, int) - np.asarray(upright, int)).mean() < 3
    (face,) = Detector(upsample=1, max_side=1024, min_score=0.0)(read)
    assert np.abs(np.array(wflw.to_annotation(np.array(face.box))) - HOPPER_BOX).max() <= 8
    assert Detector(upsample=1, max_side=1024, min_score=0.0)(stored) == []  # sideways: HOG finds nothing


def test_the_detector_finds_the_face_of_a_real_photo_large_or_small():
    photo = Image.open(HOPPER).convert("RGB")
    detector = Detector(upsample=1, max_side=1024, min_score=0.0)
    (face,) = detector(photo)
    assert face.score > 0.5
    assert np.abs(np.array(wflw.to_annotation(np.array(face.box))) - HOPPER_BOX).max() <= 1
    huge = photo.resize((photo.width * 8, photo.height * 8))  # 20 MP: searched at 1024 px, boxed at full size
    (big,) = detector(huge)
    np.testing.assert_allclose(np.array(big.box) / 8, face.box, atol=8)  # 4 % of the box: other scales
    assert detector(Image.new("RGB", (400, 300), (120, 130, 140))) == []


def test_no_face_is_reported_and_written_as_an_empty_list(model, params, tmp_path, caplog):
    Image.new("RGB", (320, 240), (90, 90, 90)).save(tmp_path / "wall.jpg")
    Image.open(HOPPER).save(tmp_path / "hopper.jpg")
    with caplog.at_level(logging.WARNING):
        code = predict(
            params, model, tmp_path / "out", str(tmp_path / "wall.jpg"), str(tmp_path / "hopper.jpg")
        )
    assert code == 1
    assert result(tmp_path / "out", "wall.jpg")["faces"] == []
    (face,) = result(tmp_path / "out", "hopper.jpg")["faces"]
    assert face["box"] == list(HOPPER_BOX) and face["score"] > 0.5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{tmp_path / 'wall.jpg'}: no face found (pass --bbox x1,y1,x2,y2, or lower predict.min_score)"
    ]


def test_a_bad_bbox_or_model_is_an_error_before_any_image(model, params, tmp_path, caplog):
    assert predict(params, model, tmp_path / "out", str(HOPPER), "--bbox", "1,2,3") == 2
    assert cli.main(["predict", str(HOPPER), "--model", "nowhere.pt", "--params", str(params)]) == 2
    assert "--model nowhere.pt: no such file, and not a models:/ or runs:/ URI" in caplog.text
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_an_error_before_any_image_and_the_file_is_kept(
    model, params, tmp_path, caplog
):
    taken = tmp_path / "passwd"
    taken.write_text("root:x:0:0\n")

    assert predict(params, model, taken, str(HOPPER), "--bbox", "10,10,60,60") == 2

    assert f"--out {taken}: is a file; name a folder (it is created if missing)" in caplog.text
    assert taken.read_text() == "root:x:0:0\n"


def test_read_image_names_what_is_wrong(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ImageProblem, match=r"truncated or corrupt image|not an image"):
        read_image(tmp_path / "x.png")
    with pytest.raises(ImageProblem, match="is a folder"):
        read_image(tmp_path)


# With a usefully trained model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """A resnet18 at input 32 trained 10 epochs on 600 synthetic faces (about 20 s on 2 cores)."""
    from wflw_pipeline import fetch, train

    root = tmp_path_factory.mktemp("trained")
    base = default_params()
    params = replace(
        base,
        data=replace(
            base.data,
            synthetic=replace(base.data.synthetic, train_faces=600, test_faces=20, max_image_size=400),
        ),
        convert=replace(base.convert, crop_size=48, workers=1),
        model=replace(base.model, arch="resnet18", input_size=32),
        augment=replace(
            base.augment, flip_prob=0.0, rotation_prob=0.0, shift_prob=0.0, scale_min=0.9, scale_max=1.1
        ),
        train=replace(
            base.train, epochs=10, batch_size=32, lr=3e-3, warmup_iters=10, milestones=(8,), device="cpu"
        ),
    )
    fetch.run_fetch(params.data, root / "raw")
    convert.run_convert(params.convert, root / "raw", root / "parquet")
    outputs = TrainOutputs(root / "model", root / "train")
    train.run_train(params, root / "parquet", outputs)
    return outputs.model


@pytest.mark.slow
def test_with_a_trained_model_the_points_land_near_the_truth(trained_model, model, params, tmp_path):
    """Unseen synthetic photos, boxes from their annotation's detection rectangle: a model trained on such
    faces puts its points near the truth in image pixels, one trained on hand-made rings does not."""
    nme: dict[str, list[float]] = {"trained": [], "tiny": []}
    for index in range(8):
        image, annotations = synthetic_image(index)
        path = tmp_path / f"{index}.jpg"
        image.save(path, quality=95)
        for k, annotation in enumerate(annotations):
            for name, weights in (("trained", trained_model), ("tiny", model)):
                out = tmp_path / name / f"{index}-{k}"
                assert predict(params, weights, out, str(path), "--bbox", rect_bbox(annotation)) == 0
                points = _points(out, path.name)
                nme[name].append(float(nme_per_face(points, annotation.landmarks[None])[0]))
    trained, tiny = np.median(nme["trained"]), np.median(nme["tiny"])
    assert trained < 0.3, nme["trained"]  # measured: 0.206 (0.95 for the model of hand-made ring faces)
    assert trained < 0.5 * tiny, (trained, tiny)


def test_a_model_trained_on_synthetic_faces_is_warned_about_once(model, params, tmp_path, caplog):
    state = torch.load(model, weights_only=True)
    assert state["data"]["source"] != "synthetic"
    synthetic = tmp_path / "synthetic.pt"
    torch.save({**state, "data": {**state["data"], "source": "synthetic"}}, synthetic)
    image, (annotation, *_) = synthetic_image()
    for name in ("a.jpg", "b.jpg"):
        image.save(tmp_path / name, quality=95)
    images = [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), "--bbox", rect_bbox(annotation)]
    with caplog.at_level(logging.WARNING):
        assert predict(params, model, tmp_path / "real", *images) == 0
        assert "synthetic" not in caplog.text
        assert predict(params, synthetic, tmp_path / "out", *images) == 0
    [warning] = [r.getMessage() for r in caplog.records if "synthetic" in r.getMessage()]
    assert warning == (
        f"{synthetic} was trained on synthetic faces only (data.source: synthetic): on real photos it does "
        "about as well as always predicting the mean face shape; train on real WFLW for real photos (README, "
        '"Real WFLW")'
    )
