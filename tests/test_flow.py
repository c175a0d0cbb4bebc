"""The Prefect flow `train-wflw` on a small DVC project (tests/flow_project.py) against Prefect's test
harness: real DVC and a real (temporary) Prefect server, fake stages of a few lines each."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import train_wflw
from flow_project import make_project, stage_runs
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.testing.utilities import prefect_test_harness
from train_wflw import (
    StageFailed,
    failure,
    hydra_overrides,
    outcome_markdown,
    output_lines,
    results_table,
    run_logged,
)

from wflw_pipeline import cli
from wflw_pipeline.errors import ERROR_FILE_ENV, EXIT_TEMPFAIL, write_error_file

DVC = Path(sys.executable).parent / "dvc"


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry: no network beyond loopback
        with prefect_test_harness(server_startup_timeout=60):
            yield


@pytest.fixture(autouse=True)
def no_retry_delays(monkeypatch):
    monkeypatch.setattr(train_wflw, "FETCH_RETRY_DELAYS_S", [0, 0, 0])


def _run(workspace: Path, **parameters):
    """Run the flow; return its state (failed runs included) and the flow run's id."""
    state = train_wflw.train_wflw(workspace=str(workspace), return_state=True, **parameters)
    return state


def _artifacts(flow_run_id) -> dict:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in found}


def _experiments(workspace: Path) -> dict[str, dict[str, str]]:
    shown = subprocess.run(
        [str(DVC), "exp", "show", "--csv"], cwd=workspace, check=True, capture_output=True, text=True
    ).stdout
    return {row["Experiment"]: row for row in csv.DictReader(io.StringIO(shown)) if row["Experiment"]}


def test_overrides_reach_the_stages_and_the_run_is_saved_as_a_dvc_experiment(tmp_path):
    project = make_project(tmp_path / "p", DVC)
    params_before = (project / "params.yaml").read_bytes()

    state = _run(project, overrides={"train.epochs": 3, "train.milestones": [1, 2]})

    assert state.is_completed(), state.message
    result = state.result()
    model = json.loads((project / "data/model.json").read_text())
    assert model["train"] == {"epochs": 3, "milestones": [1, 2]}
    assert stage_runs(project) == ["fetch", "convert", "train", "evaluate", "register"]
    assert (project / "params.yaml").read_bytes() == params_before  # the overrides were for this run only
    experiment = result["experiment"]
    assert model["env"]["DVC_EXP_NAME"] == experiment  # MLflow's run name and tag dvc.experiment
    assert model["env"]["PREFECT__FLOW_RUN_ID"] == str(state.state_details.flow_run_id)
    shown = _experiments(project)[experiment]
    assert (shown["train.epochs"], shown["train.milestones"]) == ("3", "[1, 2]")
    assert result["metrics"]["test"] == {"nme": 4.03, "fr": 0.0, "auc": 0.5}
    assert result["mlflow_run_id"] == "abc123" and result["promoted"] is None and result["pushed"] is None

    artifacts = _artifacts(state.state_details.flow_run_id)
    assert set(artifacts) == {"wflw-metrics", "wflw-results"}
    table = json.loads(artifacts["wflw-metrics"].data)
    assert [row["subset"] for row in table] == list(train_wflw.SUBSETS)
    assert table[1] == {"subset": "pose", "NME (%)": 5.03, "FR@0.1 (%)": 2.5, "AUC@0.1": 0.49, "faces": 11}
    markdown = artifacts["wflw-results"].data
    assert "[abc123](http://127.0.0.1:5000/#/experiments/1/runs/abc123)" in markdown
    assert "[wflw-deeppose version 7](http://127.0.0.1:5000/#/models/wflw-deeppose/versions/7)" in markdown
    assert "| 4.03 |" in markdown and f"`{experiment}`" in markdown

    again = _run(project, overrides={"train.epochs": 3, "train.milestones": [1, 2]})

    assert again.is_completed(), again.message
    assert len(stage_runs(project)) == 5  # DVC's cache: nothing ran again


def test_a_failing_stage_fails_the_flow_with_its_own_message_and_later_stages_do_not_run(tmp_path):
    project = make_project(
        tmp_path / "p", DVC, fail={"stage": "train", "message": "train.epochs: must be >= 1"}
    )
    params_before = (project / "params.yaml").read_bytes()

    state = _run(project)

    assert state.is_failed()
    with pytest.raises(StageFailed, match=r"^train: train\.epochs: must be >= 1$"):
        state.result()
    assert "train: train.epochs: must be >= 1" in state.message
    assert stage_runs(project) == ["fetch", "convert", "train"]
    assert (project / "params.yaml").read_bytes() == params_before
    assert not (project / "data/register/registered.json").exists()

    fixed = _run(project, overrides={"fail.stage": None})

    assert fixed.is_completed(), fixed.message
    assert stage_runs(project)[3:] == ["train", "evaluate", "register"]  # fetch and convert: DVC's cache


def test_a_failed_push_fails_the_run_in_one_line_and_keeps_its_results_and_a_rerun_pushes(tmp_path):
    project = make_project(tmp_path / "p", DVC)
    remote = tmp_path / "remote"
    remote.write_text("a file where the remote's folder should be")
    subprocess.run([str(DVC), "remote", "add", "-d", "shared", str(remote)], cwd=project, check=True)

    state = _run(project)

    assert state.is_failed()
    message = state.message
    assert message.startswith("dvc push: ") and "\n" not in message, message
    assert message.endswith(f"({train_wflw.KEPT})")
    outcome = state.result(raise_on_failure=False)
    assert outcome["pushed"] is False and outcome["metrics"]["test"]["nme"] == 4.2
    markdown = _artifacts(state.state_details.flow_run_id)["wflw-results"].data
    assert f"- DVC remote: `shared`: **push failed**: {message}" in markdown
    assert stage_runs(project) == ["fetch", "convert", "train", "evaluate", "register"]

    remote.unlink()
    again = _run(project)

    assert again.is_completed(), again.message
    assert again.result()["pushed"] is True and len(stage_runs(project)) == 5  # pushed, nothing ran again
    status = [str(DVC), "status", "--cloud"]
    in_sync = subprocess.run(status, cwd=project, check=True, capture_output=True, text=True).stdout
    assert "Cache and remote 'shared' are in sync" in in_sync
    markdown = _artifacts(again.state_details.flow_run_id)["wflw-results"].data
    assert "- DVC remote: `shared`: outputs and run cache pushed" in markdown


def test_fetch_is_retried_on_a_network_error(tmp_path):
    project = make_project(tmp_path / "p", DVC, data={"network_failures": 2})

    state = _run(project)

    assert state.is_completed(), state.message
    assert stage_runs(project)[:3] == ["fetch", "fetch", "fetch"]


def test_fetch_is_not_retried_on_other_errors(tmp_path):
    project = make_project(
        tmp_path / "p", DVC, fail={"stage": "fetch", "message": "data.wflw.images_sha256: no"}
    )

    state = _run(project)

    assert state.is_failed()
    assert "fetch: data.wflw.images_sha256: no" in state.message
    assert stage_runs(project) == ["fetch"]


def test_an_unknown_override_fails_before_any_stage_runs(tmp_path):
    project = make_project(tmp_path / "p", DVC)

    state = _run(project, overrides={"train.epocs": 3})

    assert state.is_failed()
    assert "Could not override 'train.epocs'. (every key must be in params.yaml)" in state.message
    assert stage_runs(project) == []


@pytest.mark.parametrize("params_file", ["/etc/hostname", "../outside.yaml", "link.yaml", "missing.yaml"])
def test_a_params_file_outside_the_checkout_or_missing_fails_before_any_stage_runs(tmp_path, params_file):
    project = make_project(tmp_path / "p", DVC)
    (tmp_path / "outside.yaml").write_text("stolen: true\n")
    (project / "link.yaml").symlink_to(tmp_path / "outside.yaml")
    before = (project / "params.yaml").read_text()

    state = _run(project, params_file=params_file)

    assert state.is_failed()
    assert f"params_file {params_file}: must be a file in the checkout {project}" in state.message
    assert (project / "params.yaml").read_text() == before
    assert stage_runs(project) == []


def test_the_parameters_carry_descriptions_for_the_ui():
    schema = train_wflw.train_wflw.parameters.model_dump()["properties"]

    assert set(schema) == {"overrides", "params_file", "promote", "workspace"}
    assert "dvc exp run -S" in schema["overrides"]["description"]
    assert "champion" in schema["promote"]["description"]


def test_overrides_are_written_in_hydra_syntax():
    overrides = {"train.epochs": 3, "a.b": [1, 2.5], "c": None, "d": True, "e": "s3://x y", "f": {"g": "h"}}

    assert hydra_overrides(overrides) == [
        "train.epochs=3",
        "a.b=[1,2.5]",
        "c=null",
        "d=true",
        'e="s3://x y"',
        'f={g:"h"}',
    ]


def test_output_lines_split_progress_redraws_into_lines():
    chunks = [
        b"Running stage 'fetch':\n> wflw fetch\r",
        b"\rdownload:  50%|#",
        b"####|\rdownload: 1",
        b"00%\n\n",
    ]

    assert list(output_lines(chunks)) == [
        "Running stage 'fetch':",
        "> wflw fetch",
        "download:  50%|#####|",
        "download: 100%",
    ]


def test_an_interrupted_command_is_stopped_with_every_process_it_started(tmp_path):
    script = "sleep 60 & echo $!; wait"  # a shell with a child, as DVC runs `wflw train`
    seen = []

    def log(line: str) -> None:
        seen.append(line)
        if line.isdigit():
            raise KeyboardInterrupt  # what Prefect's SIGTERM handler raises, in effect, on cancellation

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_logged(["sh", "-c", script], tmp_path, dict(os.environ), log)

    assert time.monotonic() - started < train_wflw.STOP_GRACE_S
    assert seen[0] == "$ sh -c " + script
    assert not _running(int(seen[1]))  # the grandchild is gone, not orphaned


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_failure_is_what_the_stage_wrote_to_its_error_file_else_dvc_s_message(tmp_path, monkeypatch):
    error_file = tmp_path / "error.json"
    stage_output = [
        "> wflw fetch --out data/raw",
        "2026-11-27 08:00:00,000 ERROR wflw_pipeline.cli: an earlier, logged error",
        "ERROR: failed to reproduce 'fetch': failed to run: wflw fetch --out data/raw, exited with 1",
    ]
    dvc_says = "failed to reproduce 'fetch': failed to run: wflw fetch --out data/raw"
    assert failure(error_file, stage_output) == (dvc_says, 1)  # no file: DVC's message, not the log line
    assert failure(error_file, ["ERROR: 'dvc.yaml' does not exist"]) == ("'dvc.yaml' does not exist", None)
    assert failure(error_file, []) == ("failed with no output", None)

    monkeypatch.setenv(ERROR_FILE_ENV, str(error_file))
    write_error_file("https://x/a.tar.gz: download failed after 3 attempts: timed out", EXIT_TEMPFAIL)

    expected = ("https://x/a.tar.gz: download failed after 3 attempts: timed out", 75)
    assert failure(error_file, stage_output) == expected  # the file, not the log


def test_a_failed_wflw_command_writes_its_error_and_exit_code_for_the_flow(tmp_path, monkeypatch):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv(ERROR_FILE_ENV, str(error_file))

    code = cli.main(["fetch", "--params", str(tmp_path / "missing.yaml")])

    message = f"{tmp_path / 'missing.yaml'}: params file not found"
    assert code == 2
    assert json.loads(error_file.read_text()) == {"message": message, "exit_code": 2}
    assert failure(error_file, ["ERROR: failed to reproduce 'fetch', exited with 255"]) == (message, 2)


def test_results_table_rows():
    metrics = {name: {"nme": 4.12345, "fr": 1.234, "auc": 0.55556, "n": 5} for name in train_wflw.SUBSETS}
    metrics["makeup"] = {"nme": None, "fr": None, "auc": None, "n": 0}  # a subset without faces

    rows = results_table(metrics)

    assert rows[0] == {"subset": "test", "NME (%)": 4.123, "FR@0.1 (%)": 1.23, "AUC@0.1": 0.5556, "faces": 5}
    assert rows[4] == {"subset": "makeup", "NME (%)": None, "FR@0.1 (%)": None, "AUC@0.1": None, "faces": 0}
    assert len(rows) == 7


@pytest.mark.parametrize(
    ("promoted", "line"),
    [
        (None, "- Promotion: not asked (flow parameter `promote`)"),
        (True, "- Promotion: **promoted**: alias `champion`"),
        (
            False,
            "- Promotion: refused by the gate (`wflw promote` printed why in the logs); alias `challenger`",
        ),
    ],
)
def test_the_run_page_says_what_the_gate_did(promoted, line):
    registered = {"run_id": "abc", "model_name": "m", "version": "3", "tracking_uri": "sqlite:///mlflow.db"}
    text = outcome_markdown("| NME |", registered, promoted, "exp-1", "`shared`: pushed")
    assert text.splitlines() == [
        "- DVC experiment: `exp-1` (`dvc exp show`)",
        "- MLflow run: `abc` (sqlite:///mlflow.db)",
        "- Registered model: `m version 3`",
        line,
        "- DVC remote: `shared`: pushed",
        "",
        "| NME |",
    ]
