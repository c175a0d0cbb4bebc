"""A small DVC project with the pipeline's five stage names, each a few lines of Python, for the flow's tests:
real DVC and real Prefect, in seconds. A failing stage reports its error as `wflw` does (the package's
`write_error_file`, in a log line of another format), and the stages write the outputs the flow reads."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import yaml

PARAMS = {
    "data": {"network_failures": 0},
    "train": {"epochs": 20, "milestones": [15, 18]},
    "fail": {"stage": None, "message": None, "exit_code": 2},
}

DVC_YAML = {
    "stages": {
        "fetch": {"cmd": "python stage.py fetch", "params": ["data"], "outs": ["data/raw.txt"]},
        "convert": {"cmd": "python stage.py convert", "deps": ["data/raw.txt"], "outs": ["data/parquet.txt"]},
        "train": {
            "cmd": "python stage.py train",
            "deps": ["data/parquet.txt"],
            "params": ["train", "fail"],
            "outs": ["data/model.json"],
        },
        "evaluate": {
            "cmd": "python stage.py evaluate",
            "deps": ["data/model.json"],
            "outs": ["data/eval/results.md"],
            "metrics": ["data/eval/metrics.json"],
        },
        "register": {
            "cmd": "python stage.py register",
            "deps": ["data/eval/metrics.json"],
            "outs": ["data/register/registered.json"],
        },
    }
}

SUBSETS = ("test", "pose", "expression", "illumination", "makeup", "occlusion", "blur", "val")

STAGE_PY = textwrap.dedent(
    '''
    """One fake stage: fails as `wflw` does when params say so, writes its outputs."""
    import json, os, sys
    from pathlib import Path

    import yaml
    from wflw_pipeline.errors import write_error_file

    stage = sys.argv[1]
    params = yaml.safe_load(Path("params.yaml").read_text())
    with open("runs.log", "a") as log:
        log.write(stage + "\\n")

    def error(message, code):
        print("stage failed:", message, file=sys.stderr)
        write_error_file(message, code)
        sys.exit(code)

    Path("data/eval").mkdir(parents=True, exist_ok=True)
    Path("data/register").mkdir(parents=True, exist_ok=True)
    if stage == "fetch":
        attempts = Path("runs.log").read_text().split().count("fetch")
        if attempts <= params["data"]["network_failures"]:
            error("https://example.org/WFLW_images.tar.gz: download failed after 6 attempts: timed out", 75)
        sys.stderr.write("\\rdownload:   0%|\\rdownload:  50%|\\rdownload: 100%|\\n")
        Path("data/raw.txt").write_text("raw")
    if params["fail"]["stage"] == stage:
        error(params["fail"]["message"], params["fail"]["exit_code"])
    if stage == "convert":
        Path("data/parquet.txt").write_text("parquet")
    if stage == "train":
        seen = {key: os.environ.get(key) for key in ("DVC_EXP_NAME", "PREFECT__FLOW_RUN_ID")}
        Path("data/model.json").write_text(json.dumps({"train": params["train"], "env": seen}))
    if stage == "evaluate":
        epochs = json.loads(Path("data/model.json").read_text())["train"]["epochs"]
        metrics = {name: {"nme": 4 + i + epochs / 100, "fr": 2.5 * i, "auc": 0.5 - i / 100, "n": 10 + i}
                   for i, name in enumerate(SUBSETS)}
        Path("data/eval/metrics.json").write_text(json.dumps(metrics))
        table = "| NME test |\\n| --- |\\n| %.2f |\\n" % metrics["test"]["nme"]
        Path("data/eval/results.md").write_text(table)
    if stage == "register":
        Path("data/register/registered.json").write_text(json.dumps({
            "model_name": "wflw-deeppose", "version": "7", "model_uri": "models:/wflw-deeppose/7",
            "run_id": "abc123", "tracking_uri": "http://127.0.0.1:5000",
            "run_url": "http://127.0.0.1:5000/#/experiments/1/runs/abc123"}))
    '''
).replace("SUBSETS", repr(SUBSETS))

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def make_project(root: Path, dvc: Path, **params: dict) -> Path:
    """A git + DVC project in `root` with the fake stages, committed; `params` update PARAMS' sections."""
    root.mkdir(parents=True)
    data = {section: {**values, **params.get(section, {})} for section, values in PARAMS.items()}
    (root / "params.yaml").write_text(
        "# the fake pipeline's params\n" + yaml.safe_dump(data, sort_keys=False)
    )
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / "stage.py").write_text(STAGE_PY)
    (root / ".gitignore").write_text("/data/\n/runs.log\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(dvc), "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-qm", "fake pipeline"], cwd=root, check=True)
    return root


def stage_runs(root: Path) -> list[str]:
    """The stages that ran, in order (each attempt once)."""
    log = root / "runs.log"
    return log.read_text().split() if log.exists() else []
