import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import default_params, tiny_trained
from paths import ROOT
from torch import nn

from wflw_pipeline import cli, evaluate
from wflw_pipeline.core import engine, geometry, report
from wflw_pipeline.core.geometry import CropRule, View
from wflw_pipeline.core.metrics import MetricsError, auc, ced, failure_rate, mean_shape_nme, nme_per_face
from wflw_pipeline.core.model import IMAGENET
from wflw_pipeline.core.runtime import Precision
from wflw_pipeline.data import contract, wflw
from wflw_pipeline.data.dataset import FaceSet, load_faces

SUBSET_KEYS = {"test", "pose", "expression", "illumination", "makeup", "occlusion", "blur"}
EVAL = replace(default_params().evaluate, device="cpu", batch_size=4, grid_faces=2)


# ---------------------------------------------------------------- metrics, by hand


def _face(iod: float = 10.0) -> np.ndarray:
    """98 points on a line; the eye corners 60 and 72 are `iod` apart."""
    points = np.zeros((98, 2))
    points[:, 0] = np.linspace(0, 20, 98)
    points[wflw.LEFT_EYE_OUTER] = (0.0, 5.0)
    points[wflw.RIGHT_EYE_OUTER] = (iod, 5.0)
    return points


def test_a_face_exactly_at_the_threshold_is_no_failure_and_counts_in_the_ced():
    gt = np.stack([_face(), _face()])
    pred = gt.copy()
    pred[0] += (1.0, 0.0)  # every point 1 px off, inter-ocular distance 10: NME exactly 0.1
    pred[1] += (0.0, 2.0)  # NME 0.2
    nme = nme_per_face(pred, gt)
    assert nme.tolist() == [0.1, 0.2]
    assert failure_rate(nme, 0.1) == 0.5
    assert ced(nme, np.array([0.0999, 0.1, 0.2])).tolist() == [0.0, 0.5, 1.0]


def test_the_mean_shape_nme_worked_out_by_hand():
    gt = np.zeros((1, wflw.NUM_POINTS, 2))
    gt[0, wflw.RIGHT_EYE_OUTER] = (4.0, 0.0)  # inter-ocular distance 4
    shape = np.full((wflw.NUM_POINTS, 2), 0.5)  # the input's centre: crop pixel (2, 2) for crop 4, context 2
    # every point sqrt(2^2 + 2^2) px away (point 72 too), over 4 -> 0.7071, in %
    assert mean_shape_nme(shape, 4, 2.0, gt) == pytest.approx(50 * np.sqrt(2), abs=1e-12)


def test_fr_ced_and_auc_of_a_small_set_worked_out_by_hand():
    nme = np.array([0.15, 0.02, 0.1, 0.05])
    assert failure_rate(nme, 0.1) == 0.25
    assert failure_rate(nme, 0.04) == 0.75
    assert ced(nme, np.array([0.0, 0.02, 0.03, 0.05, 0.1, 0.2])).tolist() == [0, 0.25, 0.25, 0.5, 0.75, 1]
    # CED steps: 0.25 on [0.02, 0.05), 0.5 on [0.05, 0.1), 0.75 at 0.1:
    # area = 0.25 * 0.03 + 0.5 * 0.05 = 0.0325, over 0.1 -> 0.325
    assert auc(nme, 0.1) == pytest.approx(0.325, abs=1e-12)
    # up to 0.05: area = 0.25 * 0.03 = 0.0075, over 0.05 -> 0.15
    assert auc(nme, 0.05) == pytest.approx(0.15, abs=1e-12)
    assert auc(np.zeros(3), 0.1) == 1.0 and auc(np.full(3, 0.3), 0.1) == 0.0


def test_exact_auc_is_what_a_fine_grid_tends_to():
    nme = np.random.default_rng(0).gamma(2.0, 0.025, size=200)
    grid = np.linspace(0, 0.1, 100_001)
    assert auc(nme, 0.1) == pytest.approx(np.trapezoid(ced(nme, grid), grid) / 0.1, abs=1e-4)


def test_zero_inter_ocular_distance_and_shape_mismatch_are_clear_errors():
    gt = np.stack([_face(), _face(iod=0.0)])
    with pytest.raises(MetricsError, match=r"zero inter-ocular distance .* face 1"):
        nme_per_face(gt + 1, gt)
    with pytest.raises(MetricsError, match=r"\(faces, 98, 2\).*\(2, 98, 2\) and \(1, 98, 2\)"):
        nme_per_face(gt, gt[:1])
    with pytest.raises(MetricsError, match=r"\(faces, 98, 2\)"):
        nme_per_face(np.zeros((1, 68, 2)), np.zeros((1, 68, 2)))
    with pytest.raises(MetricsError, match=r"1-D array.*\(2, 2\)"):
        failure_rate(np.zeros((2, 2)))
    with pytest.raises(MetricsError, match="no faces"):
        auc(np.zeros(0))
    with pytest.raises(MetricsError, match="finite"):
        ced(np.array([0.1, np.nan]), np.array([0.1]))
    with pytest.raises(MetricsError, match="threshold"):
        auc(np.array([0.1]), 0.0)


def test_crop_to_image_applies_each_faces_affine():
    matrices = np.array([[[2.0, 0.0, 10.0], [0.0, 2.0, 20.0]], [[1.0, 0.0, -5.0], [0.0, 1.0, 0.0]]])
    points = np.array([[[1.0, 1.0]], [[3.0, 4.0]]])
    assert geometry.crop_to_image(points, matrices).tolist() == [[[12.0, 22.0]], [[-2.0, 4.0]]]


# ---------------------------------------------------------------- flip test


class _Constant(nn.Module):
    """A 'model' that predicts the same normalised shape for every input."""

    def __init__(self, shape: torch.Tensor) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shape.expand(x.shape[0], *self.shape.shape)


def _random_faces(n: int = 3, size: int = 48) -> FaceSet:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return FaceSet(
        images,
        torch.zeros(n, 98, 2),
        torch.zeros(n, 6, dtype=torch.bool),
        torch.arange(n),
        np.zeros((n, 2, 3)),
        {"crop_size": size, "context": 1.5},
    )


def _predict(shape: torch.Tensor, flip_test: bool) -> torch.Tensor:
    return engine.predict(
        _Constant(shape),
        _random_faces(),
        view=View(48, 1.5, 32),
        batch_size=2,
        precision=Precision(None, channels_last=False),
        normalize=IMAGENET,
        flip_test=flip_test,
    )


def _to_crop(normalised: torch.Tensor) -> torch.Tensor:
    """Normalised input units -> crop pixels for the plain view: the central 48 / 1.5 = 32 px of the crop."""
    return (normalised - 0.5) * 32 + 24


def test_flip_test_keeps_a_left_right_symmetric_shape():
    shape = torch.rand(98, 2, generator=torch.Generator().manual_seed(1))
    for i, j in enumerate(wflw.FLIP):
        if i < j:
            shape[j] = torch.stack([1 - shape[i, 0], shape[i, 1]])
        elif i == j:
            shape[i, 0] = 0.5
    plain, flipped = _predict(shape, False), _predict(shape, True)
    assert torch.allclose(plain, _to_crop(shape).expand(3, 98, 2), atol=1e-5)
    assert torch.allclose(flipped, plain, atol=1e-5)


def test_flip_test_of_a_constant_asymmetric_shape_averages_it_with_its_mirror():
    shape = torch.rand(98, 2, generator=torch.Generator().manual_seed(2)) * 0.6  # all x left of 0.6
    # The mirrored view's output, un-flipped: point i is point FLIP[i] of the output at x' = 1 - x.
    mirror = shape[list(wflw.FLIP)].clone()
    mirror[:, 0] = 1 - mirror[:, 0]
    expected = _to_crop((shape + mirror) / 2)
    flipped = _predict(shape, True)
    assert torch.allclose(flipped, expected.expand(3, 98, 2), atol=1e-5)
    # e.g. the chin (16, its own mirror) lands at x = 0.5 exactly: the centre line
    assert torch.allclose(flipped[:, wflw.CHIN, 0], torch.tensor(24.0), atol=1e-5)
    assert not torch.allclose(flipped, _predict(shape, False), atol=1e-2)
    # The same by hand, not through wflw.FLIP: every point at the centre (0.5, 0.5) but the outer eye
    # corners, 60 at (0.2, 0.4) and 72 at (0.6, 0.3). The mirror's 60 is its 72 at x' = 1 - 0.6 = 0.4:
    # 60 -> ((0.2 + 0.4) / 2, (0.4 + 0.3) / 2) = (0.3, 0.35), 72 -> ((0.6 + 0.8) / 2, 0.35) = (0.7, 0.35);
    # in crop px, (u - 0.5) * 32 + 24: x 17.6 and 30.4, y 19.2; every other point stays at (24, 24).
    corners = torch.full((98, 2), 0.5)
    corners[60], corners[72] = torch.tensor([0.2, 0.4]), torch.tensor([0.6, 0.3])
    by_hand = torch.full((98, 2), 24.0)
    by_hand[60], by_hand[72] = torch.tensor([17.6, 19.2]), torch.tensor([30.4, 19.2])
    assert torch.allclose(_predict(corners, True), by_hand.expand(3, 98, 2), atol=1e-4)


# ---------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(parquet dir, model.pt) of a resnet18 trained 1 epoch at input 32 on 10 + 8 hand-made faces."""
    return tiny_trained(tmp_path_factory.mktemp("eval"))


def test_the_stage_writes_every_output_with_the_documented_keys(trained, tmp_path):
    parquet_dir, model_path = trained
    out = tmp_path / "eval"
    metrics = evaluate.run_evaluate(EVAL, model_path, parquet_dir, out)

    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    assert set(saved) == SUBSET_KEYS | {"val", "mean_shape", "config"}
    assert saved["mean_shape"]["nme"] > 0
    assert saved["config"]["flip_test"] is True and saved["config"]["input_size"] == 32
    for key in [*SUBSET_KEYS, "val"]:
        assert set(saved[key]) == {"nme", "fr", "auc", "n"}, key
        assert saved[key]["nme"] > 0 and 0 <= saved[key]["fr"] <= 100 and 0 <= saved[key]["auc"] <= 1
    flags = pq.read_table(parquet_dir / "test.parquet", columns=list(wflw.ATTRIBUTES))
    assert saved["test"]["n"] == 8 and saved["val"]["n"] == 2
    for attribute in wflw.ATTRIBUTES:
        assert saved[attribute]["n"] == sum(flags.column(attribute).to_pylist()), attribute
    assert (saved["pose"]["n"], saved["blur"]["n"]) == (2, 1)  # faces i with i % 6 == flag index

    per_face = pq.read_table(out / "per_face.parquet").to_pydict()
    assert list(per_face) == ["face_id", "nme", *wflw.ATTRIBUTES]
    assert per_face["face_id"] == list(range(8))
    assert np.mean(per_face["nme"]) == pytest.approx(saved["test"]["nme"])
    pose_nme = [v for v, flag in zip(per_face["nme"], per_face["pose"], strict=True) if flag]
    assert np.mean(pose_nme) == pytest.approx(saved["pose"]["nme"])

    ced_lines = (out / "ced.csv").read_text().splitlines()
    assert ced_lines[0] == "threshold,test,pose,expression,illumination,makeup,occlusion,blur"
    assert len(ced_lines) == 1 + report.CED_STEPS + 1
    assert ced_lines[-1].split(",")[0] == "10"

    results = (out / "results.md").read_text()
    assert (
        "| Arch | Input Size | NME test | pose | illumination | occlusion | blur | makeup | expression |"
        in results
    )
    assert f"| DeepPose R18, Wing (this run) | 32x32 | {saved['test']['nme']:.2f} |" in results
    assert "Face box: `landmarks`" in results and "Flip test: on" in results
    assert "4.64" in results and "(MMPose, the reference) |" not in results  # not real WFLW: no reference row
    for name in ("ced.png", "nme_subsets.png", "best_worst.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not list(out.glob(".*.tmp"))


def test_predictions_are_mapped_to_the_image_before_scoring(trained, tmp_path, monkeypatch):
    """A 'model' 1 crop px right of the truth: NME = 1 / inter-ocular distance in crop px, per face."""
    parquet_dir, model_path = trained

    def one_pixel_off(model, faces, **kwargs):
        return faces.landmarks + torch.tensor([1.0, 0.0])

    monkeypatch.setattr(evaluate, "predict", one_pixel_off)
    evaluate.run_evaluate(replace(EVAL, flip_test=False), model_path, parquet_dir, tmp_path)
    landmarks = load_faces(parquet_dir / "test.parquet").landmarks.double()
    iod = (landmarks[:, wflw.LEFT_EYE_OUTER] - landmarks[:, wflw.RIGHT_EYE_OUTER]).norm(dim=1)
    per_face = pq.read_table(tmp_path / "per_face.parquet").column("nme").to_numpy()
    assert per_face == pytest.approx(100.0 / iod.numpy(), rel=1e-4)


def test_real_wflw_results_sit_beside_the_reference(trained, tmp_path, monkeypatch):
    parquet_dir, model_path = trained
    real_metadata = contract.read_metadata

    def as_real(path):
        return {**real_metadata(path), "source": "wflw"}

    monkeypatch.setattr(evaluate, "read_metadata", as_real)
    metrics = evaluate.run_evaluate(replace(EVAL, flip_test=False), model_path, parquet_dir, tmp_path)
    lines = (tmp_path / "results.md").read_text().splitlines()
    reference = "| DeepPose R50, Wing (MMPose, the reference) | 256x256 | "
    reference += "4.64 | 8.25 | 4.59 | 5.56 | 5.26 | 4.59 | 5.07 |"
    assert reference in lines
    diff = next(line for line in lines if line.startswith("| difference"))
    assert diff.split(" | ")[2] == f"{metrics['test']['nme'] - 4.64:+.2f}"
    assert "Flip test: off" in "\n".join(lines)


def test_a_subset_count_other_than_the_test_lists_is_an_error(trained, tmp_path):
    parquet_dir, model_path = trained
    copy = tmp_path / "parquet"
    shutil.copytree(parquet_dir, copy)
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["test_list_counts"]["pose"] == 2
    summary["test_list_counts"]["pose"] = 3
    (copy / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(evaluate.EvaluateError, match=r"list_98pt_test_largepose.txt lists 3 faces but 2"):
        evaluate.run_evaluate(EVAL, model_path, copy, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_cli_evaluates_a_checkpoint_outside_dvcs_paths(trained, tmp_path, caplog):
    parquet_dir, model_path = trained
    elsewhere = tmp_path / "some" / "where" / "my-model.pt"
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(model_path, elsewhere)
    common = [
        "--params",
        str(ROOT / "params.yaml"),
        "--parquet",
        str(parquet_dir),
        "--out",
        str(tmp_path / "e"),
    ]
    common += [
        "--set",
        "evaluate.device=cpu",
        "--set",
        "evaluate.grid_faces=1",
        "--set",
        "evaluate.flip_test=false",
    ]
    assert cli.main(["evaluate", "--checkpoint", str(elsewhere), *common]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["test"]["n"] == 8 and metrics["config"]["flip_test"] is False
    assert str(elsewhere) in (tmp_path / "e" / "results.md").read_text()
    with caplog.at_level(logging.ERROR):
        assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), *common]) == 2
    assert "missing.pt: trained model not found" in caplog.text


def test_an_empty_subset_gets_null_metrics_and_the_plots_still_draw(trained, tmp_path, monkeypatch, caplog):
    parquet_dir, model_path = trained
    copy = tmp_path / "parquet"
    shutil.copytree(parquet_dir, copy)
    (copy / "summary.json").unlink()
    real_load = evaluate.load_faces

    def no_blur(path, device="cpu"):
        faces = real_load(path, device)
        flags = faces.flags.clone()
        flags[:, wflw.ATTRIBUTES.index("blur")] = False
        return replace(faces, flags=flags)

    monkeypatch.setattr(evaluate, "load_faces", no_blur)
    with caplog.at_level(logging.WARNING):
        metrics = evaluate.run_evaluate(replace(EVAL, flip_test=False), model_path, copy, tmp_path / "e")
    assert "summary.json not found: subset counts are not cross-checked" in caplog.text
    assert metrics["blur"] == {"nme": None, "fr": None, "auc": None, "n": 0}
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["blur"]["nme"] is None
    assert all(line.endswith(",") for line in (tmp_path / "e" / "ced.csv").read_text().splitlines()[1:])
    assert "| – |" in (tmp_path / "e" / "results.md").read_text()
    assert (tmp_path / "e" / "nme_subsets.png").stat().st_size > 0


def test_a_test_split_boxed_otherwise_than_the_training_data_is_warned_about(caplog):
    trained = CropRule("landmarks", 1.25, 1.5, 96)
    meta = {"crop": {"bbox": "rect", "padding": 1.25, "context": 1.5, "crop_size": 96}}
    evaluate._check_crop(trained, meta, Path("model.pt"), Path("test.parquet"))
    assert caplog.messages == [
        "model.pt was trained on faces boxed with convert.bbox=landmarks "
        "but test.parquet was made with bbox=rect"
    ]
