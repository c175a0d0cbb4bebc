"""The one retry loop: a call tried again after a doubling delay while it fails in a way that may pass."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def with_backoff(
    fn: Callable[[], T],
    tries: int,
    first_delay_s: float,
    max_delay_s: float = math.inf,
    retryable: Callable[[Exception], bool] = lambda err: True,
    on_retry: Callable[[Exception, int, float], None] = lambda err, retry, delay_s: None,
) -> T:
    """fn(), tried up to `tries` times while it raises a `retryable` error; retry n (1, 2, ...) waits
    min(first_delay_s * 2**(n - 1), max_delay_s), after on_retry(error, n, delay). The last error, or the
    first one not retryable, is raised as it is."""
    for retry in range(1, tries):
        try:
            return fn()
        except Exception as err:
            if not retryable(err):
                raise
            delay_s = min(first_delay_s * 2 ** (retry - 1), max_delay_s)
            on_retry(err, retry, delay_s)
            time.sleep(delay_s)
    return fn()
