"""A `wflw` command run in a process whose files may not grow past a size (RLIMIT_FSIZE): its writes past
the limit fail with EFBIG as a write to a full disk fails with ENOSPC, with no privileges or mount needed."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

WFLW = str(Path(sys.executable).with_name("wflw"))


def wflw_with_file_limit(limit_bytes: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`wflw *args` whose files may hold at most `limit_bytes` (SIGXFSZ ignored, so a write fails instead)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [WFLW, *args], cwd=cwd, preexec_fn=limit, capture_output=True, text=True, timeout=600
    )
