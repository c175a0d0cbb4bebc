"""The evaluate stage: `run_evaluate` and `wflw evaluate` (the metrics themselves: tests/core/)."""

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from file_limit import wflw_with_file_limit
from helpers import default_params, tiny_trained
from md_tables import rows, tables
from paths import ROOT

from wflw_pipeline import cli, evaluate
from wflw_pipeline.core import report
from wflw_pipeline.core.geometry import CropRule
from wflw_pipeline.data import contract, wflw
from wflw_pipeline.data.dataset import load_faces

SUBSET_KEYS = {"test", "pose", "expression", "illumination", "makeup", "occlusion", "blur"}
EVAL = replace(default_params().evaluate, device="cpu", batch_size=4, grid_faces=2)


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
    models = tables(results)[0]
    assert models[0][:3] == ["Arch", "Input Size", "NME test"]
    assert models[1][:3] == [
        "DeepPose R18, Wing (this run)",
        "32x32",
        f"{saved['test']['nme']:.2f}",
    ]
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
    results = (tmp_path / "results.md").read_text()
    cells = rows(results)
    reference = ["DeepPose R50, Wing (MMPose, the reference)", "256x256"]
    reference += ["4.64", "8.25", "4.59", "5.56", "5.26", "4.59", "5.07"]
    assert reference in cells
    diff = next(row for row in cells if row[0].startswith("difference"))
    assert diff[2] == f"{metrics['test']['nme'] - 4.64:+.2f}"
    assert "Flip test: off" in results


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
    cells = rows((tmp_path / "e" / "results.md").read_text())
    columns, nme = (
        next(row for row in cells if row[0] == ""),
        next(row for row in cells if row[0] == "NME (%)"),
    )
    assert nme[columns.index("blur")] == "–"
    assert (tmp_path / "e" / "nme_subsets.png").stat().st_size > 0


def test_a_test_split_boxed_otherwise_than_the_training_data_is_warned_about(caplog):
    trained = CropRule("landmarks", 1.25, 1.5, 96)
    meta = {"crop": {"bbox": "rect", "padding": 1.25, "context": 1.5, "crop_size": 96}}
    evaluate._check_crop(trained, meta, Path("model.pt"), Path("test.parquet"))
    assert caplog.messages == [
        "model.pt was trained on faces boxed with convert.bbox=landmarks "
        "but test.parquet was made with bbox=rect"
    ]


def test_no_room_for_the_outputs_is_one_line_and_the_old_outputs_stay(trained, tmp_path):
    parquet_dir, model_path = trained
    out = tmp_path / "e"
    out.mkdir()
    (out / "metrics.json").write_text('{"old": true}\n')
    command = ["evaluate", "--params", str(ROOT / "params.yaml"), "--checkpoint", str(model_path),
               "--parquet", str(parquet_dir), "--out", str(out),
               "--set", "evaluate.device=cpu", "--set", "evaluate.grid_faces=1"]  # fmt: skip
    done = wflw_with_file_limit(512, *command, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1].endswith(
        f" ERROR wflw_pipeline: cannot write to {out}/: File too large (errno 27); free some space there or "
        "write the outputs elsewhere (the files already there are unchanged)"
    )
    assert "Traceback" not in done.stderr
    assert [p.name for p in out.iterdir()] == ["metrics.json"] and (
        out / "metrics.json"
    ).read_text() == '{"old": true}\n'
