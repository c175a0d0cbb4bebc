"""Stage register (register.py) against a real SQLite-backed MLflow: the inputs it checks (a missing output
names the stage to run, a corrupt model.pt fails in one line), a missing run reference rebuilds the run, and
with tracking off neither train nor register imports MLflow.

Which run register completes, and how, is mlops/pipeline_run.py's (tests/mlops/test_pipeline_run.py)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from helpers import tiny_parquet
from pipeline_cli import params_file, register, registered
from tracked_pipeline import runs


def test_tracking_disabled_imports_no_mlflow(tmp_path):
    tiny_parquet(tmp_path, test=8)
    params_file(tmp_path, enabled=False)
    script = (
        "import sys\nfrom wflw_pipeline import cli\n"
        f"p = ['--params', {str(tmp_path / 'params.yaml')!r}]\n"
        f"assert cli.main(['train', '--parquet', {str(tmp_path / 'parquet')!r}, '--model-dir', "
        f"{str(tmp_path / 'model')!r}, '--train-dir', {str(tmp_path / 'train')!r}, *p]) == 0\n"
        f"assert cli.main(['register', '--out', {str(tmp_path / 'register')!r}, *p]) == 0\n"
        "assert not [m for m in sys.modules if m.startswith('mlflow')], 'mlflow imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert json.loads((tmp_path / "train" / "mlflow_run.json").read_text())["run_id"] is None
    assert json.loads((tmp_path / "register" / "registered.json").read_text())["run_id"] is None
    assert not (tmp_path / "mlflow.db").exists()


def test_a_corrupt_model_fails_register_in_one_line(pipeline, caplog):
    (pipeline / "model" / "model.pt").write_bytes(b"not a checkpoint")
    assert register(pipeline) == 2
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "model.pt" in error.getMessage() and "cannot read a trained model" in error.getMessage()


def test_missing_inputs_fail_in_one_line_and_a_missing_run_id_rebuilds_the_run(pipeline, caplog):
    per_face = pipeline / "eval" / "per_face.parquet"
    per_face.rename(pipeline / "per_face.parquet")
    assert register(pipeline) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error == f"{per_face} not found: run `wflw evaluate` (or `dvc repro`) first"
    (pipeline / "per_face.parquet").rename(per_face)
    (pipeline / "train" / "mlflow_run.json").unlink()
    assert register(pipeline) == 0
    assert registered(pipeline)["run_origin"] == "rebuilt from the DVC outputs"
    assert len(runs(pipeline)) == 2
