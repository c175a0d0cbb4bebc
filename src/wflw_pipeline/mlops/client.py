"""The MLflow client every command uses: the tracking URI, the experiment, calls retried with a backoff."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from ..errors import PipelineError
from ..params import TrackingParams
from ..retry import with_backoff
from .provenance import project_root

logger = logging.getLogger(__name__)

T = TypeVar("T")


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Marks the experiment as model training, so that MLflow 3's UI opens on its runs."""
BATCH = 100
"""MLflow takes at most 100 params or tags per log_batch call."""
RETRY_DELAY_S = 0.5
"""The first retry of a call waits this long, each further one twice as long."""


class TrackingError(PipelineError):
    """The tracking server cannot be reached or refuses a call (one line: what, where, why)."""


def tracking_uri(config: TrackingParams) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded default: the project's sqlite:///mlflow.db.

    A relative SQLite path is made absolute against the project root: `dvc exp run` may run a stage in
    a temporary copy, and MLflow caches a store per URI string within a process.
    """
    uri = config.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(f"{prefix}/") and uri != f"{prefix}:memory:":
        return f"{prefix}{project_root() / uri.removeprefix(prefix)}"
    return uri


def default_artifact_location(uri: str) -> str | None:
    """mlartifacts/ beside a SQLite database; None lets a tracking server choose (its proxied storage)."""
    database = sqlite_file(uri)
    return None if database is None else (database.parent / "mlartifacts").as_uri()


def _short(err: BaseException) -> str:
    """An exception as one short line (MLflow's messages can span many lines)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:240]}"


@dataclass
class Tracking:
    """An MLflow client on one tracking URI whose calls retry `retries` times with a short backoff."""

    client: MlflowClient
    uri: str
    retries: int

    def call(self, what: str, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """fn(*args, **kwargs), retried; TrackingError naming `what` and the server once every try failed."""
        try:
            return with_backoff(lambda: fn(*args, **kwargs), self.retries, RETRY_DELAY_S)
        except Exception as err:  # MLflow raises many types for a server that is down or refuses
            if damage := store_damage(self.uri):
                raise TrackingError(damage) from err
            raise TrackingError(
                f"MLflow at {self.uri}: could not {what} after {self.retries} tries ({_short(err)})"
            ) from err

    def log_batch(
        self,
        run_id: str,
        *,
        metrics: Sequence[Metric] = (),
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Metrics, params and tags in as few calls as MLflow's batch limits allow."""
        items: list[Metric | Param | RunTag] = [
            *metrics,
            *(Param(k, v) for k, v in (params or {}).items()),
            *(RunTag(k, v) for k, v in (tags or {}).items()),
        ]
        for chunk in _chunks(items, BATCH):
            self.call(
                "log to the run",
                self.client.log_batch,
                run_id,
                metrics=[m for m in chunk if isinstance(m, Metric)],
                params=[p for p in chunk if isinstance(p, Param)],
                tags=[t for t in chunk if isinstance(t, RunTag)],
            )


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def connect(config: TrackingParams) -> Tracking:
    """A client on the configured server; HTTP calls time out after tracking.timeout_s and are retried by us.

    MLflow's own HTTP retries back off for minutes against a server that is down, so they are turned
    off here unless the user set MLFLOW_HTTP_REQUEST_MAX_RETRIES; `Tracking.call` retries instead.
    Artifacts come through the server, as they go to it, unless the user set
    MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD: a server with its artifacts on S3 hands out presigned URLs
    of its S3 endpoint otherwise, which this machine may not reach.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(math.ceil(config.timeout_s)))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    uri = tracking_uri(config)
    database = sqlite_file(uri)
    if database is not None and database.is_file() and database.stat().st_size == 0:
        raise TrackingError(
            f"{database} is empty (0 bytes), not an MLflow store: restore it from a backup, or delete it "
            "to start a new store"
        )
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    except Exception as err:  # SQLAlchemy's DatabaseError for a damaged SQLite file, and others
        raise TrackingError(store_damage(uri) or f"cannot open MLflow at {uri} ({_short(err)})") from err
    return Tracking(client, uri, config.retries)


def store_damage(uri: str) -> str | None:
    """Why a SQLite store's file is unreadable (SQLite's quick_check), as an error line; None when the file
    is sound, missing, or the store is not SQLite."""
    database = sqlite_file(uri)
    if database is None or not database.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as db:
            found = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as err:
        found = str(err)
    if found == "ok":
        return None
    return (
        f"{database} is not a readable MLflow store (SQLite: {found}): restore it from a backup, or point "
        "tracking.uri elsewhere"
    )


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for other stores and :memory:)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == f"{prefix}:memory:":
        return None
    return Path(uri.removeprefix(prefix))


def experiment_id(tracking: Tracking, name: str) -> str:
    """The experiment `name`, created (tagged as model training) when it does not exist yet."""
    client = tracking.client
    experiment = tracking.call("look up the experiment", client.get_experiment_by_name, name)
    if experiment is not None:
        return experiment.experiment_id
    location = default_artifact_location(tracking.uri)
    created = tracking.call(
        "create the experiment", client.create_experiment, name, location, tags=EXPERIMENT_KIND
    )
    logger.info("MLflow: created experiment %r at %s", name, tracking.uri)
    return created


@contextmanager
def fluent(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model, register_model) on `uri`; the process's URIs are restored after."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
