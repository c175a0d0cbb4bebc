"""The user errors and exit codes (errors.py): which code a failed command exits with, the error file the
Prefect flow reads ($WFLW_ERROR_FILE), and the one-line error where MLflow is not installed."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest
from paths import ROOT

from wflw_pipeline.errors import (
    ERROR_FILE_ENV,
    EXIT_REFUSED,
    EXIT_TEMPFAIL,
    EXIT_USER_ERROR,
    Interrupted,
    PipelineError,
    TransientError,
    exit_code,
    interrupted_exit_code,
    read_error_file,
    require_mlflow,
    signals_interrupt,
    write_error_file,
)


class _BadParams(PipelineError):
    pass


class _Outage(TransientError):
    pass


def test_the_exit_codes_are_refused_1_user_error_2_and_sysexits_tempfail_75():
    assert (EXIT_REFUSED, EXIT_USER_ERROR, EXIT_TEMPFAIL) == (1, 2, 75)
    assert ERROR_FILE_ENV == "WFLW_ERROR_FILE"


def test_a_pipeline_error_exits_2_and_a_transient_one_75_subclasses_included():
    assert exit_code(PipelineError("params.yaml: train.lr: must be > 0")) == 2
    assert exit_code(_BadParams("bad")) == 2
    assert exit_code(TransientError("https://x/a.tar.gz: timed out")) == 75
    assert exit_code(_Outage("down")) == 75
    assert issubclass(TransientError, PipelineError)  # `except PipelineError` catches both


def test_the_error_file_round_trips_message_and_exit_code(tmp_path, monkeypatch):
    path = tmp_path / "error.json"
    monkeypatch.setenv(ERROR_FILE_ENV, str(path))
    write_error_file("https://x/a.tar.gz: download failed after 3 attempts: timed out", 75)
    assert path.read_text() == (
        '{"message": "https://x/a.tar.gz: download failed after 3 attempts: timed out", "exit_code": 75}\n'
    )
    assert read_error_file(path) == ("https://x/a.tar.gz: download failed after 3 attempts: timed out", 75)
    write_error_file('a "quoted" path: C:\\data', 2)  # the last error wins
    assert read_error_file(path) == ('a "quoted" path: C:\\data', 2)


def test_without_the_variable_no_error_file_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ERROR_FILE_ENV, raising=False)
    write_error_file("bad params", 2)
    assert list(tmp_path.iterdir()) == []


def test_reading_a_missing_error_file_is_none(tmp_path):
    assert read_error_file(tmp_path / "missing.json") is None


def test_require_mlflow_passes_where_mlflow_is_installed_and_says_what_to_do_where_it_is_not():
    assert require_mlflow() is None
    # -S: no site-packages, so no MLflow; errors.py itself needs only the standard library.
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r})\n"
        "from wflw_pipeline.errors import PipelineError, require_mlflow\n"
        "try:\n    require_mlflow()\nexcept PipelineError as err:\n    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout == (
        "tracking.enabled is true but MLflow is not installed: install it, or run with "
        "--set tracking.enabled=false (e.g. on a bare GPU box)\n"
    )


def test_sigterm_within_the_block_is_an_interrupt_exiting_143_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as raised, signals_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
    assert isinstance(raised.value, KeyboardInterrupt) and raised.value.signum == signal.SIGTERM
    assert interrupted_exit_code(raised.value) == 143 and interrupted_exit_code(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) is before


def _wait_where_python_runs_no_handler(ready) -> None:
    """Block in C for ever, as a pool worker does between its last signal check and its semaphore wait."""
    mutex = ctypes.create_string_buffer(64)  # zeros: PTHREAD_MUTEX_INITIALIZER
    libc = ctypes.CDLL(None)
    libc.pthread_mutex_lock(mutex)
    ready.set()
    libc.pthread_mutex_lock(mutex)


def test_a_process_forked_within_the_block_dies_of_sigterm_even_while_it_waits_in_c():
    """multiprocessing.Pool.terminate() SIGTERMs its forked workers. With the parent's Python handler,
    a worker that the signal reached just before its semaphore wait never ran it, and the pool's exit
    waited for that worker for ever (what hung `wflw fetch`'s synthetic renderer about once in 70 runs)."""
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    with signals_interrupt():
        child = context.Process(target=_wait_where_python_runs_no_handler, args=(ready,))
        child.start()
        ready.wait()
        child.terminate()
        child.join(60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == -signal.SIGTERM
