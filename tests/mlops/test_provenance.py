"""What a tracked run records about its origin: flattened params, git state, dvc.lock hashes, the caller."""

import hashlib
import json
import subprocess

import yaml
from helpers import PARAMS_YAML

from wflw_pipeline.mlops import provenance
from wflw_pipeline.params import load_params


def test_flatten_dots_nested_keys_and_writes_values_as_mlflow_shows_them():
    flat = provenance.flatten({"train": {"lr": 0.002, "milestones": [15, 18], "compile": False},
                               "data": {"local": {"images_archive": None}}, "seed": 3})  # fmt: skip
    assert flat == {
        "train.lr": "0.002",
        "train.milestones": "[15, 18]",
        "train.compile": "false",
        "data.local.images_archive": "null",
        "seed": "3",
    }


def test_dvc_stage_tags_hash_each_stage_entry(tmp_path):
    lock = tmp_path / "dvc.lock"
    entry = {"cmd": "wflw train", "outs": [{"path": "data/model", "md5": "abc.dir"}]}
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train": entry, "fetch": {"cmd": "f"}}}))
    tags = provenance.dvc_stage_tags(lock)
    expected = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]
    assert tags["dvc.stage.train"] == expected and set(tags) == {"dvc.stage.train", "dvc.stage.fetch"}
    entry["outs"][0]["md5"] = "abd.dir"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train": entry, "fetch": {"cmd": "f"}}}))
    assert provenance.dvc_stage_tags(lock)["dvc.stage.train"] != expected
    assert provenance.dvc_stage_tags(tmp_path / "missing.lock") == {}


def test_caller_tags_come_from_dvc_and_prefect_environment():
    assert provenance.caller_tags({}) == {}
    environ = {"DVC_EXP_NAME": "flipoff", "PREFECT__FLOW_RUN_ID": "6d1f"}
    assert provenance.caller_tags(environ) == {"dvc.experiment": "flipoff", "prefect.flow_run_id": "6d1f"}


def test_git_tags_name_the_commit_and_the_changed_files_but_not_dvc_lock(tmp_path):
    assert provenance.git_tags(tmp_path) == {}
    for name in ("params.yaml", "dvc.lock"):
        (tmp_path / name).write_text("a: 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout
    (tmp_path / "dvc.lock").write_text("a: 2\n")
    assert provenance.git_tags(tmp_path) == {"mlflow.source.git.commit": head.strip(), "git.dirty": "false"}
    (tmp_path / "params.yaml").write_text("a: 2\n")
    tags = provenance.git_tags(tmp_path)
    assert (tags["git.dirty"], tags["git.changed"]) == ("true", "params.yaml")


def test_data_tags_and_digest_come_from_both_archive_sha256s():
    identity = {
        "source": "wflw",
        "archives": {"WFLW_images.tar.gz": "a" * 64, "WFLW_annotations.tar.gz": "b" * 64},
    }
    assert provenance.data_tags(identity) == {
        "data.source": "wflw",
        "data.images_sha256": "a" * 64,
        "data.annotations_sha256": "b" * 64,
    }
    digest = provenance.data_digest(identity)
    assert len(digest) == 16
    other = {**identity, "archives": {**identity["archives"], "WFLW_images.tar.gz": "c" * 64}}
    assert provenance.data_digest(other) != digest


def test_run_names_say_what_ran_and_which_dvc_experiment():
    params = load_params(PARAMS_YAML, ["model.arch=resnet50", "model.input_size=256", "data.source=wflw"])
    assert provenance.run_name(params, {}) == "r50-256-wing-wflw"
    assert provenance.run_name(params, {"DVC_EXP_NAME": "lr-sweep-3"}) == "r50-256-wing-wflw-lr-sweep-3"
