"""tests/support (helpers, servers) and flows/ on the import path: the tests import the flow as `python
flows/serve.py` and Prefect's runner do, by the file's own name (`import train_wflw`). The tiny tracked
pipeline of tests/support/tracked_pipeline.py, trained once a session, is the fixture `trained` of every
module, and `pipeline` a fresh copy of it for each test."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "support"), str(ROOT / "flows")]

from tracked_pipeline import pipeline_fixture, trained_fixture  # noqa: E402, F401  (fixtures `pipeline`, `trained`)
