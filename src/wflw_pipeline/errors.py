"""The errors a user can cause, every exit code a command ends with, and the error file the flow reads."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXIT_REFUSED = 1
"""A command that ran but whose answer is no: the gate refused the promotion, some images failed."""
EXIT_USER_ERROR = 2
"""Bad input, params or environment (PipelineError)."""
EXIT_TEMPFAIL = 75
"""sysexits.h's EX_TEMPFAIL: a failure that may pass when retried later, which the Prefect flow retries."""
EXIT_SIGNAL_BASE = 128
"""A command stopped by signal N exits 128 + N, as a shell reports it: 130 for Ctrl-C, 143 for SIGTERM."""
ERROR_FILE_ENV = "WFLW_ERROR_FILE"
"""The environment variable naming the file where a failed `wflw` command writes its error (see
`write_error_file`): the flow sets it for each stage, and reads the stage's error from it."""


class PipelineError(ValueError):
    """Bad input, params or environment, with a message naming the file, line or key."""


class TransientError(PipelineError):
    """A failure that may pass when retried later (a network outage): exit code EXIT_TEMPFAIL."""

    exit_code = EXIT_TEMPFAIL


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (Ctrl-C, `kill`, a cancelled Prefect flow run) arrived: the command stops cleanly."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Interrupted as Ctrl-C does, so that `finally` blocks and the code
    that closes an MLflow run run on either; the previous handler is restored after. (Only the main
    thread may set handlers: elsewhere the block runs as it is.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _sigterm_as_by_default_in_a_forked_child() -> None:
    """A forked child (a multiprocessing worker) dies of SIGTERM at once, as its pool expects: a Python
    handler runs only between bytecodes, so one that reached a worker about to wait in C was lost."""
    if signal.getsignal(signal.SIGTERM) is _raise_interrupted:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_sigterm_as_by_default_in_a_forked_child)


def interrupted_exit_code(err: KeyboardInterrupt) -> int:
    """128 + the signal that interrupted the command (SIGINT when it was a plain KeyboardInterrupt)."""
    return EXIT_SIGNAL_BASE + getattr(err, "signum", signal.SIGINT)


def require_mlflow() -> None:
    """A clear error, not an ImportError traceback, where MLflow is not installed."""
    if importlib.util.find_spec("mlflow") is None:
        raise PipelineError(
            "tracking.enabled is true but MLflow is not installed: install it, or run with "
            "--set tracking.enabled=false (e.g. on a bare GPU box)"
        )


def exit_code(err: PipelineError) -> int:
    """The exit code of a command that failed with `err`: its class's, else EXIT_USER_ERROR."""
    return getattr(err, "exit_code", EXIT_USER_ERROR)


def write_error_file(message: str, code: int) -> None:
    """{"message": the one-line error, "exit_code": code} into $WFLW_ERROR_FILE, when it is set."""
    if path := os.environ.get(ERROR_FILE_ENV):
        Path(path).write_text(json.dumps({"message": message, "exit_code": code}) + "\n")


def read_error_file(path: Path) -> tuple[str, int] | None:
    """(message, exit code) a failed command wrote with `write_error_file`, or None if none did."""
    try:
        written = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return str(written["message"]), int(written["exit_code"])
