"""A copy of this repository to run the real pipeline in (DVC, Prefect), with tiny params and the environment
its commands need."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from paths import ROOT

BIN = Path(sys.executable).parent
UNSET = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DVC_EXP_NAME", "DVC_ROOT", "PREFECT__FLOW_RUN_ID")
"""Environment of the calling process that would send the stages' MLflow elsewhere or tag the runs."""
GIT_USER = {"NAME": "t", "EMAIL": "t@t"}


def repo_copy(dest: Path) -> Path:
    """The files git would put in a clone (tracked plus untracked, not ignored) in a fresh git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def tiny_params(repo: Path) -> dict:
    """Shrink `repo`'s params.yaml to a pipeline of seconds (24 + 12 faces, 32 px, 1 epoch); return them."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["synthetic"].update(train_faces=24, test_faces=12, max_image_size=400)
    params["convert"].update(crop_size=64, val_fraction=0.25)
    params["model"].update(input_size=32)
    params["train"].update(epochs=1, batch_size=8, warmup_iters=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def pipeline_env(repo: Path) -> dict[str, str]:
    """This environment minus UNSET, the venv's scripts first on PATH, `repo`'s own code first on PYTHONPATH,
    a git identity (for `dvc exp`), no analytics or telemetry (no network beyond loopback)."""
    return {
        **{key: value for key, value in os.environ.items() if key not in UNSET},
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo / "src"),
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **{f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER") for what, value in GIT_USER.items()},
    }
