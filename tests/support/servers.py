"""Real servers for end-to-end tests, on 127.0.0.1: PostgreSQL, an MLflow server on it, Prefect's server, an
S3-protocol server, and a gate to take a server's port down and up again.

Each is a context manager that stops what it started on exit, also when the test body raises.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

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
def mlflow_server(
    backend_uri: str,
    artifacts: Path,
    port: int | None = None,
    destination: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """`mlflow server` on `backend_uri` with proxied artifact storage in `artifacts` (clients see
    `mlflow-artifacts:` locations), or in `destination` when given (an s3:// URI, `env` holding the
    server's credentials and endpoint), on 127.0.0.1; yields its URL once GET /health answers 200. Runs in its
    own process group (the CLI and its uvicorn), all of it killed on exit; its log is `artifacts`'s sibling
    `mlflow-server-<port>.log`."""
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    artifacts = artifacts.resolve()  # the server runs in its parent dir
    artifacts.mkdir(parents=True, exist_ok=True)
    log = artifacts.parent / f"mlflow-server-{port}.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", destination or str(artifacts),
        "--serve-artifacts",
        "--host", HOST, "--port", str(port),
        "--workers", "1",  # the default 4 took 20-30 s to answer on 2 cores, 1 takes ~10 s
    ]  # fmt: skip
    # No job runner: its 7 background workers (GenAI judges, trace rollups) cost ~2 GB and most of the start.
    server_env = {
        **os.environ,
        **(env or {}),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    with background(cmd, artifacts.parent, server_env, log) as proc:
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


@dataclass(frozen=True)
class S3:
    """An S3-protocol endpoint and the credentials of a user allowed everything on it: what a team is given
    for MinIO, Ceph or AWS. Clients get them as a user would: the endpoint URL in their config, the
    credentials in the environment (`env`)."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )


S3_USER_SETUP_CALLS = 3
"""The IAM calls `s3_server` makes before the server checks every request's signature."""


@contextlib.contextmanager
def s3_server(root: Path, port: int | None = None) -> Iterator[S3]:
    """moto's standalone server (`moto_server`), the one S3-protocol server that installs here, on 127.0.0.1,
    checking credentials as S3 does: its first S3_USER_SETUP_CALLS requests, unsigned, create an IAM user
    with an access key allowed all of S3; every request after must be signed with a key it knows. Yields
    the endpoint and that key. Buckets and objects live in its memory; its log is `root`/moto.log."""
    import boto3

    port = port or free_port()
    endpoint = f"http://{HOST}:{port}"
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(S3_USER_SETUP_CALLS)}
    cmd = [str(Path(sys.executable).parent / "moto_server"), "-H", HOST, "-p", str(port)]
    log = root / "moto.log"
    with background(cmd, root, env, log) as proc:
        wait_healthy(f"{endpoint}/moto-api/", proc, log)
        iam = boto3.client(
            "iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )  # fmt: skip
        iam.create_user(UserName="wflw")
        key = iam.create_access_key(UserName="wflw")["AccessKey"]
        allow_s3 = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="wflw", PolicyName="s3", PolicyDocument=json.dumps(allow_s3))
        yield S3(endpoint, key["AccessKeyId"], key["SecretAccessKey"])


class Gate:
    """A loopback port forwarding to the server at `target` (its http://host:port URL) that can be shut and
    opened again: shut, it refuses connections and cuts the open ones, as a server that went down; `url`
    is its address. `shut_at(marker)` shuts it when a client sends bytes holding `marker`, before they go
    on: a server that goes down at a given request, whatever the clock."""

    def __init__(self, target: str) -> None:
        address = urlsplit(target)
        self.target = (address.hostname, address.port)
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._markers: tuple[bytes, ...] = ()
        self.tripped = threading.Event()

    def shut_at(self, *markers: bytes) -> None:
        self.tripped.clear()
        self._markers = markers

    def __enter__(self) -> Gate:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shut()

    def open(self) -> None:
        self._markers = ()
        listener = socket.create_server((HOST, self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def shut(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes its accept(), which would keep it listening
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # the server behind is down: so is the gate, for this client
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for source, sink, watch in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(source, sink, watch), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, watch: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if watch and any(marker in data for marker in self._markers):
                    self.tripped.set()
                    self.shut()
                    return
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


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
