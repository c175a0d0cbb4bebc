"""Stage evaluate: the trained model on WFLW test (and val), full set and the six subsets, as WFLW reports it.

Protocol (shared WFLW.md): predictions are mapped from crop pixels to the original image through each
face's `crop_to_image` and compared with `landmarks_image`, the points as annotated. NME of a face =
mean point error / inter-ocular distance ||gt[60] - gt[72]||; FR and AUC at `evaluate.failure_threshold`
(0.1); a subset is the test faces whose flag is set (`pose` is the `largepose` list). The face box the
crops were made with (`convert.bbox`: `landmarks`, the reference protocol, or `rect`, the annotation's
detection rectangle) is read from the Parquet metadata and stated in results.md.

Flip test (`evaluate.flip_test`, the reference's test setting): the prediction is averaged with the
prediction for the mirrored view, mirrored back and with its points re-labelled by `wflw.FLIP`; why no
half-pixel shift is applied is in the README (pixel convention).

Outputs (all written to temporary files, then renamed): metrics.json (DVC metrics), per_face.parquet,
ced.csv (a DVC plot), results.md, ced.png, nme_subsets.png, best_worst.png.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .core import report
from .core.engine import predict
from .core.geometry import CropRule, View, crop_to_image
from .core.metrics import auc, failure_rate, mean_shape_nme, nme_per_face
from .core.model import TrainedModel, load_trained
from .core.runtime import Precision, resolve_device, resolve_precision
from .data import wflw
from .data.contract import read_metadata, read_split
from .data.dataset import FaceSet, batch_indices, load_faces
from .errors import PipelineError
from .fileio import atomic_paths
from .outputs import EvalOutputs
from .params import EvaluateParams
from .progress import progress_bar

logger = logging.getLogger(__name__)


class EvaluateError(PipelineError):
    """Inputs the evaluate stage cannot use (names the file)."""


@dataclass(frozen=True)
class SplitResult:
    """Predictions of one split: crop-pixel and image-pixel points (N, 98, 2), NME per face (fraction)."""

    faces: FaceSet
    pred_crop: np.ndarray
    pred_image: np.ndarray
    gt_image: np.ndarray
    nme: np.ndarray
    seconds: float

    @property
    def flags(self) -> np.ndarray:
        return self.faces.flags.cpu().numpy()


def subset_metrics(nme: np.ndarray, threshold: float) -> dict[str, Any]:
    """NME (%), FR (%) and AUC (0..1) at `threshold`, and the face count; None values for no faces."""
    nme = np.asarray(nme, np.float64)
    if nme.size == 0:
        return {"nme": None, "fr": None, "auc": None, "n": 0}
    return {
        "nme": 100.0 * float(nme.mean()),
        "fr": 100.0 * failure_rate(nme, threshold),
        "auc": auc(nme, threshold),
        "n": int(nme.size),
    }


def split_metrics(nme: np.ndarray, flags: np.ndarray, threshold: float) -> dict[str, dict[str, Any]]:
    """Metrics of the full test set ("test") and of each attribute subset (faces whose flag is set)."""
    result = {"test": subset_metrics(nme, threshold)}
    for column, attribute in enumerate(wflw.ATTRIBUTES):
        result[attribute] = subset_metrics(nme[flags[:, column]], threshold)
    return result


def check_subset_counts(flags: np.ndarray, summary_path: Path) -> None:
    """The flag counts of the test faces must equal convert's `test_list_counts` (list_98pt_test_*)."""
    if not summary_path.is_file():
        logger.warning("%s not found: subset counts are not cross-checked", summary_path)
        return
    try:
        summary = json.loads(summary_path.read_text())
    except ValueError as err:
        raise EvaluateError(f"{summary_path}: not valid JSON ({err})") from None
    listed = summary.get("test_list_counts") or {}
    skipped = (summary.get("skipped") or {}).get("count", 0)
    flagged = {a: int(flags[:, i].sum()) for i, a in enumerate(wflw.ATTRIBUTES)}
    for attribute, count in sorted(listed.items()):
        if attribute not in flagged:
            raise EvaluateError(f"{summary_path}: test_list_counts has an unknown subset {attribute!r}")
        if flagged[attribute] != count:
            message = (
                f"{summary_path}: {wflw.test_list_member(attribute)} lists {count} faces but "
                f"{flagged[attribute]} test faces have the {attribute} flag"
            )
            if skipped:
                logger.warning("%s (convert skipped %d faces)", message, skipped)
            else:
                raise EvaluateError(message)


def _image_landmarks(path: Path, face_id: np.ndarray) -> np.ndarray:
    table = read_split(path, columns=["face_id", "landmarks_image"])
    if not np.array_equal(table.column("face_id").to_numpy(), face_id):
        raise EvaluateError(f"{path}: face_id order changed while reading")
    values = table.column("landmarks_image").combine_chunks().flatten().to_numpy()
    return values.astype(np.float64).reshape(-1, wflw.NUM_POINTS, 2)


def predict_split(
    trained: TrainedModel,
    faces: FaceSet,
    path: Path,
    *,
    view: View,
    params: EvaluateParams,
    precision: Precision,
    progress: bool = True,
) -> SplitResult:
    """Predict every face of one split (flip test as configured) and score it in image pixels."""
    name = path.stem
    chunks = []
    start = time.perf_counter()
    batches = list(batch_indices(len(faces), params.batch_size, shuffle=False))
    bar = progress_bar(batches, desc=f"evaluate {name}", unit="batch", disable=not progress, leave=False)
    for index in bar:
        part = _take(faces, index)
        chunks.append(
            predict(
                trained.model,
                part,
                view=view,
                batch_size=params.batch_size,
                precision=precision,
                normalize=trained.normalize,
                flip_test=params.flip_test,
            )
        )
    if faces.images.device.type == "cuda":
        torch.cuda.synchronize(faces.images.device)
    seconds = time.perf_counter() - start
    pred_crop = torch.cat(chunks).double().numpy()
    pred_image = crop_to_image(pred_crop, faces.crop_to_image)
    gt_image = _image_landmarks(path, faces.face_id.cpu().numpy())
    try:
        nme = nme_per_face(pred_image, gt_image)
    except PipelineError as err:
        iod = np.linalg.norm(gt_image[:, wflw.LEFT_EYE_OUTER] - gt_image[:, wflw.RIGHT_EYE_OUTER], axis=1)
        ids = faces.face_id.cpu().numpy()[iod <= 0].tolist()
        raise EvaluateError(f"{path}: {err}" + (f" (face_id {ids[:10]})" if ids else "")) from None
    if not np.isfinite(nme).all():
        raise EvaluateError(
            f"{path}: the model predicts non-finite points for {int((~np.isfinite(nme)).sum())} faces"
        )
    logger.info(
        "%s: %d faces in %.1f s (%.0f faces/s%s)",
        name,
        len(faces),
        seconds,
        len(faces) / max(seconds, 1e-9),
        ", flip test" if params.flip_test else "",
    )
    return SplitResult(faces, pred_crop, pred_image, gt_image, nme, seconds)


def _take(faces: FaceSet, index: torch.Tensor) -> FaceSet:
    device_index = index.to(faces.images.device)
    return FaceSet(
        images=faces.images[device_index],
        landmarks=faces.landmarks[device_index],
        flags=faces.flags[device_index],
        face_id=faces.face_id[device_index],
        crop_to_image=faces.crop_to_image[index.numpy()],
        crop=faces.crop,
    )


def run_evaluate(
    params: EvaluateParams, model_path: Path, parquet_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """Stage evaluate: score `model_path` on `parquet_dir`'s test (and val) split; write `out_dir`.

    Returns what metrics.json holds: {"test", six subsets[, "val"]: {nme %, fr %, auc, n},
    "mean_shape": {nme % of always predicting the mean training shape on test}, "config": ...}.
    """
    model_path, parquet_dir, outputs = Path(model_path), Path(parquet_dir), EvalOutputs(Path(out_dir))
    test_path, val_path = parquet_dir / "test.parquet", parquet_dir / "val.parquet"
    device = resolve_device(params.device, key="evaluate.device")
    trained = load_trained(model_path, device)
    precision = resolve_precision(params.precision, trained.channels_last, device)
    test = load_faces(test_path, device)
    meta = read_metadata(test_path)
    if len(test) == 0:
        raise EvaluateError(f"{test_path}: no test faces")
    check_subset_counts(test.flags.cpu().numpy(), parquet_dir / "summary.json")
    view = View(test.crop_size, test.context, trained.view.input_size)
    _check_crop(trained.crop, meta, model_path, test_path)
    logger.info(
        "evaluating %s (%s, epoch %s) on %s: %d test faces, input %d px, face box %s, flip test %s, %s, %s",
        model_path,
        trained.arch,
        trained.epoch,
        device,
        len(test),
        view.input_size,
        meta["crop"]["bbox"],
        "on" if params.flip_test else "off",
        precision.name,
        meta["source"],
    )
    result = predict_split(trained, test, test_path, view=view, params=params, precision=precision)
    threshold = params.failure_threshold
    metrics: dict[str, Any] = split_metrics(result.nme, result.flags, threshold)
    val = load_faces(val_path, device) if val_path.is_file() else None
    if val is not None and len(val):
        val_result = predict_split(trained, val, val_path, view=view, params=params, precision=precision)
        metrics["val"] = subset_metrics(val_result.nme, threshold)
    shape, landmarks = trained.mean_shape.numpy(), test.landmarks.cpu().numpy()
    metrics["mean_shape"] = {"nme": mean_shape_nme(shape, view.crop_size, view.context, landmarks)}
    metrics["config"] = {
        "flip_test": params.flip_test,
        "epoch": trained.epoch,
        "input_size": view.input_size,
        "failure_threshold": threshold,
    }
    context = report.ReportContext(
        arch=trained.arch,
        loss=str(trained.params["loss"]["name"]),
        input_size=view.input_size,
        source=str(meta["source"]),
        bbox=str(meta["crop"]["bbox"]),
        flip_test=params.flip_test,
        epoch=trained.epoch,
        checkpoint=str(model_path),
        threshold=threshold,
    )
    _write_outputs(outputs, metrics, result, context, params.grid_faces)
    logger.info(
        "NME (%%): %s", ", ".join(f"{k} {report.fmt(metrics[k]['nme'])}" for k in report.TABLE_SUBSETS)
    )
    logger.info("always predicting the mean training shape: test NME %.2f %%", metrics["mean_shape"]["nme"])
    logger.info("wrote %s", ", ".join(str(p) for p in outputs.files()))
    return metrics


def _check_crop(trained: CropRule, meta: dict[str, Any], model_path: Path, test_path: Path) -> None:
    """Warn when the test crops were boxed differently from the crops the model was trained on."""
    crop = meta["crop"]
    for key in ("bbox", "padding"):
        if getattr(trained, key) != crop[key]:
            logger.warning(
                "%s was trained on faces boxed with convert.%s=%s but %s was made with %s=%s",
                model_path,
                key,
                getattr(trained, key),
                test_path,
                key,
                crop[key],
            )


def per_face_table(result: SplitResult) -> pa.Table:
    """face_id, nme (%) and the six flags, one row per test face."""
    columns: dict[str, Any] = {
        "face_id": pa.array(result.faces.face_id.cpu().numpy(), pa.int64()),
        "nme": pa.array(100.0 * result.nme, pa.float64()),
    }
    flags = result.flags
    for i, attribute in enumerate(wflw.ATTRIBUTES):
        columns[attribute] = pa.array(flags[:, i], pa.bool_())
    return pa.table(columns)


def _write_outputs(
    outputs: EvalOutputs,
    metrics: dict[str, Any],
    result: SplitResult,
    context: report.ReportContext,
    grid_faces: int,
) -> None:
    """Write every output to a temporary file first, then rename them all: no partial output survives."""
    thresholds, curves = report.ced_table(result.nme, result.flags, context.threshold)
    picks = report.best_and_worst(result.nme, grid_faces)
    index = np.concatenate(list(picks.values()))
    images = result.faces.images[torch.as_tensor(index, device=result.faces.images.device)]
    crops = dict(zip(index.tolist(), images.permute(0, 2, 3, 1).cpu().numpy(), strict=True))
    with atomic_paths(outputs.files()) as temps:
        temps[outputs.metrics].write_text(json.dumps(metrics, indent=2) + "\n")
        pq.write_table(per_face_table(result), temps[outputs.per_face])
        temps[outputs.ced_csv].write_text(report.ced_csv(thresholds, curves))
        temps[outputs.results].write_text(report.results_markdown(metrics, context))
        report.plot_ced(thresholds, curves, metrics, context, temps[outputs.ced_png])
        report.plot_nme_subsets(metrics, context, temps[outputs.nme_png])
        report.plot_best_worst(
            picks,
            crops,
            result.faces.landmarks.cpu().numpy(),
            result.pred_crop,
            result.nme,
            result.faces.face_id.cpu().numpy(),
            temps[outputs.grid_png],
        )
