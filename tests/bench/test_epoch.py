"""`wflw bench epoch` (bench/epoch.py): whole epochs timed, and the reference schedule projected.

Benchmarks never assert a speed: these tests check what is measured, not how fast.
"""

import json

import pytest
from bench_support import TINY, run_wflw
from helpers import default_params


def test_epoch_bench_writes_its_json_and_projects_the_reference_schedule(tmp_path):
    out = tmp_path / "out"
    run_wflw(
        "bench epoch --faces 10 --epochs 2 --set train.batch_size=4 --set convert.crop_size=48",
        *TINY,
        *["--out", str(out)],
    )
    result = json.loads((out / "epoch.json").read_text())
    assert result["mode"] == "epoch" and result["compile"] is False
    assert [row["epoch"] for row in result["epochs"]] == [1, 2]
    assert all(row["images"] == 8 for row in result["epochs"])  # drop_last: 2 full batches of 4
    assert result["images_per_s"] == pytest.approx(result["epochs"][1]["images_per_s"])
    params = default_params()  # the schedule of params.yaml: 20 epochs of 1,500 faces (375 batches of 4)
    epochs, faces = params.train.epochs, params.data.synthetic.train_faces
    assert result["reference"] == {"faces": faces, "epochs": epochs, "images": epochs * faces}
    assert result["projected_reference_s"] == pytest.approx(epochs * faces / result["images_per_s"])
    assert result["projected_reference_with_warmup_s"] >= result["projected_reference_s"]
