"""Atomic outputs: every file is written to a temporary file beside it, then renamed into place."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .errors import PipelineError

NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""The errnos of a write that found no room: a full disk, a used-up quota, a file-size limit."""


class NoRoomError(PipelineError):
    """An output could not be written for lack of space; the file it would have replaced is unchanged."""


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix); it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    prefix = f".{path.name}.{os.getpid()}."
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=f".tmp{path.suffix}")
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except Exception as err:
        full = None if isinstance(err, NoRoomError) else _no_room(err)
        if full is None:
            raise
        raise NoRoomError(
            f"cannot write to {path.parent}/: {full.strerror} (errno {full.errno}); free some space there or "
            "write the outputs elsewhere (the files already there are unchanged)"
        ) from err
    finally:
        temp.unlink(missing_ok=True)


def _no_room(err: BaseException) -> OSError | None:
    """The OSError of a write that found no room (NO_ROOM) behind `err`, through its causes and contexts
    (torch.save reports one as a RuntimeError raised while handling it)."""
    seen: set[int] = set()
    found: BaseException | None = err
    while found is not None and id(found) not in seen:
        if isinstance(found, OSError) and found.errno in NO_ROOM:
            return found
        seen.add(id(found))
        found = found.__cause__ or found.__context__
    return None


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporaries of `path` that writers killed mid-write left behind: those whose name holds
    no pid, or the pid of a process that is gone (a running writer's is kept)."""
    prefix, suffix = f".{path.name}.", f".tmp{path.suffix}"
    for leftover in path.parent.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"):
        owner = leftover.name[len(prefix) : -len(suffix)].split(".")[0]
        if not (owner.isdigit() and process_running(int(owner))):
            leftover.unlink(missing_ok=True)


def process_running(pid: int) -> bool:
    """Whether process `pid` exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def atomic_paths(paths: Iterable[Path]) -> Iterator[dict[Path, Path]]:
    """Temporary paths for several outputs: all are renamed when the block succeeds, none otherwise."""
    with ExitStack() as stack:
        yield {Path(path): stack.enter_context(atomic_path(path)) for path in paths}


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex, read in chunks."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
