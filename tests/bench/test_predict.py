"""`wflw bench predict`: both backends on the same photos, each face found, figures that add up."""

import json
from pathlib import Path

from helpers import PARAMS_YAML, tiny_trained

from wflw_pipeline import cli


def test_predict_bench_times_pytorch_and_onnxruntime_on_the_same_faces(tmp_path):
    model = tiny_trained(tmp_path / "model")[1]
    words = [
        "bench",
        "predict",
        "--checkpoint",
        str(model),
        "--images",
        "3",
        "--repeats",
        "2",
        "--set",
        "predict.device=cpu",
    ]
    paths = ["--work", str(tmp_path / "work"), "--out", str(tmp_path), "--params", str(PARAMS_YAML)]
    assert cli.main([*words, *paths]) == 0
    result = json.loads((tmp_path / "predict.json").read_text())
    assert result["mode"] == "predict" and result["images"] == 3 and result["onnx_max_abs_diff_px"] < 1e-3
    torch_row, onnx_row = result["rows"]
    assert (torch_row["backend"], onnx_row["backend"]) == ("pytorch", "onnxruntime")
    for row in (torch_row, onnx_row):
        assert (row["faces"], row["failures"], len(row["runs"])) == (3, 0, 2)  # one face per photo
        assert row["faces_per_s"] > 0 and set(row["ms_per_face"]) == {"decode", "detect", "crop+model"}
    assert (
        torch_row["ratio"] == 1.0 and onnx_row["ratio"] == onnx_row["faces_per_s"] / torch_row["faces_per_s"]
    )
    assert sorted(p.name for p in (tmp_path / "work" / "photos").iterdir()) == [
        "photo_000_480.jpg", "photo_001_640.jpg", "photo_002_800.jpg",
    ]  # fmt: skip
    assert not list(Path(tmp_path).glob("*.overlay.png"))
