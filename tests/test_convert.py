import hashlib
import io
import json
import logging
import tarfile
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import default_params, face_line, jpeg, ring_landmarks, small_dataset, write_raw
from PIL import Image

from wflw_pipeline import convert
from wflw_pipeline.data import contract, wflw
from wflw_pipeline.params import ConvertParams

CONTRACT = {
    "face_id": "int64",
    "split": "string",
    "image_path": "string",
    "image_width": "int32",
    "image_height": "int32",
    "crop_jpeg": "binary",
    "crop_to_image": "fixed_size_list<element: float>[6]",
    "landmarks": "fixed_size_list<element: float>[196]",
    "landmarks_image": "fixed_size_list<element: float>[196]",
    "rect": "fixed_size_list<element: int32>[4]",
    **{name: "bool" for name in wflw.ATTRIBUTES},
}


def _params(**overrides) -> ConvertParams:
    small = {"crop_size": 64, "val_fraction": 0.0, "workers": 1}
    return replace(default_params().convert, **{**small, **overrides})


def _run(tmp_path, **overrides):
    return convert.run_convert(_params(**overrides), tmp_path / "raw", tmp_path / "out")


def _table(tmp_path, split):
    return pq.read_table(tmp_path / "out" / f"{split}.parquet").to_pylist()


def test_schema_is_the_data_contract_and_metadata_names_the_sources(tmp_path):
    small_dataset(tmp_path / "raw")
    _run(tmp_path)
    schema = pq.read_schema(tmp_path / "out" / "train.parquet")
    assert {f.name: str(f.type) for f in schema} == CONTRACT
    assert schema.names == list(CONTRACT)
    meta = contract.read_metadata(tmp_path / "out" / "test.parquet")
    raw = tmp_path / "raw"
    assert meta["archives"] == {
        name: hashlib.sha256((raw / name).read_bytes()).hexdigest()
        for name in (wflw.ANNOTATIONS_ARCHIVE, wflw.IMAGES_ARCHIVE)
    }
    assert meta["crop"] == {
        "bbox": "landmarks",
        "padding": 1.25,
        "context": 1.5,
        "crop_size": 64,
        "jpeg_quality": 95,
    }
    assert meta["source"] == "unknown"


@pytest.mark.parametrize("bbox", ["landmarks", "rect"])
def test_crop_landmarks_map_back_to_the_image_and_sit_on_the_drawn_marks(tmp_path, bbox):
    small_dataset(tmp_path / "raw")
    _run(tmp_path, bbox=bbox)
    for row in _table(tmp_path, "train") + _table(tmp_path, "test"):
        matrix = np.array(row["crop_to_image"]).reshape(2, 3)
        crop_points = np.array(row["landmarks"]).reshape(98, 2)
        image_points = np.array(row["landmarks_image"]).reshape(98, 2)
        mapped = crop_points @ matrix[:, :2].T + matrix[:, 2]
        assert np.abs(mapped - image_points).max() < 0.5
        crop = np.asarray(Image.open(io.BytesIO(row["crop_jpeg"])).convert("L"), float)
        assert crop.shape == (64, 64)
        for x, y in crop_points[::7]:
            assert crop[int(y), int(x)] > 120, (row["face_id"], x, y)


def test_large_faces_take_the_dct_and_box_shrink_path_without_shifting_points(tmp_path):
    points = ring_landmarks(900, 700, radius=500)
    line = face_line(points, "1--Handshaking/big.jpg")
    image = jpeg(1800, 1400, [tuple(p) for p in points[::7]], side=160)
    write_raw(
        tmp_path / "raw",
        {"train": [line], "test": [line.replace("big", "big2")]},
        {"1--Handshaking/big.jpg": image, "1--Handshaking/big2.jpg": image},
    )
    _run(tmp_path, crop_size=48)
    (row,) = _table(tmp_path, "train")
    crop = np.asarray(Image.open(io.BytesIO(row["crop_jpeg"])).convert("L"), float)
    for x, y in np.array(row["landmarks"]).reshape(98, 2)[::7]:
        assert crop[int(y), int(x)] > 120


def test_summary_counts_faces_and_subsets(tmp_path):
    small_dataset(tmp_path / "raw", train=6, test=5)
    summary = _run(tmp_path)
    assert summary["faces"] == {"train": 6, "test": 5, "val": 0}
    assert summary["subsets"]["test"] == {
        "pose": 1,
        "expression": 1,
        "illumination": 1,
        "makeup": 1,
        "occlusion": 1,
        "blur": 0,
    }
    assert summary["test_list_counts"] == summary["subsets"]["test"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert [r["face_id"] for r in _table(tmp_path, "test")] == [0, 1, 2, 3, 4]
    assert _table(tmp_path, "val") == []


def test_val_split_is_stratified_by_the_flags(tmp_path):
    lines = {"train": [], "test": []}
    images = {}
    for i in range(40):
        path = f"2--Demonstration/{i}.jpg"
        flags = (0, 0, 0, 0, 0, 1) if i % 5 == 0 else (0,) * 6  # 8 blurred faces of 40
        lines["train"].append(face_line(ring_landmarks(100, 100, 50), path, flags))
        images[path] = jpeg(200, 200)
    lines["test"] = lines["train"][:1]
    write_raw(tmp_path / "raw", lines, images)
    summary = _run(tmp_path, val_fraction=0.25)
    assert summary["faces"] == {"train": 30, "test": 1, "val": 10}
    # stratified: 0.25 of the 8 blurred faces = exactly 2 (a random 10 of 40 holds 2 in 35 % of draws)
    assert summary["subsets"]["val"]["blur"] == 2
    val = _table(tmp_path, "val")
    assert {r["split"] for r in val} == {"val"}
    train_ids = {r["face_id"] for r in _table(tmp_path, "train")}
    assert train_ids.isdisjoint({r["face_id"] for r in val})
    assert len(train_ids) + len(val) == 40
    # every seed gives exactly 2: a random split would give 2 for all 20 seeds with odds of about 1e-9
    rows = [{**dict.fromkeys(wflw.ATTRIBUTES, False), "blur": i % 5 == 0} for i in range(40)]
    for seed in range(20):
        _, held_out = convert.split_validation(rows, 0.25, seed)
        assert (len(held_out), sum(row["blur"] for row in held_out)) == (10, 2), seed


def test_a_few_faces_still_convert_and_an_unstratifiable_val_split_falls_back(tmp_path, caplog):
    small_dataset(tmp_path / "raw", train=3, test=1)
    with caplog.at_level(logging.WARNING):
        summary = _run(tmp_path, val_fraction=0.5)
    # round(0.5 * 3 faces) = round(1.5) = 2 val faces (half to even), 1 left to train
    assert summary["faces"] == {"train": 1, "test": 1, "val": 2}
    assert "cannot be stratified" in caplog.text


def _assert_no_outputs(tmp_path):
    out = tmp_path / "out"
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def _break_line(tmp_path, mutate):
    lines = small_dataset(tmp_path / "raw")
    tokens = lines["train"][1].split()
    lines["train"][1] = " ".join(mutate(tokens))
    from wflw_pipeline.data import synthetic

    synthetic.write_annotations_archive(tmp_path / "raw" / wflw.ANNOTATIONS_ARCHIVE, lines)


ANNOTATION_MEMBER = "WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_train.txt"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t[:-1], f"{ANNOTATION_MEMBER}:2: expected 207 tokens, found 206"),
        (lambda t: ["NaN", *t[1:]], f"{ANNOTATION_MEMBER}:2: coordinate 0 is not finite"),
        (lambda t: [*t[:5], "x1", *t[6:]], f"{ANNOTATION_MEMBER}:2: coordinate 5 is not a number"),
        (lambda t: [*t[:200], "7", *t[201:]], f"{ANNOTATION_MEMBER}:2: flag pose must be 0 or 1"),
        (lambda t: [*t[:-1], "../outside.jpg"], f"{ANNOTATION_MEMBER}:2: image path: unsafe path"),
    ],
)
def test_bad_annotation_lines_stop_with_file_and_line_and_write_nothing(tmp_path, mutate, message):
    _break_line(tmp_path, mutate)
    with pytest.raises(convert.ConvertError, match=message.replace("(", r"\(")):
        _run(tmp_path)
    _assert_no_outputs(tmp_path)


def test_on_error_skip_skips_and_counts_bad_faces(tmp_path):
    _break_line(tmp_path, lambda t: t[:-1])
    summary = _run(tmp_path, on_error="skip")
    assert summary["faces"] == {"train": 3, "test": 3, "val": 0}
    assert summary["skipped"]["count"] == 1
    assert f"{ANNOTATION_MEMBER}:2: expected 207" in summary["skipped"]["reasons"][0]
    assert 1 not in {r["face_id"] for r in _table(tmp_path, "train")}


def test_missing_image_names_the_annotation_line(tmp_path):
    lines = small_dataset(tmp_path / "raw")
    lines["test"].append(face_line(ring_landmarks(100, 100, 40), "9--Press_Conference/gone.jpg"))
    from wflw_pipeline.data import synthetic

    synthetic.write_annotations_archive(tmp_path / "raw" / wflw.ANNOTATIONS_ARCHIVE, lines)
    with pytest.raises(
        convert.ConvertError,
        match=r"list_98pt_rect_attr_test.txt:4: image "
        r"'9--Press_Conference/gone.jpg' is missing from .*WFLW_images.tar.gz",
    ):
        _run(tmp_path)
    _assert_no_outputs(tmp_path)


def test_unreadable_image_names_the_member(tmp_path):
    lines = small_dataset(tmp_path / "raw")
    images = {f"0--Parade/{s}_{i}.jpg": jpeg(520, 320) for s in ("train", "test") for i in range(2)}
    images["0--Parade/train_1.jpg"] = b"<html>not a jpeg</html>"
    write_raw(tmp_path / "raw", lines, images)
    with pytest.raises(
        convert.ConvertError, match=r"WFLW_images/0--Parade/train_1.jpg .*cannot decode image"
    ):
        _run(tmp_path)
    _assert_no_outputs(tmp_path)


def test_truncated_archive_is_reported(tmp_path):
    small_dataset(tmp_path / "raw")
    archive = tmp_path / "raw" / wflw.IMAGES_ARCHIVE
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(convert.ConvertError, match=r"WFLW_images.tar.gz: truncated or corrupt archive"):
        _run(tmp_path)
    _assert_no_outputs(tmp_path)


def test_landmarks_far_outside_the_image_are_refused(tmp_path):
    lines = small_dataset(tmp_path / "raw")
    tokens = lines["test"][0].split()
    tokens[0] = "-5000.0"
    lines["test"][0] = " ".join(tokens)
    from wflw_pipeline.data import synthetic

    synthetic.write_annotations_archive(tmp_path / "raw" / wflw.ANNOTATIONS_ARCHIVE, lines)
    with pytest.raises(
        convert.ConvertError,
        match=r"list_98pt_rect_attr_test.txt:1\): landmark 0 at "
        r"\(-5000.0, .*\) lies far outside the 520x320 image",
    ):
        _run(tmp_path)
    _assert_no_outputs(tmp_path)


@pytest.mark.parametrize("name", ["/etc/evil.jpg", "WFLW_images/../../evil.jpg"])
def test_unsafe_archive_members_are_refused(tmp_path, name):
    small_dataset(tmp_path / "raw")
    archive = tmp_path / "raw" / wflw.IMAGES_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(convert.ConvertError, match=r"archive member unsafe path"):
        _run(tmp_path)
    _assert_no_outputs(tmp_path)


def test_disagreeing_subset_list_is_an_error(tmp_path):
    lines = small_dataset(tmp_path / "raw")
    member = wflw.test_list_member("blur")
    archive = tmp_path / "raw" / wflw.ANNOTATIONS_ARCHIVE
    with tarfile.open(archive, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    with tarfile.open(archive, "w:gz") as tar:
        for info, data in members:
            if info.name == member:
                data = data + (lines["test"][0] + "\n").encode()
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    with pytest.raises(convert.ConvertError, match=r"list_98pt_test_blur.txt lists 1 faces but 0 test faces"):
        _run(tmp_path)


def test_failed_run_keeps_the_previous_outputs_intact(tmp_path):
    small_dataset(tmp_path / "raw")
    _run(tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    _break_line(tmp_path, lambda t: t[:-1])
    with pytest.raises(convert.ConvertError):
        _run(tmp_path)
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert after == before
