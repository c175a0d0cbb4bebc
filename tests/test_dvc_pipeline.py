"""`dvc repro` and `dvc exp run` of the real dvc.yaml in a temporary copy of the repository (slow: real DVC).

MLflow is the default of a project: `sqlite:///mlflow.db` in the copy's root, read here after DVC finished.
"""

import csv
import hashlib
import io
import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from repo_copy import BIN, pipeline_env, repo_copy, tiny_params

pytestmark = pytest.mark.slow

EXPERIMENT = "wflw-deeppose"  # params.yaml's tracking.experiment
MODEL = "wflw-deeppose"  # and registry.model_name


def _dvc(repo: Path, *args: str) -> str:
    """Run DVC in `repo`; its stages run the copy's own code (src/ first on PYTHONPATH)."""
    done = subprocess.run(
        [str(BIN / "dvc"), *args], cwd=repo, env=pipeline_env(repo), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _changed_by_edit(repo: Path, *modules: str) -> list[str]:
    """The stages `dvc status` finds changed once `modules` (under the package) get a comment; the files
    are restored after."""
    paths = [repo / "src" / "wflw_pipeline" / module for module in modules]
    saved = {path: path.read_text() for path in paths}
    try:
        for path, text in saved.items():
            path.write_text(text + "# an edit\n")
        return sorted(json.loads(_dvc(repo, "status", "--json")))
    finally:
        for path, text in saved.items():
            path.write_text(text)


def test_dvc_repro_runs_every_stage_then_is_up_to_date(tmp_path):
    repo = repo_copy(tmp_path / "repo")
    params = tiny_params(repo)

    _dvc(repo, "repro")

    manifest = json.loads((repo / "data/raw/manifest.json").read_text())
    assert manifest["source"] == "synthetic"
    summary = json.loads((repo / "data/parquet/summary.json").read_text())
    assert summary["faces"] == {"train": 18, "test": 12, "val": 6}
    assert pq.read_metadata(repo / "data/parquet/test.parquet").num_rows == 12
    assert (repo / "data/parquet/preview.png").stat().st_size > 0
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"fetch", "convert", "train", "evaluate", "register"}
    evaluation = json.loads((repo / "data/eval/metrics.json").read_text())
    assert evaluation["test"]["n"] == 12
    assert json.loads((repo / "data/train/metrics.json").read_text())["epochs"] == 1
    assert (repo / "data/model/model.pt").is_file()
    assert lock["stages"]["convert"]["params"]["params.yaml"]["convert"]["crop_size"] == 64

    # MLflow: train's run, completed by register, and its version of the model as the challenger.
    client = _mlflow(repo)
    [run] = _runs(client)
    assert run.info.run_id == _train_run(repo)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["nme_test"] == pytest.approx(evaluation["test"]["nme"])
    assert _steps(client, run.info.run_id) == [1]
    [version] = client.search_model_versions(f"name = '{MODEL}'")
    assert version.run_id == run.info.run_id
    assert _challenger(client) == str(version.version)
    registered = json.loads((repo / "data/register/registered.json").read_text())
    assert (registered["run_id"], str(registered["version"])) == (run.info.run_id, str(version.version))

    again = _dvc(repo, "repro")
    assert "didn't change" in again and "Running stage" not in again
    assert [r.info.run_id for r in _runs(client)] == [run.info.run_id]  # dvc repro twice gives one run
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 1  # ... and one version
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
    assert len(_runs(client)) == 2  # retrained: train's new run, completed and registered
    assert _challenger(client) == "2"

    model_md5 = lambda: _md5(repo / "data/model/model.pt")  # noqa: E731
    before = model_md5()
    with (repo / "src/wflw_pipeline/core/losses.py").open("a") as module:
        module.write("# an edit to code only train imports\n")
    edited = _dvc(repo, "repro")
    # retrained (not "resumed" from the finished checkpoint), so register completes train's new run
    assert _ran(edited) == ["register", "train"], edited
    assert (repo / "data/train/history.csv").read_text().count("\n") == 1 + 1
    assert model_md5() == before  # ... to the same bytes, so evaluate, which does not import it, is skipped
    assert "didn't change" in _dvc(repo, "repro")
    # train imports mlops/live_run.py only: the gate, the registry and the pyfunc model are register's alone
    assert _changed_by_edit(repo, "mlops/promotion.py", "mlops/registry.py", "mlops/pyfunc.py") == [
        "register"
    ]
    assert _changed_by_edit(repo, "mlops/live_run.py") == ["register", "train"]
    trained = _train_run(repo)
    assert len(_runs(client)) == 3 and client.get_run(trained).info.status == "FINISHED"
    assert _challenger(client) == "3"
    assert client.get_model_version(MODEL, "3").run_id == trained

    # `dvc exp run` with an evaluate param: train is cached, so register makes a new run of the same training.
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=repo, check=True)
    experiment = _dvc(repo, "exp", "run", "-S", "evaluate.flip_test=false", "-n", "flipoff")
    assert _ran(experiment) == ["evaluate", "register"], experiment
    assert _train_run(repo) == trained
    [flipoff] = client.search_runs([_experiment_id(client)], "tags.`dvc.experiment` = 'flipoff'")
    assert len(_runs(client)) == 4 and flipoff.info.status == "FINISHED"
    assert flipoff.info.run_name == "r18-32-wing-synthetic-flipoff"
    assert flipoff.data.tags["wflw.trained_in_run"] == trained
    assert flipoff.data.params["evaluate.flip_test"] == "false"
    assert client.get_run(trained).data.params["evaluate.flip_test"] == "true"
    assert _steps(client, flipoff.info.run_id) == [1]  # the curves, copied from history.csv
    flipped = json.loads((repo / "data/eval/metrics.json").read_text())
    assert flipoff.data.metrics["nme_test"] == pytest.approx(flipped["test"]["nme"])
    assert _challenger(client) == "4"
    assert client.get_model_version(MODEL, "4").run_id == flipoff.info.run_id
    shown = {
        row["Experiment"]: row["evaluate.flip_test"]
        for row in csv.DictReader(io.StringIO(_dvc(repo, "exp", "show", "--csv")))
    }
    assert shown.get("flipoff") == "False", shown


def _mlflow(repo: Path) -> MlflowClient:
    """A client on the project's default tracking store (and registry) in `repo`."""
    uri = f"sqlite:///{repo}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client: MlflowClient) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    return experiment.experiment_id


def _runs(client: MlflowClient) -> list:
    return client.search_runs([_experiment_id(client)])


def _steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))


def _challenger(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias(MODEL, "challenger").version)


def _train_run(repo: Path) -> str:
    return json.loads((repo / "data/train/mlflow_run.json").read_text())["run_id"]


def _ran(output: str) -> list[str]:
    """The stages DVC ran, from its "Running stage 'name':" lines."""
    return sorted(line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage"))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()
