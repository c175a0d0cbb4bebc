"""The deployment `train-wflw` end to end (slow): a real `prefect server` on a loopback port with its own
PREFECT_HOME, the flow served by `flows/serve.py` and run by a process work pool's `prefect worker`, the real
pipeline (tiny params) in a copy of the repository whose default DVC remote is on S3, MLflow on its default
SQLite store. The S3 server is moto's (tests/support/servers.py); the workspace knows only its endpoint URL
(DVC's `endpointurl`, behind a `Gate` that can take it down) and credentials in the environment, as it
would know MinIO or AWS. One server and one workspace serve the module's tests (DVC's cache keeps them
short); each test triggers the runs it checks. Every process started is stopped, also when a test fails.

A run that makes no progress fails its test with a diagnosis (`_stuck`): the run's newest log lines, the
processes in the workspace with the kernel function each waits in, and their Python stacks, which
faulthandler prints when the test aborts them (which also frees the workspace for the tests after).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from repo_copy import BIN, GIT_USER, pipeline_env, repo_copy, tiny_params
from servers import S3, Gate, background, prefect_server, s3_server
from train_wflw import KEPT, dvc_failure

pytestmark = pytest.mark.slow

EXPERIMENT = MODEL = "wflw-deeppose"  # params.yaml's tracking.experiment and registry.model_name
# Waits end on the state that matters, not on the clock: a run is waited for while it makes progress (a new
# state or log line) and called stuck after STALL_S without any; a command's timeout only guards against a
# hang. Both are generous for a 2-core machine loaded by other work (the suite took 36 min there, not 7).
STALL_S = 600
RUN_TIMEOUT_S = 1800


BUCKET = "wflw-dvc"


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[S3]:
    """An S3 server with bucket BUCKET."""
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture(scope="module")
def gate(s3) -> Iterator[Gate]:
    """The S3 endpoint the workspace is given, open unless a test shuts it."""
    with Gate(s3.endpoint) as opened:
        yield opened


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, s3, gate) -> Path:
    """A committed copy of the repository with tiny params and a default DVC remote on S3, set up as the
    README's team set-up says."""
    repo = repo_copy(tmp_path_factory.mktemp("flow-e2e") / "repo")
    tiny_params(repo)
    env = _env(repo, {})
    _run([str(BIN / "dvc"), "remote", "add", "-d", "shared", f"s3://{BUCKET}/dvc"], repo, env)
    _run([str(BIN / "dvc"), "remote", "modify", "shared", "endpointurl", gate.url], repo, env)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "tiny params, a shared DVC remote on S3")
    return repo


@pytest.fixture(scope="module")
def prefect(tmp_path_factory, workspace, s3) -> Iterator[dict[str, str]]:
    """The environment of the workspace's Prefect clients (the S3 credentials in it), a server running;
    `flows/serve.py` serving deployment train-wflw/e2e."""
    with prefect_server(tmp_path_factory.mktemp("prefect-home")) as server:
        env = _env(workspace, {**server, **s3.env()})
        serve = [str(BIN / "python"), "flows/serve.py", "--name", "e2e"]
        with background(serve, workspace, env, workspace.parent / "serve.log") as proc:
            _wait_for_deployment("train-wflw/e2e", env, proc)
            yield env


def _env(repo: Path, prefect_env: dict[str, str]) -> dict[str, str]:
    return {**pipeline_env(repo), **prefect_env, "PYTHONFAULTHANDLER": "1"}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = RUN_TIMEOUT_S) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout}{done.stderr}"
    return done.stdout


def _git(repo: Path, *args: str) -> str:
    identity = [f"user.{what.lower()}={value}" for what, value in GIT_USER.items()]
    return _run(["git", "-c", identity[0], "-c", identity[1], *args], repo, dict(os.environ))


def _prefect(env: dict[str, str], *args: str, cwd: Path) -> str:
    return _run([str(BIN / "prefect"), "--no-prompt", *args], cwd, env)


def _client(env: dict[str, str]):
    """A synchronous Prefect client on the test's server (not the harness, not the user's profile)."""
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(env["PREFECT_API_URL"])


def _wait_for_deployment(name: str, env: dict[str, str], serving: subprocess.Popen) -> None:
    """Wait until deployment `name` exists, for as long as the process `serving` it runs."""
    from prefect.exceptions import ObjectNotFound

    with _client(env) as client:
        while True:
            try:
                client.read_deployment_by_name(name)
                return
            except ObjectNotFound:
                assert serving.poll() is None, f"{serving.args} exited ({serving.returncode}) before {name}"
                time.sleep(0.5)


def _trigger(env: dict[str, str], cwd: Path, deployment: str, **parameters) -> uuid.UUID:
    """`prefect deployment run` without waiting; the flow run's id."""
    params = [arg for key, value in parameters.items() for arg in ("--param", f"{key}={json.dumps(value)}")]
    out = _prefect(env, "deployment", "run", deployment, *params, cwd=cwd)
    return uuid.UUID(out.split("UUID:")[1].split()[0])


def _wait_final(env: dict[str, str], run_ids: list[uuid.UUID]) -> list:
    """The flow runs, once each is in a final state."""
    return _wait_until(env, run_ids, lambda runs: all(run.state.is_final() for run in runs), "final states")


def _wait_until(env: dict[str, str], run_ids: list[uuid.UUID], reached: Callable[[list], bool], what: str):
    """The flow runs, once `reached(runs)`. Fails if they all end first, or make no progress (no new state,
    no new log line) for STALL_S, saying what was still pending and what the stuck processes were doing."""
    seen, since = None, time.monotonic()
    with _client(env) as client:
        while True:
            runs = [client.read_flow_run(run_id) for run_id in run_ids]
            if all(run.state is not None for run in runs) and reached(runs):
                return runs
            newest = _newest_log(client, run_ids)
            pending = f"{what}: {[(run.name, run.state_name) for run in runs]}, last log line {newest!r}"
            assert not all(run.state and run.state.is_final() for run in runs), f"ended before {pending}"
            progress = ([run.state_name for run in runs], newest)
            if progress != seen:
                seen, since = progress, time.monotonic()
            if time.monotonic() - since >= STALL_S:
                pytest.fail(f"no progress in {STALL_S} s; waiting for {pending}\n{_stuck(env, run_ids)}")
            time.sleep(1)


def _stuck(env: dict[str, str], run_ids: list[uuid.UUID]) -> str:
    """What stuck runs were doing: the processes of the workspace, then their Python stacks (SIGABRT, leaves
    first, with PYTHONFAULTHANDLER set), then the runs' newest log lines and the serving process' log."""
    workspace = Path(env["PYTHONPATH"]).parent.resolve()
    table = _process_table(workspace)
    columns = ("pid", "ppid", "state", "wchan")
    listing = "\n".join(" ".join(str(p[c]) for c in columns) + " " + p["cmdline"][:160] for p in table)
    for proc in sorted(table, key=lambda p: -p["depth"]):
        if "flows/serve.py" not in proc["cmdline"] and "worker start" not in proc["cmdline"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc["pid"], signal.SIGABRT)
            time.sleep(2)
    time.sleep(5)
    from prefect.client.schemas.sorting import LogSort

    with _client(env) as client:
        logs = client.read_logs(_log_filter(run_ids), limit=60, sort=LogSort.TIMESTAMP_DESC)
    lines = "\n".join(f"{log.timestamp:%H:%M:%S} {log.message[:300]}" for log in reversed(logs))
    served = [
        f"--- {path.name}:\n{path.read_text(errors='replace')[-8000:]}"
        for path in (workspace.parent / "serve.log", workspace.parent / "worker.log")
        if path.is_file()
    ]
    return "\n".join([f"processes ({' '.join(columns)} command):", listing, "--- run logs:", lines, *served])


def _process_table(workspace: Path) -> list[dict]:
    """The processes whose working directory is `workspace` or its parent, with their depth below pid 1."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "cwd").resolve() not in (workspace, workspace.parent):
                continue
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            found[int(proc.name)] = {
                "pid": int(proc.name),
                "ppid": int(stat[1]),
                "state": stat[0],
                "wchan": (proc / "wchan").read_text() or "-",
                "cmdline": (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"),
            }
        except (OSError, IndexError):
            continue
    for proc in found.values():
        depth, parent = 0, proc["ppid"]
        while parent in found:
            depth, parent = depth + 1, found[parent]["ppid"]
        proc["depth"] = depth
    return sorted(found.values(), key=lambda p: p["pid"])


def _newest_log(client, run_ids: list[uuid.UUID]) -> tuple[str, str] | None:
    """The id and message of the runs' newest log line."""
    from prefect.client.schemas.sorting import LogSort

    logs = client.read_logs(_log_filter(run_ids), limit=1, sort=LogSort.TIMESTAMP_DESC)
    return (str(logs[0].id), logs[0].message) if logs else None


def _states(env: dict[str, str], run_id: uuid.UUID) -> list:
    with _client(env) as client:
        return client.read_flow_run_states(run_id)


def _of_run(run_id: uuid.UUID):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    return ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))


def _mlflow(repo: Path) -> MlflowClient:
    uri = f"sqlite:///{repo}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiments(repo: Path, env: dict[str, str]) -> dict[str, dict[str, str]]:
    shown = _run([str(BIN / "dvc"), "exp", "show", "--csv"], repo, env)
    return {row["Experiment"]: row for row in csv.DictReader(io.StringIO(shown)) if row["Experiment"]}


def test_the_served_deployment_runs_the_pipeline_with_an_override_and_the_gate(workspace, prefect):
    params_before = (workspace / "params.yaml").read_bytes()

    command = [
        str(BIN / "prefect"), "--no-prompt",
        "deployment", "run", "train-wflw/e2e",
        "--param", 'overrides={"train.epochs": 2}', "--param", "promote=true", "--watch",
    ]  # fmt: skip
    with subprocess.Popen(command, cwd=workspace, env=prefect, stdout=subprocess.PIPE, text=True) as watch:
        assert watch.stdout is not None
        created = next(line for line in watch.stdout if "UUID:" in line)
        run_id = uuid.UUID(created.split("UUID:")[1].split()[0])
        _wait_final(prefect, [run_id])  # --watch's own wait has no stall check
        out = created + watch.communicate(timeout=RUN_TIMEOUT_S)[0]
    assert watch.returncode == 0, out
    with _client(prefect) as client:
        flow_run = client.read_flow_run(run_id)
        artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=_of_run(run_id))}
    assert flow_run.state.is_completed(), out
    assert (workspace / "params.yaml").read_bytes() == params_before

    mlflow = _mlflow(workspace)
    experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    [run] = mlflow.search_runs([experiment_id], f"tags.`prefect.flow_run_id` = '{run_id}'")
    assert run.data.params["train.epochs"] == "2"  # the override reached MLflow's params...
    assert run.info.run_name.endswith(f"-{flow_run.name}")
    assert run.data.tags["dvc.experiment"] == flow_run.name
    shown = _experiments(workspace, prefect)[flow_run.name]
    assert shown["train.epochs"] == "2"  # ... and `dvc exp show`
    # Registered, then gated: a 2-epoch model of 24 faces does not beat always predicting the mean shape.
    version = mlflow.get_model_version_by_alias(MODEL, "challenger")
    assert version.run_id == run.info.run_id
    assert float(version.tags["nme_test"]) >= float(version.tags["nme_mean_shape"]), version.tags
    assert "champion" not in mlflow.get_registered_model(MODEL).aliases

    assert set(artifacts) == {"wflw-metrics", "wflw-results"}
    table = json.loads(artifacts["wflw-metrics"].data)
    metrics = json.loads((workspace / "data/eval/metrics.json").read_text())
    assert table[0]["subset"] == "test" and table[0]["NME (%)"] == round(metrics["test"]["nme"], 3)
    assert f"version {version.version}" in artifacts["wflw-results"].data
    assert "refused by the gate" in artifacts["wflw-results"].data


def test_two_runs_triggered_together_queue_and_both_complete(workspace, prefect):
    first = _trigger(prefect, workspace, "train-wflw/e2e", overrides={"evaluate.flip_test": False})
    second = _trigger(prefect, workspace, "train-wflw/e2e", overrides={"evaluate.flip_test": True})

    runs = _wait_final(prefect, [first, second])

    assert [run.state.type.value for run in runs] == ["COMPLETED", "COMPLETED"], [r.state for r in runs]
    waited = [run_id for run_id in (first, second) if "AwaitingConcurrencySlot" in _names(prefect, run_id)]
    assert len(waited) == 1, [_names(prefect, run_id) for run_id in (first, second)]
    one, other = sorted(runs, key=lambda run: run.start_time)
    assert other.start_time >= one.end_time  # the second started only when the first had finished


def _names(env: dict[str, str], run_id: uuid.UUID) -> list[str]:
    return [state.name for state in _states(env, run_id)]


def test_a_process_worker_runs_the_deployment_of_prefect_yaml(workspace, prefect):
    _prefect(prefect, "work-pool", "create", "wflw", "--type", "process", cwd=workspace)
    _prefect(prefect, "deploy", "--all", cwd=workspace)
    worker_env = {**prefect, "WFLW_CHECKOUT": str(workspace)}
    worker = [str(BIN / "prefect"), "worker", "start", "--pool", "wflw", "--name", "e2e-worker"]
    log = workspace.parent / "worker.log"
    with background(worker, workspace.parent, worker_env, log):
        run_id = _trigger(prefect, workspace, "train-wflw/process")
        [run] = _wait_final(prefect, [run_id])

    assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-3000:]}"
    assert str(run_id) in log.read_text()  # the worker, not the served runner, ran it
    with _client(prefect) as client:
        assert client.read_deployment(run.deployment_id).name == "process"
    assert run.work_pool_name == "wflw"


def test_a_cancelled_run_stops_its_stage_and_the_next_run_resumes_training(workspace, prefect):
    overrides = {"train.epochs": 50, "train.milestones": [45, 48]}
    first = _trigger(prefect, workspace, "train-wflw/e2e", overrides=overrides)
    _wait_for_log(prefect, first, re.compile(r"epoch ([3-9]|\d\d+)/50"))  # epoch 2's checkpoint is written
    _prefect(prefect, "flow-run", "cancel", str(first), cwd=workspace)
    [cancelled] = _wait_final(prefect, [first])

    assert cancelled.state.is_cancelled(), cancelled.state
    assert _gone("wflw train", workspace), _processes("wflw train", workspace)  # cancelling stopped the stage

    second = _trigger(prefect, workspace, "train-wflw/e2e", overrides=overrides)
    [done] = _wait_final(prefect, [second])

    assert done.state.is_completed(), done.state
    resumed = [line for line in _logs(prefect, second) if "resuming from data/train/checkpoint.pt" in line]
    assert len(resumed) == 1, resumed
    assert 2 <= int(resumed[0].rsplit(" ", 1)[1]) < 50
    assert json.loads((workspace / "data/train/metrics.json").read_text())["epochs"] == 50


def _logs(env: dict[str, str], run_id: uuid.UUID) -> list[str]:
    with _client(env) as client:
        logs = client.read_logs(_log_filter([run_id]))
    return [log.message for log in logs]


def _log_filter(run_ids: list[uuid.UUID]):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids))


def _wait_for_log(env: dict[str, str], run_id: uuid.UUID, pattern: re.Pattern) -> None:
    def logged(_runs: list) -> bool:
        return any(pattern.search(line) for line in _logs(env, run_id))

    _wait_until(env, [run_id], logged, f"a log line matching {pattern.pattern!r}")


def _gone(command: str, cwd: Path, timeout: float = 120) -> bool:
    """Whether no process matching `command` in `cwd` is left within `timeout` (the flow's stop takes at most
    its 10 s grace; the rest is room for a loaded machine)."""
    deadline = time.monotonic() + timeout
    while _processes(command, cwd):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _processes(command: str, cwd: Path) -> list[str]:
    """Command lines of the running processes in `cwd` whose command line contains `command`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            text = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if command in text and (proc / "cwd").resolve() == cwd.resolve():
                found.append(text)
        except OSError:
            continue
    return found


def test_a_second_clone_pulls_what_the_flow_pushed_to_s3_and_has_nothing_to_run(
    workspace, prefect, s3, tmp_path
):
    run_id = _trigger(prefect, workspace, "train-wflw/e2e")  # the committed params: pushed at the end
    [run] = _wait_final(prefect, [run_id])
    assert run.state.is_completed(), run.state
    _git(workspace, "add", "dvc.lock")
    _git(workspace, "commit", "-qm", "the pipeline's results")
    stored = s3.client().list_objects_v2(Bucket=BUCKET, Prefix="dvc/runs/")
    assert stored["KeyCount"] >= 5  # the run cache: an entry per stage

    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(workspace), str(clone))
    env = {**_env(clone, {}), **s3.env()}
    _run([str(BIN / "dvc"), "pull"], clone, env)
    repro = _run([str(BIN / "dvc"), "repro"], clone, env)

    assert "Running stage" not in repro, repro
    assert "Data and pipelines are up to date" in repro
    assert (clone / "data/model/model.pt").read_bytes() == (workspace / "data/model/model.pt").read_bytes()

    # S3 answers a HEAD request with its status alone, a listing with the reason as well.
    for change, said in [
        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, ("An error occurred (403)", "(SignatureDoesNotMatch)")),
        ({"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY"}, ("An error occurred (403)", "(InvalidAccessKeyId)")),
    ]:
        message = _push_error(clone, {**env, **change})
        assert any(reason in message for reason in said), message
    missing = ["remote", "add", "--local", "-d", "elsewhere", f"s3://no-such-{BUCKET}/dvc"]
    _run([str(BIN / "dvc"), *missing], clone, env)
    _run(
        [str(BIN / "dvc"), "remote", "modify", "--local", "elsewhere", "endpointurl", s3.endpoint], clone, env
    )
    assert "NoSuchBucket" in _push_error(clone, env)


def _push_error(repo: Path, env: dict[str, str]) -> str:
    """The one line the flow would fail with, from the `dvc push` it runs, which must fail."""
    done = subprocess.run(
        [str(BIN / "dvc"), "push", "--run-cache"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert done.returncode != 0, done.stdout
    message, _ = dvc_failure((done.stdout + done.stderr).splitlines())
    assert "\n" not in message and "unexpected error" in message, done.stderr
    return message


def test_the_endpoint_down_during_the_push_fails_the_run_in_one_line_and_keeps_its_results(
    workspace, prefect, gate
):
    gate.shut_at(b"files%2Fmd5", b"/files/md5/")  # the push's first look at the remote's files
    try:
        run_id = _trigger(prefect, workspace, "train-wflw/e2e")
        [run] = _wait_final(prefect, [run_id])
    finally:
        gate.open()

    assert gate.tripped.is_set() and run.state.is_failed(), run.state
    message = run.state.message
    assert message.startswith("dvc push: unexpected error - Could not connect to the endpoint URL"), message
    assert message.endswith(f"({KEPT})") and "\n" not in message
    with _client(prefect) as client:
        artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=_of_run(run_id))}
    assert set(artifacts) == {"wflw-metrics", "wflw-results"}
    assert "- DVC remote: `shared`: **push failed**: dvc push: " in artifacts["wflw-results"].data
    assert _experiments(workspace, prefect)[run.name]  # saved before the push
