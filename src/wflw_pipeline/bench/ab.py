"""`wflw bench ab`: what choices of params are worth in test NME. The params' own training (the baseline)
and one training per variant (the same params with the variant's overrides) run on the same converted
faces with the same seeds, each evaluated on the test split as `wflw evaluate` does; each variant's
per-face test NME is compared with the baseline's on the same faces by the gate's paired bootstrap
(mlops.promotion, registry.bootstrap_samples / confidence / seed).

Each training writes into <work>/<name>/; a finished one (training and evaluation of the same params on
the same splits) is reused when the command runs again, so that a variant can be added later. No MLflow
run is opened.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from .. import fileio
from ..core.runtime import resolve_device
from ..evaluate import run_evaluate
from ..mlops.promotion import Interval, VersionResult, paired_bootstrap, paired_faces
from ..outputs import EvalOutputs, TrainOutputs
from ..params import Params, load_params
from ..tables import format_table
from ..train import run_train
from .common import header, require, write_result

logger = logging.getLogger(__name__)

BASELINE = "baseline"
DONE = "ab_done.json"
"""Written into a variant's folder once it is trained and evaluated: its params and its data."""


@dataclass(frozen=True)
class Variant:
    """A name and the params overrides (KEY=VALUE) it makes on top of the baseline's."""

    name: str
    overrides: tuple[str, ...]


def parse_variant(tokens: Sequence[str]) -> Variant:
    """`NAME KEY=VALUE [KEY=VALUE ...]`, as --variant takes it."""
    name, *overrides = tokens
    require(
        name != BASELINE and "=" not in name and "/" not in name,
        f"--variant {' '.join(tokens)}: start with a name (not {BASELINE!r}), then KEY=VALUE overrides",
    )
    require(
        bool(overrides) and all("=" in item for item in overrides),
        f"--variant {name}: give at least one KEY=VALUE override after the name",
    )
    return Variant(name, tuple(overrides))


def run_ab(
    *,
    params_file: Path,
    overrides: Sequence[str],
    variants: Sequence[Variant],
    parquet: Path,
    work_dir: Path,
    out_dir: Path,
    command: str | None,
) -> dict[str, Any]:
    """Train and evaluate the baseline and every variant; compare each with the baseline, face by face."""
    names = [BASELINE, *(v.name for v in variants)]
    require(bool(variants), "give at least one --variant NAME KEY=VALUE ...")
    require(len(set(names)) == len(names), f"variant names must differ: {', '.join(names)}")
    require((parquet / "test.parquet").is_file(), f"{parquet}/test.parquet not found: run wflw convert first")
    runs = {BASELINE: _untracked(load_params(params_file, overrides))}
    for variant in variants:  # every params file checked before the first training starts
        runs[variant.name] = _untracked(load_params(params_file, [*overrides, *variant.overrides]))
    results = {name: _train_and_evaluate(params, parquet, work_dir / name) for name, params in runs.items()}
    registry = runs[BASELINE].registry
    base = results[BASELINE]
    rows = []
    for variant in variants:
        ours, theirs = paired_faces(results[variant.name]["faces"], base["faces"])
        interval = paired_bootstrap(
            ours - theirs, registry.bootstrap_samples, registry.confidence, registry.seed
        )
        rows.append(_row(variant, results[variant.name]["metrics"], base["metrics"], interval))
    result = {
        **header("ab", resolve_device(runs[BASELINE].train.device), command),
        "params": str(params_file),
        "overrides": list(overrides),
        "parquet": str(parquet),
        "baseline": {"test_nme": base["metrics"]["test"]["nme"], "mean_shape": base["metrics"]["mean_shape"]},
        "variants": rows,
    }
    write_result(out_dir, "ab", result, _table(base["metrics"], rows, registry.confidence))
    return result


def _untracked(params: Params) -> Params:
    return dataclasses.replace(params, tracking=dataclasses.replace(params.tracking, enabled=False))


def _train_and_evaluate(params: Params, parquet: Path, folder: Path) -> dict[str, Any]:
    """Train into `folder`/model, evaluate into `folder`/eval (unless a finished run of the same params and
    data is there); the metrics and the per-face test NME."""
    outputs, evaluation = TrainOutputs(folder / "model", folder / "train"), EvalOutputs(folder / "eval")
    stamp = folder / DONE
    inputs = {"params": dataclasses.asdict(params), "data": _data_identity(parquet)}
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(inputs)):
        logger.info("%s: reusing the finished training and evaluation of the same params and data", folder)
        metrics = json.loads(evaluation.metrics.read_text())
    else:
        stamp.unlink(missing_ok=True)
        run_train(params, parquet, outputs)
        metrics = run_evaluate(params.evaluate, outputs.model, parquet, evaluation.out_dir)
        fileio.write_json(stamp, inputs)
    table = pq.read_table(evaluation.per_face, columns=["face_id", "nme"])
    faces = VersionResult(
        version=folder.name,
        metrics={},
        data={},
        face_id=table.column("face_id").to_numpy(),
        nme=table.column("nme").to_numpy(),
    )
    return {"metrics": metrics, "faces": faces}


def _data_identity(parquet: Path) -> dict[str, str]:
    """The SHA-256 of each split file."""
    return {path.name: fileio.sha256_file(path) for path in sorted(parquet.glob("*.parquet"))}


def _row(variant: Variant, metrics: dict, base: dict, interval: Interval) -> dict[str, Any]:
    verdict = "better" if interval.high < 0 else "worse" if interval.low > 0 else "no clear difference"
    return {
        "name": variant.name,
        "overrides": list(variant.overrides),
        "test_nme": metrics["test"]["nme"],
        "delta": metrics["test"]["nme"] - base["test"]["nme"],
        "interval": dataclasses.asdict(interval),
        "verdict": verdict,
    }


def _table(base: dict, rows: list[dict[str, Any]], confidence: float) -> str:
    percent = f"{round(confidence * 100, 2):g} %"
    lines = [[BASELINE, "(the params)", f"{base['test']['nme']:.3f}", "", "", ""]]
    for row in rows:
        low, high = row["interval"]["low"], row["interval"]["high"]
        lines.append(
            [
                row["name"],
                " ".join(row["overrides"]),
                f"{row['test_nme']:.3f}",
                f"{row['delta']:+.3f}",
                f"[{low:+.3f}, {high:+.3f}]",
                row["verdict"],
            ]
        )
    headers = ["variant", "overrides", "test NME (%)", "vs baseline", f"{percent} interval", "verdict"]
    return format_table(headers, lines)
