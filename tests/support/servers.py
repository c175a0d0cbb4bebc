"""Real servers for end-to-end tests, on 127.0.0.1: PostgreSQL, an MLflow server on it, Prefect's server.

Each is a context manager that stops what it started on exit, also when the test body raises.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

HOST = "127.0.0.1"
PG_USER = "mlflow"
PG_DATABASE = "mlflow"
PG_OS_USER = "postgres"
"""Under root the PostgreSQL binaries run as this user (Debian's package makes it): initdb refuses root."""
START_TIMEOUT_S = 300
"""How long a server may take to answer its health check. A server that exits fails at once; the bound only
ends a hang, and is generous for a 2-core machine loaded by other work."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; another process may take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _log_tail(log: Path, chars: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(no log: {exc})"


def _pg_bindir() -> Path:
    """The directory of initdb, pg_ctl and postgres: initdb on PATH (symlinks resolved), else the newest
    /usr/lib/postgresql/<major>/bin (Debian keeps them off PATH). Skips the test when there is none."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    dirs = [Path(d).parent for d in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    if not dirs:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql")
    return max(dirs, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else -1)


def _traversable_by_others(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port, trust auth, with an empty database `mlflow`;
    yields its SQLAlchemy URL. Its data and log lie in a new dir under `root`; when running as root (the
    binaries then run as the `postgres` user, which cannot enter pytest's 0700 tmp dirs) in one under the
    system temp dir instead, removed on exit, its log copied to `root`."""
    import psycopg

    bindir = _pg_bindir()
    as_root = os.geteuid() == 0
    if as_root:
        try:
            pg_os_user = pwd.getpwnam(PG_OS_USER)
        except KeyError:
            raise RuntimeError(
                f"running as root, but there is no {PG_OS_USER!r} user to run PostgreSQL as (initdb refuses "
                "root): install Debian's postgresql package, which creates it"
            ) from None
        base = Path(tempfile.mkdtemp(prefix="postgres-"))
        if not _traversable_by_others(base.parent):
            shutil.rmtree(base)
            raise RuntimeError(f"{base.parent} is not reachable by the {PG_OS_USER!r} user: set TMPDIR")
        os.chown(base, pg_os_user.pw_uid, pg_os_user.pw_gid)
        run_as = {"user": pg_os_user.pw_uid, "group": pg_os_user.pw_gid, "extra_groups": []}
    else:
        base = Path(tempfile.mkdtemp(prefix="postgres-", dir=root))
        run_as = {}
    data, sockets, log = base / "data", base / "sockets", base / "postgres.log"
    port = free_port()

    def pg(*args: str, timeout: float = 120) -> None:
        subprocess.run(args, cwd=base, check=True, timeout=timeout, capture_output=True, text=True, **run_as)

    started = False
    try:
        try:
            # Made by the user that runs the server, so that it is its own.
            pg("mkdir", "-m", "700", str(sockets))
            # A throwaway server: durability off for speed (initdb -N: no fsync; fsync, synchronous_commit).
            initdb = ["-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-locale", "-N"]
            pg(str(bindir / "initdb"), *initdb)
            options = f"-h {HOST} -p {port} -k {sockets} -c fsync=off -c synchronous_commit=off"
            started = True
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start")
        except subprocess.CalledProcessError as exc:
            failed = f"{Path(exc.cmd[0]).name} failed ({exc.returncode}): {exc.stdout}{exc.stderr}"
            raise RuntimeError(f"{failed}\n{_log_tail(log)}") from exc
        # autocommit: CREATE DATABASE cannot run inside a transaction
        with psycopg.connect(
            host=HOST, port=port, user=PG_USER, dbname="postgres", connect_timeout=10, autocommit=True
        ) as conn:
            conn.execute(f"CREATE DATABASE {PG_DATABASE}")
        yield f"postgresql://{PG_USER}@{HOST}:{port}/{PG_DATABASE}"
    finally:
        try:
            if started:
                _pg_stop(pg, bindir, data)
        finally:
            if as_root:
                with contextlib.suppress(OSError):
                    shutil.copyfile(log, root / "postgres.log")
                shutil.rmtree(base, ignore_errors=True)


def _pg_stop(pg, bindir: Path, data: Path) -> None:
    """pg_ctl's fast shutdown; if that fails or hangs, SIGKILL the postmaster named in postmaster.pid."""
    try:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop", timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, port: int | None = None) -> Iterator[str]:
    """`mlflow server` on `backend_uri` with proxied artifact storage in `artifacts` (clients see
    `mlflow-artifacts:` locations) on 127.0.0.1; yields its URL once GET /health answers 200. Runs in its own
    process group (the CLI and its uvicorn), all of it killed on exit; its log is `artifacts`'s
    sibling `mlflow-server-<port>.log`."""
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    artifacts = artifacts.resolve()  # the server runs in its parent dir
    artifacts.mkdir(parents=True, exist_ok=True)
    log = artifacts.parent / f"mlflow-server-{port}.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(artifacts),
        "--serve-artifacts",
        "--host", HOST, "--port", str(port),
        "--workers", "1",  # the default 4 took 20-30 s to answer on 2 cores, 1 takes ~10 s
    ]  # fmt: skip
    # No job runner: its 7 background workers (GenAI judges, trace rollups) cost ~2 GB and most of the start.
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    with background(cmd, artifacts.parent, env, log) as proc:
        wait_healthy(f"{url}/health", proc, log)
        yield url


@contextlib.contextmanager
def prefect_server(home: Path, port: int | None = None) -> Iterator[dict[str, str]]:
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME (and so its own SQLite database) in
    `home`; yields the environment its clients need (PREFECT_API_URL, PREFECT_HOME), once /api/health
    answers. Its log is `home`/prefect-server.log."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://{HOST}:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    cmd = [
        str(Path(sys.executable).parent / "prefect"),
        "server",
        "start",
        "--host",
        HOST,
        "--port",
        str(port),
    ]
    log = home / "prefect-server.log"
    with background(cmd, home, env, log) as proc:
        wait_healthy(f"{env['PREFECT_API_URL']}/health", proc, log)
        yield {key: env[key] for key in ("PREFECT_HOME", "PREFECT_API_URL")}


@contextlib.contextmanager
def background(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """`cmd` in its own process group, its output in `log`; the whole group is killed on exit."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        _kill_group(proc)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until GET `url` answers 200; fail with the log's tail if `proc` exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) early:\n{_log_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not healthy after {timeout:.0f} s:\n{_log_tail(log)}")
        time.sleep(0.25)


def _kill_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group led by `proc`, SIGKILL it if `proc` outlives `timeout`; then SIGKILL any
    straggler left in the group (a worker whose parent went first)."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group's id
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
