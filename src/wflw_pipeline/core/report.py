"""What evaluate shows a person: results.md in the reference table's format, CED, NME per subset, and the
best and worst faces (pure functions of the metrics and predictions; no model, no files read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import wflw
from ..tables import format_table
from .metrics import ced

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


@dataclass(frozen=True)
class ReportContext:
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


def fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def results_markdown(metrics: dict[str, Any], context: ReportContext) -> str:
    """results.md: this run as a row of the reference table (beside the reference on real WFLW)."""
    header = ["Arch", "Input Size", "NME test", *TABLE_SUBSETS[1:]]
    size = f"{context.input_size}x{context.input_size}"
    rows = [[context.label, size, *(fmt(metrics[s]["nme"]) for s in TABLE_SUBSETS)]]
    if context.real:
        rows.append([REFERENCE_NAME, f"{REFERENCE_INPUT}x{REFERENCE_INPUT}"])
        rows[-1] += [fmt(REFERENCE_NME[s]) for s in TABLE_SUBSETS]
        diffs = [
            None if metrics[s]["nme"] is None else metrics[s]["nme"] - REFERENCE_NME[s] for s in TABLE_SUBSETS
        ]
        rows.append(["difference (this run − reference)", "", *(fmt(d, sign=True) for d in diffs)])
    t = context.threshold
    lines = [
        f"# Evaluation of {context.checkpoint}",
        "",
        f"NME (%) on the WFLW test split, normalised by the inter-ocular distance (points 60-72). "
        f"Data: `{context.source}`. Face box: `{context.bbox}` "
        f"({_BBOX_WORDS.get(context.bbox, 'see convert.bbox')}). "
        f"Flip test: {'on' if context.flip_test else 'off'}. Epoch: {context.epoch}.",
        "",
        format_table(header, rows),
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
    ]
    columns = [*TABLE_SUBSETS] + (["val"] if "val" in metrics else [])
    rows = [
        ["NME (%)", *(fmt(metrics[s]["nme"]) for s in columns)],
        [f"FR@{t:g} (%)", *(fmt(metrics[s]["fr"]) for s in columns)],
        [f"AUC@{t:g}", *(fmt(metrics[s]["auc"], 4) for s in columns)],
        ["faces", *(str(metrics[s]["n"]) for s in columns)],
    ]
    lines.append(format_table(["", *columns], rows))
    return "\n".join(lines) + "\n"


_BBOX_WORDS = {
    "landmarks": "the extent of the ground-truth landmarks, the reference protocol",
    "landmarks_ceil": "the extent of the ground-truth landmarks, its side rounded up to a pixel, as MMPose",
    "rect": "the annotation's detection rectangle",
}


def ced_table(nme: np.ndarray, flags: np.ndarray, threshold: float, steps: int = CED_STEPS) -> tuple:
    """Thresholds (NME %, 0..100 x threshold) and the CED fraction of every non-empty subset at each.

    `nme`: per-face NME (fractions); `flags`: (N, 6) bool, the WFLW attribute flags.
    """
    thresholds = np.linspace(0.0, threshold, steps + 1)
    curves: dict[str, np.ndarray | None] = {}
    for subset in wflw.SUBSETS:
        selected = nme if subset == "test" else nme[flags[:, wflw.ATTRIBUTES.index(subset)]]
        curves[subset] = ced(selected, thresholds) if selected.size else None
    return 100.0 * thresholds, curves


def ced_csv(thresholds: np.ndarray, curves: dict[str, np.ndarray | None]) -> str:
    """Wide CSV: `threshold` (NME %) then one CED column per subset (empty cells for an empty subset)."""
    lines = [",".join(["threshold", *wflw.SUBSETS])]
    for i, t in enumerate(thresholds):
        cells = ["" if curves[s] is None else f"{curves[s][i]:.6g}" for s in wflw.SUBSETS]
        lines.append(",".join([f"{t:.6g}", *cells]))
    return "\n".join(lines) + "\n"


def plot_ced(
    thresholds: np.ndarray, curves: dict, metrics: dict[str, Any], context: ReportContext, path: Path
) -> None:
    """CED curves of the test set and each subset, AUC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 4.8), dpi=110)
    for subset in wflw.SUBSETS:
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


def _subtitle(context: ReportContext) -> str:
    return (
        f"{context.source} data, face box {context.bbox}, flip test {'on' if context.flip_test else 'off'}, "
        f"input {context.input_size} px"
    )


def plot_nme_subsets(metrics: dict[str, Any], context: ReportContext, path: Path) -> None:
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
    ax.bar_label(bars, labels=[fmt(v if not math.isnan(v) else None) for v in ours], fontsize=8, padding=2)
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


def best_and_worst(nme: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """Row indices of the `count` lowest-NME faces (best first) and the `count` highest (worst first)."""
    order = np.argsort(nme, kind="stable")
    count = min(count, len(order))
    return {"best": order[:count], "worst": order[::-1][:count].copy()}


def plot_best_worst(
    rows: dict[str, np.ndarray],
    crops: dict[int, np.ndarray],
    gt_crop: np.ndarray,
    pred_crop: np.ndarray,
    nme: np.ndarray,
    face_id: np.ndarray,
    path: Path,
) -> None:
    """Two rows of faces (`best_and_worst`'s picks), predicted (red) vs true (green) points.

    `crops`: picked row index -> (S, S, 3) uint8 crop; points in crop pixels (N, 98, 2); `nme` as fractions.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = max(len(picks) for picks in rows.values())
    size = next(iter(crops.values())).shape[0]
    fig, axes = plt.subplots(
        2, count, figsize=(max(1.9 * count, 4.0), 5.0), dpi=110, squeeze=False, layout="constrained"
    )
    for row, (name, picks) in enumerate(rows.items()):
        for col, ax in enumerate(axes[row]):
            ax.axis("off")
            if col >= len(picks):
                continue
            i = picks[col]
            ax.imshow(crops[i], extent=(0, size, size, 0), interpolation="bilinear")
            ax.scatter(*gt_crop[i].T, s=5, c="lime", linewidths=0)
            ax.scatter(*pred_crop[i].T, s=3, c="red", linewidths=0)
            ax.set_xlim(0, size)
            ax.set_ylim(size, 0)
            ax.set_title(f"{name} #{col + 1}: face {int(face_id[i])}\nNME {100 * nme[i]:.2f} %", fontsize=8)
    fig.suptitle("Best and worst test faces\npredicted (red), ground truth (green)", fontsize=10)
    fig.savefig(path, format="png")
    plt.close(fig)
