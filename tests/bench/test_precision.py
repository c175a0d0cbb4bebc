"""`wflw bench precision`: bf16 autocast (fp32 head) against fp32, on one model."""

import json
from pathlib import Path

import pytest
from helpers import tiny_trained
from paths import ROOT

from wflw_pipeline import cli


@pytest.fixture(scope="module")
def model_and_split(tmp_path_factory) -> tuple[Path, Path]:
    parquet, model = tiny_trained(tmp_path_factory.mktemp("precision"))
    return model, parquet / "test.parquet"


def test_precision_bench_reports_bf16_against_fp32(model_and_split, tmp_path):
    model, split = model_and_split
    words = ["bench", "precision", "--checkpoint", str(model), "--parquet", str(split)]
    words += ["--set", "evaluate.device=cpu"]
    assert cli.main([*words, "--out", str(tmp_path), "--params", str(ROOT / "params.yaml")]) == 0
    result = json.loads((tmp_path / "precision.json").read_text())
    assert result["mode"] == "precision" and result["faces"] == 8 and result["input_size"] == 32
    fp32, bf16 = result["settings"]
    assert fp32["setting"] == "fp32" and fp32["max_shift_px"] == 0.0
    assert bf16["setting"].startswith("bf16, fp32 head") and bf16["max_shift_px"] > 0
    assert all(row["nme"] > 0 for row in result["settings"])
