"""The registry's aliases (mlops/registry.py) against a real SQLite-backed MLflow, through `wflw promote`,
`rollback` and `models`: the gate, --force with its reason, rollback, and the listing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from helpers import tiny_parquet
from md_tables import rows
from pipeline_cli import register, wflw
from tracked_pipeline import mlflow_client


def _variant(root: Path, name: str, delta: float) -> str:
    """A copy of eval/ whose per-face NME (and the NMEs in metrics.json) are shifted by `delta` points, with a
    mean-shape NME of 100 (the hand-made faces share one shape, so their own mean shape is exact: NME 0)."""
    out = root / name
    shutil.copytree(root / "eval", out)
    table = pq.read_table(out / "per_face.parquet")
    shifted = pc.add(table.column("nme"), delta)
    pq.write_table(
        table.set_column(table.schema.get_field_index("nme"), "nme", shifted), out / "per_face.parquet"
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for split in metrics.values():
        if isinstance(split, dict) and split.get("nme") is not None and "n" in split:
            split["nme"] += delta
    metrics["mean_shape"] = {"nme": 100.0}
    (out / "metrics.json").write_text(json.dumps(metrics))
    return name


def test_a_first_candidate_no_better_than_the_mean_shape_is_refused_unless_forced(pipeline, capsys, caplog):
    assert register(pipeline) == 0
    assert wflw(pipeline, "promote") == 1
    out = capsys.readouterr().out
    assert (
        "REFUSE\n  test NME " in out
        and "not lower than always predicting the mean training shape (0.000)" in out
    )
    client = mlflow_client(pipeline)
    assert "champion" not in client.get_registered_model("m").aliases
    assert wflw(pipeline, "promote", "--force", "--reason", "a demo needs one") == 0
    assert "champion -> version 1 (force)" in capsys.readouterr().out
    assert client.get_model_version("m", "1").tags["wflw.promotion_reason"] == "a demo needs one"


def test_promotion_gate_force_and_rollback(pipeline, capsys):
    assert register(pipeline, _variant(pipeline, "first", 0.0)) == 0
    assert wflw(pipeline, "promote") == 0
    assert "champion -> version 1 (first)" in capsys.readouterr().out
    assert register(pipeline, _variant(pipeline, "better", -1.0)) == 0
    assert wflw(pipeline, "promote") == 0
    out = capsys.readouterr().out
    assert "PROMOTE" in out and "champion -> version 2 (promote)" in out and "v1" in out
    assert register(pipeline, _variant(pipeline, "worse", +1.0)) == 0
    assert wflw(pipeline, "promote", "--version", "3") == 1
    out = capsys.readouterr().out
    assert "REFUSE" in out and "nme_blur" in out and "v3" in out
    other = pipeline / "other"
    tiny_parquet(other, test=9)
    assert register(pipeline, _variant(pipeline, "other_eval", -2.0), parquet="other/parquet") == 0
    assert wflw(pipeline, "promote", "--version", "4") != 0
    assert "other test data" in capsys.readouterr().out
    client = mlflow_client(pipeline)
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    assert wflw(pipeline, "promote", "--version", "3", "--force") == 2
    assert wflw(pipeline, "promote", "--version", "3", "--force", "--reason", "hotfix for demo") == 0
    assert str(client.get_model_version_by_alias("m", "champion").version) == "3"
    forced = client.get_model_version("m", "3").tags
    assert forced["wflw.promotion_reason"] == "hotfix for demo" and forced["wflw.promoted_from"] == "2"
    assert client.get_model_version("m", "2").tags["wflw.demoted_by"] == "3"
    assert wflw(pipeline, "rollback") == 0
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    capsys.readouterr()
    assert wflw(pipeline, "models") == 0
    listing = capsys.readouterr().out
    assert [row[:2] for row in rows(listing)[1:]] == [
        ["1", "-"],
        ["2", "champion"],
        ["3", "-"],
        ["4", "challenger"],
    ]
    assert "force" in listing and "rollback" in listing and "hotfix for demo" in listing
