"""The champion lock (mlops/lock.py) on real registries, SQLite and a tracking server on PostgreSQL: two
`wflw promote` processes started while the lock is held both wait, then move one after the other, and the
history, aliases and rollback agree; a killed holder's lock is broken when its lease ends."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pipeline_cli import params_file, wflw
from servers import mlflow_server, postgres

from wflw_pipeline.errors import EXIT_TEMPFAIL
from wflw_pipeline.mlops.client import Tracking
from wflw_pipeline.mlops.lock import EXPIRES, HOLDER, Lease, LeaseExpired, _take_away, lock_name

MODEL = "m"
LOCK = lock_name(MODEL)
WFLW = str(Path(sys.executable).with_name("wflw"))


def _registry(client: MlflowClient, versions: int = 3) -> None:
    """Registered model MODEL with `versions` versions, each from its own run."""
    experiment = client.create_experiment("tests")
    client.create_registered_model(MODEL)
    for _ in range(versions):
        run = client.create_run(experiment)
        client.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)


def _hold(client: MlflowClient, expires_in_s: float, holder: str = "test-holder") -> None:
    """The lock as another process holds it, its lease ending `expires_in_s` from now."""
    expires = int((time.time() + expires_in_s) * 1000)
    client.create_registered_model(LOCK, tags={HOLDER: holder, EXPIRES: str(expires)})


def _exists(client: MlflowClient, name: str) -> bool:
    try:
        client.get_registered_model(name)
    except MlflowException:
        return False
    return True


def _moves(client: MlflowClient) -> list[dict]:
    tags = client.get_registered_model(MODEL).tags
    return sorted(
        (json.loads(v) for k, v in tags.items() if k.startswith("wflw.move.")), key=lambda m: m["seq"]
    )


def _champion(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias(MODEL, "champion").version)


def _start(root: Path, log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [WFLW, *args, "--params", str(root / "params.yaml")], cwd=root, env=env, stdout=out, stderr=out
        )


def _cli(root: Path, *args: str) -> None:
    done = subprocess.run([WFLW, *args, "--params", str(root / "params.yaml")], cwd=root, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]


def _until_waiting(proc: subprocess.Popen, log: Path) -> None:
    """Return once `proc` says it waits for the lock; fail if it ends first (it moved past the lock)."""
    while proc.poll() is None and "waiting for it" not in log.read_text():
        time.sleep(0.05)
    assert proc.poll() is None, f"moved the champion while the lock was held:\n{log.read_text()[-3000:]}"


def _two_promotions_at_once(root: Path, client: MlflowClient) -> None:
    _cli(root, "promote", "--version", "1", "--force", "--reason", "first")
    _hold(client, expires_in_s=3600)
    logs = [root / "a.log", root / "b.log"]
    procs = [
        _start(root, log, "promote", "--version", version, "--force", "--reason", f"move to v{version}")
        for log, version in zip(logs, ("2", "3"), strict=True)
    ]
    for proc, log in zip(procs, logs, strict=True):
        _until_waiting(proc, log)
    client.delete_registered_model(LOCK)
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait() == 0, log.read_text()[-3000:]

    first, second, third = _moves(client)
    assert [first["seq"], second["seq"], third["seq"]] == [1, 2, 3]
    assert (first["to"], second["from"], third["from"]) == ("1", "1", second["to"])
    assert {second["to"], third["to"]} == {"2", "3"}
    assert _champion(client) == third["to"]
    demoted = client.get_model_version(MODEL, second["to"]).tags
    assert demoted["wflw.demoted_by"] == third["to"] and demoted["wflw.promoted_from"] == "1"
    assert client.get_model_version(MODEL, third["to"]).tags["wflw.promoted_from"] == second["to"]
    _cli(root, "rollback")
    assert _champion(client) == second["to"]
    assert not _exists(client, LOCK)


@pytest.mark.slow
def test_two_promotions_at_once_move_one_after_the_other_on_sqlite(tmp_path):
    params_file(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/mlflow.db")
    _registry(client)
    _two_promotions_at_once(tmp_path, client)


@pytest.mark.slow
def test_two_promotions_at_once_move_one_after_the_other_on_a_server_on_postgresql(tmp_path):
    with postgres(tmp_path) as db, mlflow_server(db, tmp_path / "artifacts") as url:
        params_file(tmp_path, uri=url)
        client = MlflowClient(url, url)
        _registry(client)
        _two_promotions_at_once(tmp_path, client)


@pytest.fixture
def sqlite_registry(tmp_path, monkeypatch) -> MlflowClient:
    monkeypatch.chdir(tmp_path)
    params_file(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/mlflow.db")
    _registry(client, versions=1)
    return client


def test_a_lock_whose_lease_ran_out_is_broken(sqlite_registry, tmp_path, caplog):
    _hold(sqlite_registry, expires_in_s=-1, holder="killed-promoter")
    with caplog.at_level(logging.WARNING):
        assert wflw(tmp_path, "promote", "--version", "1", "--force", "--reason", "after a crash") == 0
    assert "killed-promoter" in caplog.text and "breaking the lock" in caplog.text
    assert _champion(sqlite_registry) == "1" and not _exists(sqlite_registry, LOCK)
    assert [m.name for m in sqlite_registry.search_registered_models()] == ["m"]


def test_a_lock_held_longer_than_the_wait_is_one_line_and_moves_nothing(sqlite_registry, tmp_path, caplog):
    _hold(sqlite_registry, expires_in_s=3600)
    args = ("promote", "--version", "1", "--force", "--reason", "r", "--set", "registry.lock_lease_s=0.2")
    assert wflw(tmp_path, *args) == EXIT_TEMPFAIL
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error.startswith(f"{LOCK} is held by test-holder until ") and "\n" not in error
    assert _moves(sqlite_registry) == [] and _exists(sqlite_registry, LOCK)
    assert wflw(tmp_path, "rollback", "--set", "registry.lock_lease_s=0.2") == EXIT_TEMPFAIL


def test_taking_away_a_lock_that_a_newer_holder_took_puts_it_back(sqlite_registry, tmp_path):
    _hold(sqlite_registry, expires_in_s=3600, holder="newer")
    tracking = Tracking(sqlite_registry, f"sqlite:///{tmp_path}/mlflow.db", retries=1)
    _take_away(tracking, LOCK, expected="expired-one", taker="breaker")
    assert sqlite_registry.get_registered_model(LOCK).tags[HOLDER] == "newer"
    assert sorted(m.name for m in sqlite_registry.search_registered_models()) == ["m", LOCK]


def test_a_lease_that_ran_out_refuses_to_write():
    Lease("m.promotion-lock", "me", time.monotonic() + 60, 60).check()
    with pytest.raises(
        LeaseExpired, match=r"longer than the 0.5 s lease of m.promotion-lock .*nothing was moved"
    ):
        Lease("m.promotion-lock", "me", time.monotonic() - 1, 0.5).check()
