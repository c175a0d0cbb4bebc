"""tests/support (helpers, servers) and flows/ on the import path: the tests import the flow as `python
flows/serve.py` and Prefect's runner do, by the file's own name (`import train_wflw`)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "support"), str(ROOT / "flows")]
