"""What a tracked run records about where it came from: flattened params, run name, git, DVC and the caller.

Plain data for tracking (no MLflow here): everything is a string-valued mapping ready to be a tag or param.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..params import Params

DVC_EXPERIMENT_ENV = "DVC_EXP_NAME"
"""Set by `dvc exp run` for the stages it runs (dvc.env.DVC_EXP_NAME)."""
DVC_ROOT_ENV = "DVC_ROOT"
"""Set by `dvc exp run` to the workspace's repository root, also when it runs in a temporary copy."""
PREFECT_FLOW_RUN_ENV = "PREFECT__FLOW_RUN_ID"
"""Prefect's flow-run id; the flow passes it down to the DVC stages it starts."""


def flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys to string values (`train.lr` -> "0.002"); lists as JSON, None as "null"."""
    flat: dict[str, str] = {}
    for name, value in node.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, Mapping):
            flat.update(flatten(value, key))
        else:
            flat[key] = _text(value)
    return flat


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return str(value)


def run_name(params: Params, environ: Mapping[str, str] = os.environ) -> str:
    """What a run is, for the MLflow run list: arch, input size, loss, data (`r18-64-wing-synthetic`), and
    the DVC experiment's name under `dvc exp run` (`r18-64-wing-synthetic-epochs30`)."""
    arch = params.model.arch.replace("resnet", "r")
    name = f"{arch}-{params.model.input_size}-{params.loss.name}-{params.data.source}"
    experiment = environ.get(DVC_EXPERIMENT_ENV)
    return f"{name}-{experiment}" if experiment else name


def project_root() -> Path:
    """The workspace root: `dvc exp run`'s DVC_ROOT when set (it may run in a temporary copy), else cwd."""
    return Path(os.environ.get(DVC_ROOT_ENV) or Path.cwd()).resolve()


def git_tags(root: Path) -> dict[str, str]:
    """The commit checked out and whether tracked files differ from it (dvc.lock aside: DVC rewrites it)."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {}
    status = _git(root, "status", "--porcelain", "--untracked-files=no") or ""
    changed = sorted(line[3:] for line in status.splitlines() if line[3:] != "dvc.lock")
    tags = {"mlflow.source.git.commit": commit, "git.dirty": json.dumps(bool(changed))}
    if changed:
        tags["git.changed"] = " ".join(changed)[:4000]
    return tags


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.rstrip() if done.returncode == 0 else None


def dvc_stage_tags(lock_path: Path) -> dict[str, str]:
    """`dvc.stage.<name>`: SHA-256 (16 hex) of each stage's dvc.lock entry (its deps, params and outs)."""
    if not lock_path.is_file():
        return {}
    stages = (yaml.safe_load(lock_path.read_text()) or {}).get("stages") or {}
    return {
        f"dvc.stage.{name}": hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]
        for name, entry in stages.items()
    }


HOST_TAG, PID_TAG, CHECKOUT_TAG = PROCESS_TAGS = ("wflw.host", "wflw.pid", "wflw.checkout")
"""The process that opened a run: the machine, its pid and the workspace root."""


def process_tags() -> dict[str, str]:
    """PROCESS_TAGS of this process: what tells a run whose process was killed from one still running."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), CHECKOUT_TAG: str(project_root())}


def caller_tags(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The DVC experiment name (`dvc exp run`) and the Prefect flow-run id, where the run has them."""
    tags = {}
    if environ.get(DVC_EXPERIMENT_ENV):
        tags["dvc.experiment"] = environ[DVC_EXPERIMENT_ENV]
    if environ.get(PREFECT_FLOW_RUN_ENV):
        tags["prefect.flow_run_id"] = environ[PREFECT_FLOW_RUN_ENV]
    return tags


def data_tags(identity: Mapping[str, Any]) -> dict[str, str]:
    """Source and both archive SHA-256s of the data (contract.data_identity of a split)."""
    archives = identity.get("archives") or {}
    tags = {"data.source": str(identity.get("source"))}
    for name, digest in sorted(archives.items()):
        key = "images" if "images" in name else "annotations"
        tags[f"data.{key}_sha256"] = str(digest)
    return tags


def data_digest(identity: Mapping[str, Any]) -> str:
    """One fingerprint of the archives (16 hex): the MLflow dataset digest."""
    archives = identity.get("archives") or {}
    joined = "".join(f"{name}={digest};" for name, digest in sorted(archives.items()))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]
