"""MLflow, and only here: live run tracking (train), the logged pyfunc model, the registry and promotion.

Split into modules so that a stage's DVC deps hold only the tracking code it runs (train: `runs`).
"""
