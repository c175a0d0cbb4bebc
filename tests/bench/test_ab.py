"""`wflw bench ab`: the params and their variants trained on the same faces, compared face by face."""

import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import tiny_parquet
from pipeline_cli import params_file

from wflw_pipeline import cli
from wflw_pipeline.bench.ab import parse_variant
from wflw_pipeline.bench.common import BenchError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab")
    return tiny_parquet(root, test=8), params_file(root, enabled=False)


def _ab(data, tmp_path, *variants: list[str]) -> int:
    parquet, params = data
    words = ["bench", "ab", "--params", str(params), "--parquet", str(parquet)]
    words += ["--work", str(tmp_path / "work"), "--out", str(tmp_path)]
    return cli.main(words + [w for variant in variants for w in ("--variant", *variant)])


def _per_face_nme(folder) -> np.ndarray:
    table = pq.read_table(folder / "eval" / "per_face.parquet").sort_by("face_id")
    return table.column("nme").to_numpy()


def test_each_variant_is_trained_on_the_same_faces_and_compared_face_by_face(data, tmp_path):
    same, head = ["same_seed", "train.seed=0"], ["mmpose_head", "model.head_init=normal"]

    assert _ab(data, tmp_path, same, head) == 0

    result = json.loads((tmp_path / "ab.json").read_text())
    assert result["mode"] == "ab"
    repeat, other = result["variants"]
    assert (repeat["name"], other["name"]) == ("same_seed", "mmpose_head")
    # the same params again (train.seed is 0 already): the same training, to the last bit
    assert repeat["delta"] == 0.0 and repeat["verdict"] == "no clear difference"
    interval = repeat["interval"]
    assert (interval["low"], interval["high"], interval["faces"]) == (0.0, 0.0, 8)
    work = tmp_path / "work"
    diff = _per_face_nme(work / "mmpose_head") - _per_face_nme(work / "baseline")
    assert other["interval"]["mean"] == pytest.approx(diff.mean()) and diff.any()
    assert other["test_nme"] == pytest.approx(result["baseline"]["test_nme"] + other["delta"])
    assert not (tmp_path / "mlflow.db").exists() and not (data[1].parent / "mlflow.db").exists()


def test_a_finished_variant_is_reused_and_a_changed_one_trained_again(data, tmp_path, caplog):
    head = ["mmpose_head", "model.head_init=normal"]
    assert _ab(data, tmp_path, head) == 0
    work = tmp_path / "work"
    models = {
        name: (work / name / "model" / "model.pt").stat().st_mtime_ns for name in ("baseline", "mmpose_head")
    }
    caplog.clear()
    caplog.set_level(logging.INFO, logger="wflw_pipeline")

    assert _ab(data, tmp_path, ["mmpose_head", "model.head_init=normal", "train.epochs=1"]) == 0

    assert f"{work / 'baseline'}: reusing the finished training" in caplog.text
    assert (work / "baseline" / "model" / "model.pt").stat().st_mtime_ns == models["baseline"]
    assert (work / "mmpose_head" / "model" / "model.pt").stat().st_mtime_ns != models["mmpose_head"]


def test_a_bad_variant_stops_before_any_training(data, tmp_path, caplog):
    assert _ab(data, tmp_path, ["ok", "model.head_init=normal"], ["typo", "model.head_init=zeros"]) == 2
    assert "model.head_init: must be one of mean_shape, normal; found 'zeros'" in caplog.text
    assert not (tmp_path / "work").exists()


def test_a_variant_is_a_name_then_overrides():
    assert parse_variant(["v", "a.b=1", "c=[1, 2]"]).overrides == ("a.b=1", "c=[1, 2]")
    with pytest.raises(BenchError, match="--variant v: give at least one KEY=VALUE override after the name"):
        parse_variant(["v"])
    with pytest.raises(BenchError, match="start with a name"):
        parse_variant(["a.b=1"])
    with pytest.raises(BenchError, match="start with a name"):
        parse_variant(["baseline", "a.b=1"])
