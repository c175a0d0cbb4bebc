"""Progress bars: tqdm's redrawn bar on a terminal; elsewhere (a pipe, a log file, Prefect's run logs)
one plain line at most every LOG_INTERVAL_S seconds instead of carriage-return redraws, the first after
LOG_INTERVAL_S (a shorter loop prints none)."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 10.0


class LineWriter(io.TextIOBase):
    """A file for tqdm that writes each redraw as one line (blank and repeated ones dropped)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line and line != self._last:
            self._stream.write(line + "\n")
            self._last = line
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """tqdm on stderr: interactive on a terminal, periodic plain lines otherwise."""
    stream = sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)
    every = LOG_INTERVAL_S
    return tqdm(iterable, file=LineWriter(stream), mininterval=every, delay=every, ascii=True, **kwargs)
