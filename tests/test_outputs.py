"""outputs.py names every stage's files: dvc.yaml declares exactly those, in the folders the commands get."""

from __future__ import annotations

from pathlib import Path

import yaml
from paths import ROOT

from wflw_pipeline.outputs import (
    ConvertOutputs,
    EvalOutputs,
    RegisterOutputs,
    TrainOutputs,
    untracked,
)

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _declared(stage: str) -> set[str]:
    entry = STAGES[stage]
    return {str(path) for key in ("outs", "metrics", "plots") for path in entry.get(key, [])}


def test_dvc_yaml_declares_the_files_outputs_py_names():
    convert = ConvertOutputs()
    train = TrainOutputs()
    evaluation = EvalOutputs()

    assert _declared("convert") == {
        *(str(convert.split(name)) for name in ("train", "val", "test")),
        str(convert.summary),
        str(convert.preview),
    }
    assert _declared("train") == {
        str(train.model_dir),  # DVC tracks the folder that holds model.pt
        str(train.history),
        str(train.metrics),
        str(train.run_ref),
    }
    assert _declared("evaluate") == {str(path) for path in evaluation.files()}
    assert _declared("register") == {str(RegisterOutputs().registered)}


def test_the_commands_in_dvc_yaml_write_into_the_default_folders():
    assert f"--out {ConvertOutputs().out_dir}" in STAGES["convert"]["cmd"]
    assert (
        f"--model-dir {TrainOutputs().model_dir} --train-dir {TrainOutputs().train_dir}"
        in STAGES["train"]["cmd"]
    )
    assert f"--out {EvalOutputs().out_dir}" in STAGES["evaluate"]["cmd"]
    assert f"--out {RegisterOutputs().out_dir}" in STAGES["register"]["cmd"]


def test_paths_follow_the_folder_given():
    outputs = TrainOutputs(Path("/m"), Path("/t"))

    assert (outputs.model, outputs.checkpoint, outputs.run_ref) == (
        Path("/m/model.pt"),
        Path("/t/checkpoint.pt"),
        Path("/t/mlflow_run.json"),
    )
    assert EvalOutputs(Path("e")).files()[0] == Path("e/results.md")
    assert untracked("off") == {"run_id": None, "reason": "off"}
