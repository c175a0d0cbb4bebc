"""Prefect flow `train-wflw`: runs this checkout's DVC stages as tasks and shows the outcome.

DVC owns the graph and the cache, the stages record the run in MLflow; this flow triggers, parameterises
and watches them, and holds no ML logic. DVC being the cache, no task uses Prefect's (NO_CACHE).
`python flows/serve.py` serves it as deployment `train-wflw/local`; prefect.yaml declares it for a process
work pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists
from prefect.runtime import flow_run
from prefect.states import Failed

from wflw_pipeline.data.wflw import SUBSETS
from wflw_pipeline.errors import ERROR_FILE_ENV, EXIT_REFUSED, EXIT_TEMPFAIL, read_error_file
from wflw_pipeline.outputs import EVAL, REGISTER, EvalOutputs, RegisterOutputs

CHECKOUT = Path(__file__).resolve().parents[1]
STAGES = ("fetch", "convert", "train", "evaluate", "register")
FETCH_RETRIES = 3
FETCH_RETRY_DELAYS_S = [60, 300, 900]
TAIL_LINES = 200
STOP_GRACE_S = 10.0
"""How long a stage's processes get to end after SIGTERM (checkpoints are atomic) before SIGKILL."""
LEASE_S = 60.0
"""The workspace limit's lease, renewed while a run holds it: a run killed outright (SIGKILL) blocks the
workspace this long at most."""


class StageFailed(RuntimeError):
    """A command of the pipeline exited non-zero; the message is the stage's own error line."""

    def __init__(self, stage: str, message: str, exit_status: int | None) -> None:
        super().__init__(f"{stage}: {message}")
        self.exit_status = exit_status


class OverrideError(ValueError):
    """Params the run cannot take: a params_file outside the checkout, an unknown key, a value Hydra cannot
    parse."""


def hydra_value(value: Any) -> str:
    """`value` in Hydra's override grammar, which `dvc exp run -S` and DVC's params files use."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{hydra_value(item)}" for key, item in value.items()) + "}"
    return repr(value)


def hydra_overrides(overrides: dict[str, Any]) -> list[str]:
    """{"train.epochs": 3} -> ["train.epochs=3"]: the overrides as `dvc exp run -S` takes them."""
    return [f"{key}={hydra_value(value)}" for key, value in overrides.items()]


def output_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """The lines of a byte stream, split at newlines and carriage returns; blank ones dropped."""
    pending = b""
    for chunk in chunks:
        *complete, pending = re.split(rb"\r\n|\r|\n", pending + chunk)
        for line in complete:
            if text := line.decode(errors="replace").rstrip():
                yield text
    if text := pending.decode(errors="replace").rstrip():
        yield text


DVC_ERROR = re.compile(r"^ERROR: (?P<message>.+?)(?:, exited with (?P<status>-?\d+))?$")
"""DVC's own error line, and the exit status of the stage's command when it ran one."""


def dvc_failure(lines: list[str]) -> tuple[str, int | None]:
    """DVC's last error message in a command's output (else its last line) and the exit status it reports."""
    status = None
    message = None
    for line in lines:
        if match := DVC_ERROR.match(line):
            message = match["message"]
            status = int(match["status"]) if match["status"] else status
    return message or (lines[-1] if lines else "failed with no output"), status


def failure(error_file: Path, lines: list[str]) -> tuple[str, int | None]:
    """The error of a failed command: the message and exit code `wflw` wrote to `error_file`, else (no
    `wflw` command failed: DVC did, or a stage crashed) DVC's own message."""
    written = read_error_file(error_file)
    return written if written is not None else dvc_failure(lines)


def command_env(experiment: str) -> dict[str, str]:
    """The environment of the pipeline's commands: this Python's scripts first on PATH (`dvc`, `wflw`),
    unbuffered output, and the names MLflow's run is tagged with (the DVC experiment, this flow run)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env["DVC_EXP_NAME"] = experiment
    env["DVC_NO_ANALYTICS"] = "1"
    if flow_run.id:
        env["PREFECT__FLOW_RUN_ID"] = str(flow_run.id)
    return env


def run_logged(
    command: list[str], workspace: Path, env: dict[str, str], log: Callable[[str], None]
) -> tuple[int, list[str]]:
    """Run `command` in `workspace`, each line of its output passed to `log`; return its exit code and its
    last lines. The command runs in a process group of its own, which is stopped, with every process in
    it (`dvc`, the shell, `wflw train`), when this one is interrupted: a cancelled flow run (SIGTERM)
    leaves no stage running."""
    log("$ " + " ".join(command))
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with subprocess.Popen(
        command, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=0
    ) as process:
        stdout = process.stdout
        assert stdout is not None
        try:
            for line in output_lines(iter(lambda: stdout.read1(65536), b"")):
                log(line)
                tail.append(line)
        except BaseException:
            stop_group(process)
            raise
    return process.returncode, list(tail)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group `process` leads, SIGKILL it after STOP_GRACE_S; wait for `process`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def checked(
    name: str, command: list[str], workspace: Path, env: dict[str, str], allowed: tuple[int, ...] = (0,)
) -> int:
    """Run `command` into this task run's logs, with $WFLW_ERROR_FILE set for the `wflw` command it runs;
    its exit code, or StageFailed with the command's own error when that code is not `allowed`."""
    logger = get_run_logger()
    with tempfile.TemporaryDirectory(prefix="wflw-error-") as folder:
        error_file = Path(folder) / "error.json"
        command_env = {**env, ERROR_FILE_ENV: str(error_file)}
        returncode, tail = run_logged(command, workspace, command_env, lambda line: logger.info("%s", line))
        if returncode not in allowed:
            message, status = failure(error_file, tail)
            raise StageFailed(name, message, status if status is not None else returncode)
    return returncode


def network_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a stage only when its command failed on the network (EXIT_TEMPFAIL)."""
    try:
        state.result()
    except StageFailed as err:
        return err.exit_status == EXIT_TEMPFAIL
    except Exception:  # Prefect's own failures (crashes, cancellations): not retried
        return False
    return False


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def default_remote(workspace: Path, env: dict[str, str]) -> str | None:
    """The DVC remote `dvc push`/`pull` use without `-r` (`dvc remote add -d`), or None."""
    done = subprocess.run(dvc("remote", "default"), cwd=workspace, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def checkout_file(workspace: Path, name: str) -> Path:
    """`name` as a file inside the checkout `workspace`, links resolved first; else OverrideError."""
    root = workspace.resolve()
    path = (root / name).resolve()
    if not (path.is_file() and path.is_relative_to(root)):
        raise OverrideError(f"params_file {name}: must be a file in the checkout {root}")
    return path


@task(task_run_name="params", cache_policy=NO_CACHE)
def apply_params(workspace: Path, params_file: str | None, overrides: dict[str, Any]) -> None:
    """Copy `params_file` over params.yaml, then apply the overrides as `dvc exp run -S` does."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    logger = get_run_logger()
    if params_file:
        shutil.copyfile(checkout_file(workspace, params_file), workspace / "params.yaml")
        logger.info("params.yaml <- %s", params_file)
    if overrides:
        try:
            apply_overrides(workspace / "params.yaml", hydra_overrides(overrides))
        except InvalidArgumentError as err:
            reason = str(err.__cause__ or err).splitlines()[0]
            raise OverrideError(
                f"overrides {overrides}: {reason} (every key must be in params.yaml)"
            ) from err
        logger.info("params.yaml overrides: %s", " ".join(hydra_overrides(overrides)))


@task(task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, workspace: Path, env: dict[str, str], pull: bool) -> None:
    """`dvc repro` of one stage: a stage whose deps and params are unchanged is not run again, and one DVC
    ran before with the same inputs (its run cache, pulled from the remote when `pull`) is restored."""
    command = dvc("repro", "--single-item", *(["--pull"] if pull else []), stage)
    checked(stage, command, workspace, env)


@task(task_run_name="promote", cache_policy=NO_CACHE)
def promote_version(workspace: Path, env: dict[str, str]) -> bool:
    """`wflw promote`: champion moves to this run's version only when the gate accepts it."""
    command = ["wflw", "promote", "--params", "params.yaml"]
    return checked("promote", command, workspace, env, allowed=(0, EXIT_REFUSED)) == 0


@task(task_run_name="save experiment", cache_policy=NO_CACHE)
def save_experiment(workspace: Path, env: dict[str, str], name: str) -> None:
    """`dvc exp save`: the workspace's params, dvc.lock and metrics as DVC experiment `name`."""
    checked("dvc exp save", dvc("exp", "save", "--force", "-n", name), workspace, env)


KEPT = (
    "the run's results are kept: its outputs in the workspace and its DVC cache, its MLflow run and model "
    "version; `dvc push --run-cache` or a rerun of the flow, which runs no stage again, pushes them"
)
"""What a run whose push failed still has, and how to push it."""


@task(task_run_name="push", cache_policy=NO_CACHE)
def push(workspace: Path, env: dict[str, str], remote: str) -> None:
    """`dvc push` of the outputs and the run cache, so other clones and workers start from them."""
    checked("dvc push", dvc("push", "--run-cache", "-r", remote), workspace, env)


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def results_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per subset (test first): NME and FR in %, AUC, faces, as data/eval/metrics.json has them
    (None for a subset without faces)."""
    return [
        {
            "subset": name,
            "NME (%)": _rounded(metrics[name]["nme"], 3),
            "FR@0.1 (%)": _rounded(metrics[name]["fr"], 2),
            "AUC@0.1": _rounded(metrics[name]["auc"], 4),
            "faces": metrics[name]["n"],
        }
        for name in SUBSETS
    ]


def model_url(registered: dict[str, Any]) -> str | None:
    """The MLflow UI page of the registered version, when the tracking server has a URL."""
    uri = registered.get("tracking_uri") or ""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/models/{registered['model_name']}/versions/{registered['version']}"


def push_line(remote: str | None, push_error: str | None) -> str:
    """The run page's line on the DVC remote: not set, pushed, or why the push failed."""
    if remote is None:
        return "none (`dvc remote add -d`): nothing pushed"
    if push_error is None:
        return f"`{remote}`: outputs and run cache pushed"
    return f"`{remote}`: **push failed**: {push_error} ({KEPT})"


def outcome_markdown(
    results_md: str, registered: dict[str, Any], promoted: bool | None, experiment: str, pushed: str
) -> str:
    """The run page's summary: the results table, the MLflow run and version, the promotion, the push."""
    run = registered.get("run_id")
    run_ref = f"[{run}]({registered['run_url']})" if registered.get("run_url") else f"`{run}`"
    version = f"{registered.get('model_name')} version {registered.get('version')}"
    version_ref = f"[{version}]({url})" if (url := model_url(registered)) else f"`{version}`"
    promotion = {None: "not asked (flow parameter `promote`)", True: "**promoted**: alias `champion`"}.get(
        promoted, "refused by the gate (`wflw promote` printed why in the logs); alias `challenger`"
    )
    lines = [
        f"- DVC experiment: `{experiment}` (`dvc exp show`)",
        f"- MLflow run: {run_ref} ({registered.get('tracking_uri')})",
        f"- Registered model: {version_ref}",
        f"- Promotion: {promotion}",
        f"- DVC remote: {pushed}",
        "",
        results_md,
    ]
    return "\n".join(lines)


@task(task_run_name="outcome", cache_policy=NO_CACHE)
def publish(
    workspace: Path, promoted: bool | None, experiment: str, remote: str | None, push_error: str | None
) -> dict[str, Any]:
    """The flow's result and its artifacts, read from the outputs evaluate and register wrote."""
    evaluation = EvalOutputs(workspace / EVAL)
    metrics = json.loads(evaluation.metrics.read_text())
    registered = json.loads(RegisterOutputs(workspace / REGISTER).registered.read_text())
    results_md = evaluation.results.read_text()
    rows = results_table(metrics)
    create_table_artifact(
        rows, key="wflw-metrics", description="NME, FR and AUC on the test set and its subsets"
    )
    create_markdown_artifact(
        outcome_markdown(results_md, registered, promoted, experiment, push_line(remote, push_error)),
        key="wflw-results",
        description="Results table, MLflow run, registered version, promotion, DVC push",
    )
    return {
        "experiment": experiment,
        "metrics": {
            row["subset"]: {"nme": row["NME (%)"], "fr": row["FR@0.1 (%)"], "auc": row["AUC@0.1"]}
            for row in rows
        },
        "mlflow_run_id": registered.get("run_id"),
        "run_url": registered.get("run_url"),
        "model": registered.get("model_uri"),
        "promoted": promoted,
        "pushed": None if remote is None else push_error is None,
    }


def workspace_limit(workspace: Path) -> str:
    """The Prefect global concurrency limit (1 slot) that one run at a time holds on `workspace`."""
    digest = hashlib.sha256(f"{socket.gethostname()}:{workspace}".encode()).hexdigest()[:12]
    return f"wflw-workspace-{digest}"


def ensure_limit(name: str) -> None:
    """Create limit `name` with one slot unless it exists (a run starting at the same time may create it)."""
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.upsert_global_concurrency_limit_by_name(name, limit=1)


@flow(name="train-wflw")
def train_wflw(
    overrides: dict[str, Any] | None = None,
    params_file: str | None = None,
    promote: bool = False,
    workspace: str | None = None,
) -> dict[str, Any]:
    """Run the WFLW pipeline (DVC stages fetch, convert, train, evaluate, register) and show the outcome.

    Args:
        overrides: Params to change for this run, dotted keys of params.yaml to values, e.g.
            {"train.epochs": 3}. Applied as `dvc exp run -S` applies them; the run is saved as a DVC
            experiment named after the flow run, and params.yaml is restored afterwards.
        params_file: A complete params file of the checkout to run instead of params.yaml, e.g.
            configs/deeppose_res50_wingloss_wflw.yaml (overrides apply on top).
        promote: After registering, move alias `champion` to the new version if it beats the champion
            (`wflw promote`); a refusal is an outcome, not a failure.
        workspace: The DVC project to run in; default: the checkout this flow file is in.
    """
    root = Path(workspace).resolve() if workspace else CHECKOUT
    experiment = re.sub(r"[^A-Za-z0-9_-]+", "-", flow_run.name or "train-wflw")
    env = command_env(experiment)
    limit = workspace_limit(root)
    ensure_limit(limit)
    logger = get_run_logger()
    logger.info("workspace %s: waiting for concurrency limit %s", root, limit)
    with concurrency(limit, occupy=1, strict=True, lease_duration=LEASE_S):
        params_path = root / "params.yaml"
        original = params_path.read_bytes()
        try:
            apply_params(root, params_file, overrides or {})
            remote = default_remote(root, env)
            for stage in STAGES:
                stage_task = run_stage.with_options(name=f"dvc repro {stage}")
                if stage == "fetch":
                    stage_task = stage_task.with_options(
                        retries=FETCH_RETRIES,
                        retry_delay_seconds=FETCH_RETRY_DELAYS_S,
                        retry_condition_fn=network_error,
                    )
                stage_task(stage, root, env, pull=remote is not None)
            promoted = promote_version(root, env) if promote else None
            save_experiment(root, env, experiment)
            push_state = push(root, env, remote, return_state=True) if remote else None
        finally:
            params_path.write_bytes(original)
    failed = push_state is not None and not push_state.is_completed()
    push_error = str(push_state.result(raise_on_failure=False)) if failed else None
    outcome = publish(root, promoted, experiment, remote, push_error)
    if push_error:
        return Failed(message=f"{push_error} ({KEPT})", data=outcome)
    return outcome
