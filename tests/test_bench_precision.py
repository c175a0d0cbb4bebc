"""`wflw bench precision`: the bf16 head as it was, against the fp32 head, on one model."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_trained

from wflw_pipeline import cli
from wflw_pipeline.bench.precision import Bf16Head

ROOT = Path(__file__).resolve().parents[1]


def test_the_bf16_head_rounds_its_output_to_bf16():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 4)
    features = torch.randn(3, 8)
    out = Bf16Head(head)(features)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(features.bfloat16(), head.weight.bfloat16(), head.bias.bfloat16()))
    assert not torch.equal(out.float(), head(features))  # what the fp32 head avoids


@pytest.fixture(scope="module")
def model_and_split(tmp_path_factory) -> tuple[Path, Path]:
    parquet, model = tiny_trained(tmp_path_factory.mktemp("precision"))
    return model, parquet / "test.parquet"


def test_precision_bench_reports_three_settings_against_fp32(model_and_split, tmp_path):
    model, split = model_and_split
    words = ["bench", "precision", "--checkpoint", str(model), "--parquet", str(split), "--device", "cpu"]
    assert cli.main([*words, "--out", str(tmp_path), "--params", str(ROOT / "params.yaml")]) == 0
    result = json.loads((tmp_path / "precision.json").read_text())
    assert result["mode"] == "precision" and result["faces"] == 8 and result["input_size"] == 32
    fp32, default, bf16_head = result["settings"]
    assert fp32["setting"] == "fp32" and fp32["max_shift_px"] == 0.0
    assert default["setting"].startswith("bf16, fp32 head") and bf16_head["setting"].startswith("bf16 thr")
    assert bf16_head["max_shift_px"] > 0
    assert all(row["nme"] > 0 for row in result["settings"])
