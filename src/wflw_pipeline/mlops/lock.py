"""The lock every move of alias `champion` holds: a registered model `<model>.promotion-lock`, which only one
process can create (the registry's unique model name, in SQLite and PostgreSQL alike), deleted when the
move is done.

The lock carries its holder and the end of its lease as tags. A lock whose lease has ended (its holder was
killed) is broken by renaming it to a name of the breaker's own: a rename succeeds for one process only,
and the breaker deletes what it took only if it is the expired lock it saw (else it puts it back).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from ..errors import PipelineError, TransientError
from .client import Tracking

logger = logging.getLogger(__name__)

SUFFIX = ".promotion-lock"
HOLDER = "wflw.lock.holder"
EXPIRES = "wflw.lock.expires_ms"
_TAKEN = {ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)}
_POLL_S = (0.05, 1.0)
"""The first and the longest wait between two tries to take a lock held by another process."""


class LockBusy(TransientError):
    """Another promote or rollback held the lock for longer than this one waits."""


class LeaseExpired(PipelineError):
    """The move took longer than the lock's lease: another process may have taken the lock since."""


@dataclass(frozen=True)
class Lease:
    """A held lock: the move must be written before `deadline` (time.monotonic)."""

    lock: str
    holder: str
    deadline: float
    lease_s: float

    def check(self) -> None:
        """Raise LeaseExpired when the lease has run out (nothing may be written then)."""
        if time.monotonic() >= self.deadline:
            raise LeaseExpired(
                f"the move took longer than the {self.lease_s:g} s lease of {self.lock} "
                "(registry.lock_lease_s): nothing was moved; run it again"
            )


def lock_name(model_name: str) -> str:
    return f"{model_name}{SUFFIX}"


def new_holder() -> str:
    """Who holds a lock, for people reading the registry (host, pid) and unique per process and call."""
    return f"{socket.gethostname()}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def champion_lock(tracking: Tracking, model_name: str, lease_s: float) -> Iterator[Lease]:
    """Hold the lock of `model_name`'s champion for one move; wait for another holder up to 2 x lease_s."""
    lock, holder = lock_name(model_name), new_holder()
    lease = _acquire(tracking, lock, holder, lease_s)
    try:
        yield lease
    finally:
        _take_away(tracking, lock, holder, holder)


def _acquire(tracking: Tracking, lock: str, holder: str, lease_s: float) -> Lease:
    give_up = time.monotonic() + 2 * lease_s
    wait = _POLL_S[0]
    while True:
        start = time.monotonic()
        if _create(tracking, lock, holder, lease_s):
            return Lease(lock, holder, start + lease_s, lease_s)
        found = _tags(tracking, lock) or {}
        if found.get(HOLDER) == holder:  # created by a try whose answer was lost
            return Lease(lock, holder, start + lease_s, lease_s)
        if found and _expired(found):
            logger.warning("%s: the lease of %s ran out; breaking the lock", lock, found.get(HOLDER))
            _take_away(tracking, lock, found.get(HOLDER), holder)
            continue
        if time.monotonic() + wait > give_up:
            raise LockBusy(
                f"{lock} is held by {found.get(HOLDER, 'another process')} until {_when(found)}: another "
                "promote or rollback is moving the champion; run this again when it is done"
            )
        if found and wait == _POLL_S[0]:
            logger.info("%s is held by %s: waiting for it", lock, found.get(HOLDER))
        time.sleep(wait)
        wait = min(2 * wait, _POLL_S[1])


def _create(tracking: Tracking, lock: str, holder: str, lease_s: float) -> bool:
    """Create the lock model; False when it exists already."""
    expires = int((time.time() + lease_s) * 1000)
    tags = {HOLDER: holder, EXPIRES: str(expires)}
    description = "Held by `wflw promote` or `wflw rollback` while it moves the champion; deleted after."
    return tracking.call(
        "take the promotion lock",
        _unless_exists,
        lambda: tracking.client.create_registered_model(lock, tags=tags, description=description),
    )


def _unless_exists(create: Callable[[], Any]) -> bool:
    """False when another process holds the name: the store says it exists, or (PostgreSQL behind a
    server) that the holder it looked up after the unique-key violation is not visible to it yet."""
    try:
        create()
    except MlflowException as err:
        if err.error_code in _TAKEN:
            return False
        raise
    return True


def _tags(tracking: Tracking, name: str) -> dict[str, str] | None:
    """The tags of registered model `name`, None when there is none."""
    try:
        return dict(tracking.client.get_registered_model(name).tags)
    except MlflowException:
        return None


def _expired(tags: dict[str, str]) -> bool:
    try:
        return int(tags[EXPIRES]) <= time.time() * 1000
    except (KeyError, ValueError):
        return True


def _when(tags: dict[str, str]) -> str:
    try:
        return datetime.fromtimestamp(int(tags[EXPIRES]) / 1000, UTC).isoformat(timespec="seconds")
    except (KeyError, ValueError):
        return "unknown"


def _take_away(tracking: Tracking, lock: str, expected: str | None, taker: str) -> None:
    """Delete the lock if `expected` holds it: rename it to a name of `taker`'s own (one rename wins), then
    delete it, or rename it back when it turned out to be a newer holder's."""
    taken = f"{lock}.taken-by-{taker}"
    with contextlib.suppress(Exception):  # another process renamed it first, or it is gone
        tracking.client.rename_registered_model(lock, taken)
    tags = _tags(tracking, taken)
    if tags is None:
        return
    if tags.get(HOLDER) == expected:
        tracking.call("release the promotion lock", tracking.client.delete_registered_model, taken)
        return
    try:
        tracking.client.rename_registered_model(taken, lock)
    except Exception:  # a new lock exists already: this one is nobody's now
        tracking.call("release the promotion lock", tracking.client.delete_registered_model, taken)
