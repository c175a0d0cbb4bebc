"""`wflw bench loader` (bench/loader.py): both loaders produce the same views of the same faces, and the
mode writes its documented JSON.

Benchmarks never assert a speed: these tests check what is measured and that both loaders produce the
same views of the same faces, not how fast.
"""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from bench_support import TINY, run_wflw
from helpers import default_params

from wflw_pipeline.bench import loader
from wflw_pipeline.core import engine
from wflw_pipeline.core.runtime import Precision
from wflw_pipeline.data import augment
from wflw_pipeline.data.dataset import load_faces

CROP, CONTEXT, INPUT = 96, 1.5, 64  # the view (96 / 1.5 = 64 px) maps 1:1 onto the input, as 384 -> 256
GREY = 57.4  # one unit of a normalised input is about this many grey levels (ImageNet std)
PADDING = default_params().convert.padding


def _data(work, bbox: str) -> loader.BenchData:
    base = default_params()
    synthetic = replace(base.data.synthetic, min_image_size=160, max_image_size=220)
    params = replace(
        base,
        data=replace(base.data, synthetic=synthetic),
        convert=replace(base.convert, crop_size=CROP, context=CONTEXT, bbox=bbox),
    )
    return loader.prepare_data(work, params, faces=10)


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory) -> loader.BenchData:
    return _data(tmp_path_factory.mktemp("bench"), "landmarks")


def _both_loaders(data: loader.BenchData, params: augment.ViewParams, bbox: str = "landmarks"):
    """Our batch and the reference-style per-sample batch (boxed by `bbox`) of every face, seen through
    `params`."""
    faces = load_faces(data.parquet)
    n = len(faces)
    view = engine.View(faces.crop_size, faces.context, INPUT)
    ours = engine.inputs_and_targets(faces, torch.arange(n), view, params, Precision(None, False))
    paths, landmarks = data.records()
    dataset = loader.ReferenceStyleDataset(
        paths, landmarks, augmentation=None, bbox=bbox, padding=PADDING, out_size=INPUT, views=params
    )
    samples = [dataset[i] for i in range(n)]
    baseline = tuple(torch.stack(parts) for parts in zip(*samples, strict=True))
    return ours, baseline


def test_the_baseline_boxes_each_face_by_the_rule_convert_cropped_it_with(tmp_path):
    data = _data(tmp_path, "landmarks_ceil")  # MMPose's box: the side rounded up to a whole pixel
    params = augment.draw_params(10, generator=torch.Generator().manual_seed(3), device="cpu")
    (_, ours_y), (_, base_y) = _both_loaders(data, params, bbox="landmarks_ceil")
    assert (base_y - ours_y).abs().max().item() * INPUT < 1e-3
    (_, ours_y), (_, exact_y) = _both_loaders(data, params, bbox="landmarks")
    assert (exact_y - ours_y).abs().max().item() * INPUT > 1e-2  # the other box is visibly off


@pytest.mark.parametrize("views", ["identity", "random"])
def test_baseline_and_ours_produce_the_same_view_of_the_same_face(bench_data, views):
    n = len(bench_data.records()[0])
    if views == "identity":
        params = augment.identity_params(n, "cpu")
    else:
        params = augment.draw_params(n, generator=torch.Generator().manual_seed(3), device="cpu")
        assert params.flip.any() and (params.angle != 0).any()
    (ours_x, ours_y), (base_x, base_y) = _both_loaders(bench_data, params)
    assert base_x.shape == ours_x.shape == (n, 3, INPUT, INPUT)
    assert base_x.dtype == ours_x.dtype == torch.float32
    assert base_y.shape == ours_y.shape == (n, 98, 2) and base_y.dtype == ours_y.dtype
    # Targets: the same geometry, composed through the crop (ours) or straight from the image (baseline).
    assert (base_y - ours_y).abs().max().item() * INPUT < 1e-3
    # Pixels: ours went through one extra bilinear resampling and a JPEG (q95) round trip; both are
    # zero outside the image. A misplaced, mirrored or turned view would differ by tens of grey levels.
    per_face = (base_x - ours_x).abs().mean(dim=(1, 2, 3)) * GREY
    assert per_face.max().item() < 5.0, per_face
    assert np.corrcoef(base_x.flatten(), ours_x.flatten())[0, 1] > 0.99
    assert base_x.mean().item() == pytest.approx(ours_x.mean().item(), abs=0.02)
    assert base_x.std().item() == pytest.approx(ours_x.std().item(), rel=0.03)


def test_a_different_view_is_detected(bench_data):
    """The check above can fail: mirroring only the baseline's view breaks the agreement."""
    n = len(bench_data.records()[0])
    identity = augment.identity_params(n, "cpu")
    (ours_x, _), _ = _both_loaders(bench_data, identity)
    flipped = augment.ViewParams(
        torch.ones(n, dtype=torch.bool), identity.scale, identity.angle, identity.shift
    )
    _, (base_x, _) = _both_loaders(bench_data, flipped)
    assert (base_x - ours_x).abs().mean().item() * GREY > 5.0


def test_baseline_draws_a_new_augmentation_per_sample(bench_data):
    paths, landmarks = bench_data.records()
    augmentation = default_params().augment
    dataset = loader.ReferenceStyleDataset(
        paths, landmarks, augmentation=augmentation, bbox="landmarks", padding=PADDING, out_size=INPUT
    )
    first, second = dataset[0], dataset[0]
    assert not torch.equal(first[0], second[0])
    plain = loader.ReferenceStyleDataset(
        paths, landmarks, augmentation=None, bbox="landmarks", padding=PADDING, out_size=INPUT
    )
    assert torch.equal(plain[0][0], plain[0][0])


def test_baseline_loader_batches_like_ours(bench_data):
    paths, landmarks = bench_data.records()
    augmentation = default_params().augment
    dataset = loader.ReferenceStyleDataset(
        paths, landmarks, augmentation=augmentation, bbox="landmarks", padding=PADDING, out_size=INPUT
    )
    batches = list(
        loader.baseline_loader(dataset, batch_size=4, batches=3, workers=1, pin_memory=False, seed=0)
    )
    assert len(batches) == 3
    assert all(x.shape == (4, 3, INPUT, INPUT) and y.shape == (4, 98, 2) for x, y in batches)


def test_loader_bench_writes_its_json(tmp_path, capsys):
    out = tmp_path / "out"
    run_wflw(
        "bench loader --faces 6 --batches 2 --warmup 1 --repeats 2 --workers 1 --set train.batch_size=3 "
        "--set data.synthetic.min_image_size=128 --set data.synthetic.max_image_size=160 "
        "--set convert.crop_size=48",
        *TINY,
        *["--work", str(tmp_path / "work"), "--out", str(out)],
    )
    result = json.loads((out / "loader.json").read_text())
    assert result["mode"] == "loader" and result["faces"] == 6 and result["batch_size"] == 3
    assert result["command"].startswith("wflw bench loader")
    assert {"date", "cpu_model", "cpus", "torch", "device"} <= set(result["machine"])
    for side in ("ours", "baseline"):
        assert len(result[side]["runs_images_per_s"]) == 2
        assert result[side]["images_per_s"] == pytest.approx(np.median(result[side]["runs_images_per_s"]))
    assert result["baseline"]["workers"] == 1
    assert result["ratio"] == pytest.approx(
        result["ours"]["images_per_s"] / result["baseline"]["images_per_s"]
    )
    assert result["image_size_px"]["min"] >= 128 and result["image_size_px"]["max"] <= 160
    assert "| ours (on-device batch warp)" in capsys.readouterr().out
    # a second run reuses the generated data
    assert (tmp_path / "work" / "bench_data.json").is_file()
