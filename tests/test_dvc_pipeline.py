"""`dvc repro` of the real dvc.yaml in a temporary copy of the repository (slow: real DVC)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _repo_copy(dest: Path) -> Path:
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


def _dvc(repo: Path, *args: str) -> str:
    """Run DVC in `repo`; its stages run the copy's own code (src/ first on PYTHONPATH)."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(repo / "src"),
        "DVC_NO_ANALYTICS": "1",
    }
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_dvc_repro_runs_every_stage_then_is_up_to_date(tmp_path):
    repo = _repo_copy(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["synthetic"].update(train_faces=24, test_faces=12, max_image_size=400)
    params["convert"].update(crop_size=64, val_fraction=0.25)
    params["model"].update(input_size=32)
    params["train"].update(epochs=1, batch_size=8, warmup_iters=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    _dvc(repo, "repro")

    manifest = json.loads((repo / "data/raw/manifest.json").read_text())
    assert manifest["source"] == "synthetic"
    summary = json.loads((repo / "data/parquet/summary.json").read_text())
    assert summary["faces"] == {"train": 18, "test": 12, "val": 6}
    assert pq.read_metadata(repo / "data/parquet/test.parquet").num_rows == 12
    assert (repo / "data/parquet/preview.png").stat().st_size > 0
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"fetch", "convert", "train", "evaluate"}
    evaluation = json.loads((repo / "data/eval/metrics.json").read_text())
    assert evaluation["test"]["n"] == 12
    assert json.loads((repo / "data/train/metrics.json").read_text())["epochs"] == 1
    assert (repo / "data/model/model.pt").is_file()
    assert lock["stages"]["convert"]["params"]["params.yaml"]["convert"]["crop_size"] == 64

    again = _dvc(repo, "repro")
    assert "didn't change" in again and "Running stage" not in again
    metrics = _dvc(repo, "metrics", "show", "--json")
    shown = json.loads(metrics)
    assert shown[""]["data"]["data/parquet/summary.json"]["data"]["faces"]["val"] == 6

    plots = json.loads(_dvc(repo, "plots", "show", "--json"))["data"]
    assert set(plots) == {
        "Training loss",
        "Validation NME (%)",
        "CED per subset",
        "data/parquet/preview.png",
        "data/eval/ced.png",
        "data/eval/nme_subsets.png",
        "data/eval/best_worst.png",
    }

    params["convert"]["crop_size"] = 48
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _dvc(repo, "repro")
    assert "Running stage 'convert'" in changed and "Running stage 'fetch'" not in changed
    assert "Running stage 'train'" in changed

    model_md5 = lambda: _md5(repo / "data/model/model.pt")  # noqa: E731
    before = model_md5()
    with (repo / "src/wflw_pipeline/losses.py").open("a") as module:
        module.write("# an edit to code only train imports\n")
    edited = _dvc(repo, "repro")
    ran = sorted(line.split("'")[1] for line in edited.splitlines() if line.startswith("Running stage"))
    assert ran == ["train"], edited  # retrained (not "resumed" from the finished checkpoint) ...
    assert (repo / "data/train/history.csv").read_text().count("\n") == 1 + 1
    assert model_md5() == before  # ... to the same bytes, so evaluate, which does not import it, is skipped
    assert "didn't change" in _dvc(repo, "repro")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()
