"""MLflow, and only here: live run tracking (train), the logged pyfunc model, the registry and promotion.

Split into modules so that a stage's DVC deps hold only the tracking code it runs (train: `runs`).
"""

RUN_REF = "mlflow_run.json"
"""In train's --train-dir: the id of the MLflow run train opened (a DVC output of train, read by register).
Written with tracking off too (run_id null), so that the file DVC expects always exists."""


def untracked(reason: str) -> dict[str, str | None]:
    """What RUN_REF holds when train opened no run, and why."""
    return {"run_id": None, "reason": reason}
