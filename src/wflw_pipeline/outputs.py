"""Every stage's output files, named once: one dataclass per stage over the folders its command is given
(dvc.yaml's by default), and the run reference train leaves for register."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATA = Path("data")
RAW, PARQUET, MODEL, TRAIN, EVAL, REGISTER = (
    DATA / name for name in ("raw", "parquet", "model", "train", "eval", "register")
)
"""The folders dvc.yaml gives the stages (a test checks): each command's default."""
SPLITS = ("train", "val", "test")
RUN_REF = "mlflow_run.json"
"""In train's folder: the id of the MLflow run train opened (a DVC output of train, read by register).
Written with tracking off too (run_id null), so that the file DVC expects always exists."""


def untracked(reason: str) -> dict[str, str | None]:
    """What RUN_REF (and register's registered.json) hold when there is no MLflow run, and why."""
    return {"run_id": None, "reason": reason}


@dataclass(frozen=True)
class ConvertOutputs:
    """The Parquet splits, their summary and the preview grid."""

    out_dir: Path = PARQUET

    def split(self, name: str) -> Path:
        return self.out_dir / f"{name}.parquet"

    @property
    def summary(self) -> Path:
        return self.out_dir / "summary.json"

    @property
    def preview(self) -> Path:
        return self.out_dir / "preview.png"


@dataclass(frozen=True)
class TrainOutputs:
    """The selected model, and the resumable checkpoint, history, metrics and run reference."""

    model_dir: Path = MODEL
    train_dir: Path = TRAIN

    @property
    def model(self) -> Path:
        return self.model_dir / "model.pt"

    @property
    def checkpoint(self) -> Path:
        return self.train_dir / "checkpoint.pt"

    @property
    def history(self) -> Path:
        return self.train_dir / "history.csv"

    @property
    def metrics(self) -> Path:
        return self.train_dir / "metrics.json"

    @property
    def run_ref(self) -> Path:
        return self.train_dir / RUN_REF


@dataclass(frozen=True)
class EvalOutputs:
    """Metrics, per-face results, the CED table and curves, the report and its plots."""

    out_dir: Path = EVAL

    @property
    def metrics(self) -> Path:
        return self.out_dir / "metrics.json"

    @property
    def per_face(self) -> Path:
        return self.out_dir / "per_face.parquet"

    @property
    def ced_csv(self) -> Path:
        return self.out_dir / "ced.csv"

    @property
    def results(self) -> Path:
        return self.out_dir / "results.md"

    @property
    def ced_png(self) -> Path:
        return self.out_dir / "ced.png"

    @property
    def nme_png(self) -> Path:
        return self.out_dir / "nme_subsets.png"

    @property
    def grid_png(self) -> Path:
        return self.out_dir / "best_worst.png"

    def files(self) -> list[Path]:
        """Every file, in the order the report lists them."""
        tables = [self.results, self.metrics, self.ced_csv, self.per_face]
        return [*tables, self.ced_png, self.nme_png, self.grid_png]


@dataclass(frozen=True)
class RegisterOutputs:
    """What register registered (model, version, run), or why nothing was."""

    out_dir: Path = REGISTER

    @property
    def registered(self) -> Path:
        return self.out_dir / "registered.json"


@dataclass(frozen=True)
class RegisterInputs:
    """What register reads: train's outputs, the model (train's, or another model.pt), evaluate's outputs,
    the Parquet splits."""

    train: TrainOutputs
    model: Path
    evaluation: EvalOutputs
    splits: ConvertOutputs
