"""A tiny tracked pipeline driven through `wflw` commands in-process (for the MLflow tests)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from helpers import PARAMS_YAML

from wflw_pipeline import cli

EPOCHS = 2


def params_file(root: Path, **tracking: object) -> Path:
    """params.yaml for a tiny CPU run, tracking into ./mlflow.db unless `tracking` says otherwise."""
    data = yaml.safe_load(PARAMS_YAML.read_text())
    data["model"].update(arch="resnet18", input_size=32)
    data["train"].update(epochs=EPOCHS, batch_size=4, warmup_iters=1, device="cpu", threads=1)
    data["evaluate"].update(device="cpu", batch_size=16)
    data["tracking"].update(uri="sqlite:///mlflow.db", experiment="tests", retries=1, timeout_s=2)
    data["tracking"].update(tracking)
    data["registry"].update(model_name="m", bootstrap_samples=1000)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def wflw(root: Path, *args: str) -> int:
    return cli.main([*args, "--params", str(root / "params.yaml")])


def train(root: Path) -> None:
    assert wflw(root, "train", "--parquet", f"{root}/parquet", "--model-dir", f"{root}/model",
                 "--train-dir", f"{root}/train") == 0  # fmt: skip


def evaluate(root: Path) -> None:
    assert wflw(root, "evaluate", "--checkpoint", f"{root}/model/model.pt", "--parquet", f"{root}/parquet",
                 "--out", f"{root}/eval") == 0  # fmt: skip


def register(root: Path, eval_dir: str = "eval", parquet: str = "parquet") -> int:
    return wflw(root, "register", "--train-dir", f"{root}/train", "--model", f"{root}/model/model.pt",
                 "--eval", f"{root}/{eval_dir}", "--parquet", f"{root}/{parquet}",
                 "--out", f"{root}/register")  # fmt: skip


def registered(root: Path) -> dict:
    return json.loads((root / "register" / "registered.json").read_text())
