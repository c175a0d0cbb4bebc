"""Which model.pt a command uses: a local file, or a models:/ or runs:/ URI downloaded from MLflow."""

from __future__ import annotations

from pathlib import Path

from ..errors import PipelineError, require_mlflow
from ..params import Params


def model_file(params: Params, model: str | None, folder: Path) -> tuple[Path, str]:
    """(local model.pt, its name for the outputs) of --model: a file, or a models:/ or runs:/ URI (default:
    the registry's champion) downloaded into `folder`."""
    uri = model or f"models:/{params.registry.model_name}@champion"
    if Path(uri).is_file():
        return Path(uri), uri
    if not uri.startswith(("models:/", "runs:/")):
        raise PipelineError(f"--model {uri}: no such file, and not a models:/ or runs:/ URI")
    require_mlflow()
    from ..mlops.pyfunc import download_model_file

    return download_model_file(params.tracking, uri, folder), uri
