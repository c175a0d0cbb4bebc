"""Stage evaluate: the trained model on WFLW test (and val), full set and the six subsets, as WFLW reports it.

Protocol (shared WFLW.md): predictions are mapped from crop pixels to the original image through each
face's `crop_to_image` and compared with `landmarks_image`, the points as annotated. NME of a face =
mean point error / inter-ocular distance ||gt[60] - gt[72]||; FR and AUC at `evaluate.failure_threshold`
(0.1); a subset is the test faces whose flag is set (`pose` is the `largepose` list). The face box the
crops were made with (`convert.bbox`: `landmarks`, the reference protocol, or `rect`, the annotation's
detection rectangle) is read from the Parquet metadata and stated in results.md.

Flip test (`evaluate.flip_test`, the reference's test setting): the prediction is averaged with the
prediction for the mirrored view, mirrored back and with its points re-labelled by `wflw.FLIP`. This
project uses continuous pixel coordinates, pixel i covering [i, i + 1), so an input of side n spans
[0, n] and the exact mirror is x -> n - x, i.e. x' = 1 - x in normalised units. MMPose puts pixel
centres at integers (an input spans [-0.5, n - 0.5]) and mirrors x -> n - 1 - x, which normalised by n
is its x' = 1 - x - 1/n (1/256 at 256 px): the same geometric mirror written in the other convention,
so no extra shift is applied here. `engine.predict` does the mirroring through the view's affine, so it
is exact at any input size.

Outputs (all written to temporary files, then renamed): metrics.json (DVC metrics), per_face.parquet,
ced.csv (a DVC plot), results.md, ced.png, nme_subsets.png, best_worst.png.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from . import wflw
from .convert import read_metadata
from .dataset import FaceSet, batch_indices, load_faces
from .engine import Precision, View, predict
from .errors import PipelineError
from .fileio import atomic_paths
from .metrics import auc, ced, failure_rate, nme_per_face
from .model import DeepPose, load_trained
from .params import EvaluateParams
from .train import baseline_nme, resolve_device, resolve_precision

logger = logging.getLogger(__name__)

SUBSETS: tuple[str, ...] = ("test", *wflw.ATTRIBUTES)
"""metrics.json's keys for the test split: the full set, then the six attribute subsets."""

TABLE_SUBSETS: tuple[str, ...] = ("test", "pose", "illumination", "occlusion", "blur", "makeup", "expression")
"""The reference table's column order (WFLW.md, MMPose)."""

REFERENCE_NAME = "DeepPose R50, Wing (MMPose, the reference)"
REFERENCE_INPUT = 256
REFERENCE_NME: dict[str, float] = {
    "test": 4.64,
    "pose": 8.25,
    "illumination": 4.59,
    "occlusion": 5.56,
    "blur": 5.26,
    "makeup": 4.59,
    "expression": 5.07,
}
REAL_SOURCES = ("wflw", "local")
CED_STEPS = 200


class EvaluateError(PipelineError):
    """Inputs the evaluate stage cannot use (names the file)."""


@dataclass(frozen=True)
class EvalOutputs:
    """The files the evaluate stage writes into `out_dir`."""

    out_dir: Path

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


def crop_to_image(points: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Map crop-pixel points (N, P, 2) through each face's 2x3 crop->image affine (N, 2, 3)."""
    points, matrices = np.asarray(points, np.float64), np.asarray(matrices, np.float64)
    return np.einsum("nij,npj->npi", matrices[:, :, :2], points) + matrices[:, None, :, 2]


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


def _device_and_precision(params: EvaluateParams, info: dict[str, Any]) -> tuple[torch.device, Precision]:
    """train's device and precision rules (auto: cuda > mps > cpu; bf16 on CUDA), for evaluate.*."""
    device = resolve_device(params.device, key="evaluate.device")
    channels_last = bool(info.get("params", {}).get("train", {}).get("channels_last", True))
    return device, resolve_precision(params.precision, channels_last, device)


def _image_landmarks(path: Path, face_id: np.ndarray) -> np.ndarray:
    table = pq.read_table(path, columns=["face_id", "landmarks_image"])
    if not np.array_equal(table.column("face_id").to_numpy(), face_id):
        raise EvaluateError(f"{path}: face_id order changed while reading")
    values = table.column("landmarks_image").combine_chunks().flatten().to_numpy()
    return values.astype(np.float64).reshape(-1, wflw.NUM_POINTS, 2)


def predict_split(
    model: DeepPose,
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
    for index in tqdm(batches, desc=f"evaluate {name}", unit="batch", disable=not progress, leave=False):
        part = _take(faces, index)
        chunks.append(
            predict(
                model,
                part,
                view=view,
                batch_size=params.batch_size,
                precision=precision,
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
    model, info = load_trained(model_path, "cpu")
    device, precision = _device_and_precision(params, info)
    model = model.to(device=device, memory_format=precision.memory_format())
    test = load_faces(test_path, device)
    meta = read_metadata(test_path)
    if len(test) == 0:
        raise EvaluateError(f"{test_path}: no test faces")
    check_subset_counts(test.flags.cpu().numpy(), parquet_dir / "summary.json")
    view = View(test.crop_size, test.context, int(info["view"]["input_size"]))
    _check_view(info, meta, model_path, test_path)
    logger.info(
        "evaluating %s (%s, epoch %s) on %s: %d test faces, input %d px, face box %s, flip test %s, %s, %s",
        model_path,
        info["arch"],
        info.get("epoch", "?"),
        device,
        len(test),
        view.input_size,
        meta.get("crop", {}).get("bbox", "?"),
        "on" if params.flip_test else "off",
        "bf16" if precision.dtype is not None else "fp32",
        meta.get("source", "unknown source"),
    )
    result = predict_split(model, test, test_path, view=view, params=params, precision=precision)
    threshold = params.failure_threshold
    metrics: dict[str, Any] = split_metrics(result.nme, result.flags, threshold)
    val = load_faces(val_path, device) if val_path.is_file() else None
    if val is not None and len(val):
        val_result = predict_split(model, val, val_path, view=view, params=params, precision=precision)
        metrics["val"] = subset_metrics(val_result.nme, threshold)
    metrics["mean_shape"] = {"nme": baseline_nme(info["mean_shape"], test, view)}
    metrics["config"] = {
        "flip_test": params.flip_test,
        "epoch": info.get("epoch"),
        "input_size": view.input_size,
        "failure_threshold": threshold,
    }
    context = _Context(
        arch=str(info["arch"]),
        loss=str(info.get("params", {}).get("loss", {}).get("name", "")),
        input_size=view.input_size,
        source=str(meta.get("source", "unknown")),
        bbox=str(meta.get("crop", {}).get("bbox", "unknown")),
        flip_test=params.flip_test,
        epoch=info.get("epoch"),
        checkpoint=str(model_path),
        threshold=threshold,
    )
    _write_outputs(outputs, metrics, result, context, params.grid_faces)
    logger.info("NME (%%): %s", ", ".join(f"{k} {_fmt(metrics[k]['nme'])}" for k in TABLE_SUBSETS))
    logger.info("always predicting the mean training shape: test NME %.2f %%", metrics["mean_shape"]["nme"])
    logger.info("wrote %s", ", ".join(str(p) for p in _all_paths(outputs)))
    return metrics


def _check_view(info: dict[str, Any], meta: dict[str, Any], model_path: Path, test_path: Path) -> None:
    """Warn when the test crops were boxed differently from the crops the model was trained on."""
    trained = info.get("params", {}).get("convert", {})
    crop = meta.get("crop", {})
    for key in ("bbox", "padding"):
        if key in trained and key in crop and trained[key] != crop[key]:
            logger.warning(
                "%s was trained with convert.%s=%s but %s was made with %s=%s",
                model_path,
                key,
                trained[key],
                test_path,
                key,
                crop[key],
            )


@dataclass(frozen=True)
class _Context:
    """What results.md and the plots say about the run besides the numbers."""

    arch: str
    loss: str
    input_size: int
    source: str
    bbox: str
    flip_test: bool
    epoch: Any
    checkpoint: str
    threshold: float

    @property
    def real(self) -> bool:
        return self.source in REAL_SOURCES

    @property
    def label(self) -> str:
        arch = f"R{self.arch[len('resnet') :]}" if self.arch.startswith("resnet") else self.arch
        loss = {"wing": "Wing", "softwing": "SoftWing", "l1": "L1", "smoothl1": "SmoothL1"}.get(
            self.loss, self.loss
        )
        return f"DeepPose {arch}" + (f", {loss}" if loss else "") + " (this run)"


def _fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def results_markdown(metrics: dict[str, Any], context: _Context) -> str:
    """results.md: this run as a row of the reference table (beside the reference on real WFLW)."""
    header = ["Arch", "Input Size", "NME test", *TABLE_SUBSETS[1:]]
    size = f"{context.input_size}x{context.input_size}"
    rows = [[context.label, size, *(_fmt(metrics[s]["nme"]) for s in TABLE_SUBSETS)]]
    if context.real:
        rows.append([REFERENCE_NAME, f"{REFERENCE_INPUT}x{REFERENCE_INPUT}"])
        rows[-1] += [_fmt(REFERENCE_NME[s]) for s in TABLE_SUBSETS]
        diffs = [
            None if metrics[s]["nme"] is None else metrics[s]["nme"] - REFERENCE_NME[s] for s in TABLE_SUBSETS
        ]
        rows.append(["difference (this run − reference)", "", *(_fmt(d, sign=True) for d in diffs)])
    table = [_md_row(header), _md_row(["---"] * len(header)), *(_md_row(row) for row in rows)]
    t = context.threshold
    lines = [
        f"# Evaluation of {context.checkpoint}",
        "",
        f"NME (%) on the WFLW test split, normalised by the inter-ocular distance (points 60-72). "
        f"Data: `{context.source}`. Face box: `{context.bbox}` "
        f"({_BBOX_WORDS.get(context.bbox, 'see convert.bbox')}). "
        f"Flip test: {'on' if context.flip_test else 'off'}. Epoch: {context.epoch}.",
        "",
        *table,
        "",
    ]
    if not context.real:
        lines += [
            f"The data source is `{context.source}`, not real WFLW: the reference result "
            f"({REFERENCE_NAME}, NME {REFERENCE_NME['test']:.2f} % on WFLW test) is not comparable "
            "and is not shown beside this run.",
            "",
        ]
    lines += [
        f"Failure rate FR@{t:g} (% of faces with NME > {t:g}), AUC@{t:g} (area under the CED up to {t:g}, "
        "divided by it) and faces per subset:",
        "",
        _md_row(["", *TABLE_SUBSETS] + (["val"] if "val" in metrics else [])),
        _md_row(["---"] * (len(TABLE_SUBSETS) + 1 + ("val" in metrics))),
    ]
    columns = [*TABLE_SUBSETS] + (["val"] if "val" in metrics else [])
    lines.append(_md_row(["NME (%)", *(_fmt(metrics[s]["nme"]) for s in columns)]))
    lines.append(_md_row([f"FR@{t:g} (%)", *(_fmt(metrics[s]["fr"]) for s in columns)]))
    lines.append(_md_row([f"AUC@{t:g}", *(_fmt(metrics[s]["auc"], 4) for s in columns)]))
    lines.append(_md_row(["faces", *(str(metrics[s]["n"]) for s in columns)]))
    return "\n".join(lines) + "\n"


_BBOX_WORDS = {
    "landmarks": "the extent of the ground-truth landmarks, the reference protocol",
    "rect": "the annotation's detection rectangle",
}


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def ced_table(result: SplitResult, threshold: float, steps: int = CED_STEPS) -> tuple[np.ndarray, dict]:
    """Thresholds (NME %, 0..100 x threshold) and the CED fraction of every non-empty subset at each."""
    thresholds = np.linspace(0.0, threshold, steps + 1)
    curves: dict[str, np.ndarray | None] = {}
    flags = result.flags
    for subset in SUBSETS:
        selected = result.nme if subset == "test" else result.nme[flags[:, wflw.ATTRIBUTES.index(subset)]]
        curves[subset] = ced(selected, thresholds) if selected.size else None
    return 100.0 * thresholds, curves


def ced_csv(thresholds: np.ndarray, curves: dict[str, np.ndarray | None]) -> str:
    """Wide CSV: `threshold` (NME %) then one CED column per subset (empty cells for an empty subset)."""
    lines = [",".join(["threshold", *SUBSETS])]
    for i, t in enumerate(thresholds):
        cells = ["" if curves[s] is None else f"{curves[s][i]:.6g}" for s in SUBSETS]
        lines.append(",".join([f"{t:.6g}", *cells]))
    return "\n".join(lines) + "\n"


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


def plot_ced(
    thresholds: np.ndarray, curves: dict, metrics: dict[str, Any], context: _Context, path: Path
) -> None:
    """CED curves of the test set and each subset, AUC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 4.8), dpi=110)
    for subset in SUBSETS:
        if curves[subset] is None:
            continue
        style = {"linewidth": 2.6, "color": "black"} if subset == "test" else {"linewidth": 1.5}
        scores = metrics[subset]
        label = f"{subset} (n={scores['n']})\nAUC {scores['auc']:.3f}, FR {scores['fr']:.1f} %"
        ax.plot(thresholds, curves[subset], label=label, **style)
    ax.set_xlim(0, thresholds[-1])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("NME threshold (%)")
    ax.set_ylabel("fraction of faces with NME ≤ threshold")
    ax.set_title(f"Cumulative error distribution, {context.label}\n{_subtitle(context)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), labelspacing=0.9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _subtitle(context: _Context) -> str:
    return (
        f"{context.source} data, face box {context.bbox}, flip test {'on' if context.flip_test else 'off'}, "
        f"input {context.input_size} px"
    )


def plot_nme_subsets(metrics: dict[str, Any], context: _Context, path: Path) -> None:
    """NME per subset as bars, beside the reference's bars on real WFLW."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(TABLE_SUBSETS))
    ours = [metrics[s]["nme"] if metrics[s]["nme"] is not None else np.nan for s in TABLE_SUBSETS]
    fig, ax = plt.subplots(figsize=(8.0, 4.6), dpi=110)
    width = 0.4 if context.real else 0.6
    offset = -width / 2 if context.real else 0.0
    bars = ax.bar(x + offset, ours, width, label=context.label, color="tab:blue")
    ax.bar_label(bars, labels=[_fmt(v if not math.isnan(v) else None) for v in ours], fontsize=8, padding=2)
    if context.real:
        ref = [REFERENCE_NME[s] for s in TABLE_SUBSETS]
        ref_bars = ax.bar(x + width / 2, ref, width, label=REFERENCE_NAME, color="tab:gray")
        ax.bar_label(ref_bars, labels=[f"{v:.2f}" for v in ref], fontsize=8, padding=2)
    ax.set_xticks(x, [f"{s}\nn={metrics[s]['n']}" for s in TABLE_SUBSETS], fontsize=9)
    ax.set_ylabel("NME (%)")
    top = np.nanmax([*ours, *(REFERENCE_NME.values() if context.real else [])])
    ax.set_ylim(0, 1.18 * (top if np.isfinite(top) and top > 0 else 1.0))
    ax.set_title(f"NME per subset, {context.label}\n{_subtitle(context)}", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_best_worst(result: SplitResult, count: int, path: Path) -> None:
    """Two rows: the `count` best and the `count` worst test faces, predicted (red) vs true (green)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(result.nme, kind="stable")
    count = min(count, len(order))
    rows = {"best": order[:count], "worst": order[::-1][:count].copy()}
    size = result.faces.crop_size
    fig, axes = plt.subplots(
        2, count, figsize=(max(1.9 * count, 4.0), 5.0), dpi=110, squeeze=False, layout="constrained"
    )
    gt_crop = result.faces.landmarks.cpu().numpy()
    for row, (name, picks) in enumerate(rows.items()):
        images = result.faces.images[torch.as_tensor(picks, device=result.faces.images.device)]
        images = images.permute(0, 2, 3, 1).cpu().numpy()
        for col, ax in enumerate(axes[row]):
            ax.axis("off")
            if col >= len(picks):
                continue
            i = picks[col]
            ax.imshow(images[col], extent=(0, size, size, 0), interpolation="bilinear")
            ax.scatter(*gt_crop[i].T, s=5, c="lime", linewidths=0)
            ax.scatter(*result.pred_crop[i].T, s=3, c="red", linewidths=0)
            ax.set_xlim(0, size)
            ax.set_ylim(size, 0)
            face_id = int(result.faces.face_id[i])
            ax.set_title(f"{name} #{col + 1}: face {face_id}\nNME {100 * result.nme[i]:.2f} %", fontsize=8)
    fig.suptitle("Best and worst test faces\npredicted (red), ground truth (green)", fontsize=10)
    fig.savefig(path, format="png")
    plt.close(fig)


def _all_paths(outputs: EvalOutputs) -> list[Path]:
    return [
        outputs.metrics,
        outputs.per_face,
        outputs.ced_csv,
        outputs.results,
        outputs.ced_png,
        outputs.nme_png,
        outputs.grid_png,
    ]


def _write_outputs(
    outputs: EvalOutputs, metrics: dict[str, Any], result: SplitResult, context: _Context, grid_faces: int
) -> None:
    """Write every output to a temporary file first, then rename them all: no partial output survives."""
    thresholds, curves = ced_table(result, context.threshold)
    with atomic_paths(_all_paths(outputs)) as temps:
        temps[outputs.metrics].write_text(json.dumps(metrics, indent=2) + "\n")
        pq.write_table(per_face_table(result), temps[outputs.per_face])
        temps[outputs.ced_csv].write_text(ced_csv(thresholds, curves))
        temps[outputs.results].write_text(results_markdown(metrics, context))
        plot_ced(thresholds, curves, metrics, context, temps[outputs.ced_png])
        plot_nme_subsets(metrics, context, temps[outputs.nme_png])
        plot_best_worst(result, grid_faces, temps[outputs.grid_png])
