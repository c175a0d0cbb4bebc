"""The one retry loop: how often it tries, how long it waits, what it raises."""

import pytest

from wflw_pipeline import retry
from wflw_pipeline.retry import with_backoff


@pytest.fixture
def slept(monkeypatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", waits.append)
    return waits


def _failing(times: int, error: type[Exception] = OSError):
    """A call that raises `error` its first `times` calls, then returns how many calls it took."""
    calls = []

    def call() -> int:
        calls.append(1)
        if len(calls) <= times:
            raise error(f"failure {len(calls)}")
        return len(calls)

    return call


def test_the_delays_double_from_the_first_and_stop_at_the_cap(slept):
    seen = []

    result = with_backoff(_failing(4), 5, 1.0, 3.0, on_retry=lambda err, n, s: seen.append((str(err), n, s)))

    assert result == 5
    assert slept == [1.0, 2.0, 3.0, 3.0]  # 1, 2, 4 -> 3, 8 -> 3
    assert seen == [
        ("failure 1", 1, 1.0),
        ("failure 2", 2, 2.0),
        ("failure 3", 3, 3.0),
        ("failure 4", 4, 3.0),
    ]


def test_the_last_error_is_raised_as_it_is_after_every_try(slept):
    with pytest.raises(OSError, match=r"^failure 3$"):
        with_backoff(_failing(5), 3, 0.5)

    assert slept == [0.5, 1.0]


def test_an_error_that_is_not_retryable_is_raised_at_once(slept):
    with pytest.raises(KeyError, match="failure 1"):
        with_backoff(_failing(1, KeyError), 4, 1.0, retryable=lambda err: isinstance(err, OSError))

    assert slept == []


def test_one_try_calls_once_and_never_waits(slept):
    assert with_backoff(_failing(0), 1, 1.0) == 1
    with pytest.raises(OSError):
        with_backoff(_failing(1), 1, 1.0)
    assert slept == []
