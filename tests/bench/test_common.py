"""bench/common.py, and `wflw bench` as a whole: it is in no stage, the GPU path (scripts/gpu_check.sh)
imports only the torch stack, and its smoke runs every step.
"""

import itertools
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import default_params
from paths import ROOT

from wflw_pipeline import stage_code
from wflw_pipeline.bench import common
from wflw_pipeline.core.runtime import Precision
from wflw_pipeline.data.dataset import random_faces


def test_bench_is_in_no_stage_and_its_own_closure_holds_the_engine():
    """Other stages never depend on bench (dvc deps, train's code digest); `wflw bench` runs engine.py; the
    speed modes time the engine itself, and only `bench ab` trains and evaluates as the stages do."""
    package = ROOT / "src" / "wflw_pipeline"
    for stage in ("fetch", "convert", "train", "evaluate", "preview"):
        assert not [p for p in stage_code.stage_sources(stage) if "bench" in p.relative_to(package).parts]
    own = {str(p.relative_to(package)) for p in stage_code.stage_sources("bench")}
    expected = {"bench/__init__.py", "bench/cli.py", "bench/common.py", "bench/loader.py", "bench/step.py"}
    assert expected | {"bench/epoch.py", "bench/ab.py", "core/engine.py", "core/optim.py"} <= own
    speed_modes = ("common", "epoch", "loader", "precision", "predict", "start", "step")
    speed = stage_code.closure(f"wflw_pipeline.bench.{mode}" for mode in speed_modes)
    assert not {"wflw_pipeline.train", "wflw_pipeline.evaluate"} & speed
    assert {"wflw_pipeline.train", "wflw_pipeline.evaluate"} <= stage_code.closure(["wflw_pipeline.bench.ab"])


def test_the_gpu_path_imports_only_the_torch_stack():
    """gpu_check.sh runs on a box with the torch stack only: nothing it calls may import these."""
    code = (
        "import sys; from wflw_pipeline import cli, train, evaluate, convert; "
        "from wflw_pipeline.data import synthetic; from wflw_pipeline.core import engine; "
        "from wflw_pipeline.bench import ab, cli as bench_cli, common, epoch, loader, step; "
        "cli.build_parser(); bench_cli.build_parser(); "
        "bad = [m for m in ('requests', 'gdown', 'dvc', 'mlflow', 'prefect') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_repeats_of_a_figure_their_median_and_a_failed_requirement():
    assert common.median([3.0, 1.0, 2.0, 10.0]) == 2.5
    assert common.format_runs([1234.4, 5.678, 0.1234]) == "1234 5.68 0.123"
    common.require(True, "never raised")
    with pytest.raises(common.BenchError, match=r"^--faces must be at least 2$"):
        common.require(False, "--faces must be at least 2")


def test_endless_batches_go_on_epoch_after_epoch():
    base = default_params()
    params = replace(base, model=replace(base.model, input_size=32), train=replace(base.train, batch_size=4))
    faces = random_faces(6, 48, 1.5, "cpu")  # one full batch of 4 per epoch (the short one is dropped)
    batches = [
        (x.clone(), y.clone())
        for x, y in itertools.islice(common.endless_batches(faces, params, Precision(None, False)), 3)
    ]
    assert [(tuple(x.shape), tuple(y.shape)) for x, y in batches] == [((4, 3, 32, 32), (4, 98, 2))] * 3
    assert not torch.equal(batches[0][0], batches[1][0])  # epoch 2 is drawn anew


BLOCKER = """
import importlib.abc, sys

class _TorchStackOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"requests", "gdown", "dvc", "mlflow", "prefect"}:
            raise ModuleNotFoundError(f"No module named {name!r} (the GPU box has the torch stack only)")
        return None

sys.meta_path.insert(0, _TorchStackOnly())
"""


def _gpu_check_smoke(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh` (plus `env`) with the orchestration stack blocked
    from importing, results in tmp_path/out; it must exit 0."""
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCKER)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(tmp_path / "block"),
        "OUT": str(tmp_path / "out"),
        "GPU_CHECK_WORK": str(tmp_path / "work"),
        "GPU_CHECK_SMOKE": "1",
        **env,
    }
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_with_the_torch_stack_only(tmp_path):
    """scripts/gpu_check.sh with every size shrunk, where requests, dvc, mlflow and prefect cannot import."""
    done = _gpu_check_smoke(tmp_path)
    assert "non-torch-stack modules imported: none" in done.stdout
    produced = {p.name for p in (tmp_path / "out").iterdir()}
    expected = {
        "train_step.json",
        "epoch.json",
        "loader.json",
        "pipeline_history.csv",
        "pipeline_metrics.json",
        "start.json",
    }
    assert expected | {"gpu_check.log"} <= produced and len(produced) <= 8  # $OUT returns at most 8 files
    assert json.loads((tmp_path / "out" / "train_step.json").read_text())["complete"] is True


@pytest.mark.slow
def test_gpu_check_ab_smoke_runs_each_ab_step_with_the_torch_stack_only(tmp_path):
    """GPU_CHECK_AB=1 with every size shrunk: the A/B steps' command lines run (their GPU variant lists
    parsed first), each writes ab_<step>/train_step.json, and steps 1-5 do not run."""
    done = _gpu_check_smoke(tmp_path, GPU_CHECK_AB="1")
    assert "A/B variants: " in done.stdout and "=== epoch" not in done.stdout
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {
        "gpu_check.log",
        *(f"ab_{s}" for s in ("options", "batch", "coord", "autotune")),
    }
    options = json.loads((out / "ab_options" / "train_step.json").read_text())
    assert options["complete"] and {n["variant"] for n in options["not_run"]} == {"graph-step", "graph-eager"}
    assert json.loads((out / "ab_batch" / "train_step.json").read_text())["batch_sizes"] == [4, 8]
