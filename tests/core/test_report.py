"""core/report.py: results.md, the CED table and the best and worst faces, worked out by hand."""

import numpy as np
import pytest
from md_tables import tables

from wflw_pipeline.core import report
from wflw_pipeline.data import wflw

NME = {"test": 5.0, "pose": 8.0, "illumination": 4.5, "occlusion": 6.0, "makeup": 4.75, "expression": 5.25}
FACES = {"test": 8, "pose": 2, "illumination": 1, "occlusion": 3, "blur": 0, "makeup": 1, "expression": 2}


def _context(source: str, arch: str = "resnet50", loss: str = "wing") -> report.ReportContext:
    return report.ReportContext(
        arch=arch,
        loss=loss,
        input_size=256,
        source=source,
        bbox="landmarks",
        flip_test=True,
        epoch=12,
        checkpoint="data/model/model.pt",
        threshold=0.1,
    )


def _metrics(blur_nme: float | None) -> dict:
    """Every subset at FR 12.5 % and AUC 0.55 (blur: empty when `blur_nme` is None), val at NME 3."""
    metrics = {s: {"nme": nme, "fr": 12.5, "auc": 0.55, "n": FACES[s]} for s, nme in NME.items()}
    metrics["blur"] = {"nme": None, "fr": None, "auc": None, "n": 0}
    if blur_nme is not None:
        metrics["blur"] = {"nme": blur_nme, "fr": 12.5, "auc": 0.55, "n": 1}
    return {**metrics, "val": {"nme": 3.0, "fr": 0.0, "auc": 0.7, "n": 2}}


def test_fmt_writes_a_dash_for_a_missing_value_and_signs_a_difference():
    assert report.fmt(None) == "–"
    assert report.fmt(4.6449) == "4.64" and report.fmt(0.31416, 4) == "0.3142"
    assert report.fmt(0.36, sign=True) == "+0.36" and report.fmt(-1.5, sign=True) == "-1.50"


def test_the_run_is_labelled_as_the_reference_table_names_models():
    assert _context("synthetic").label == "DeepPose R50, Wing (this run)"
    assert _context("synthetic", "resnet18", "softwing").label == "DeepPose R18, SoftWing (this run)"
    assert _context("synthetic", "hrnet", "smoothl1").label == "DeepPose hrnet, SmoothL1 (this run)"
    assert _context("synthetic", "resnet34", "").label == "DeepPose R34 (this run)"
    assert _context("synthetic", "resnet34", "mine").label == "DeepPose R34, mine (this run)"
    assert [_context(s).real for s in ("wflw", "local", "synthetic", "unknown")] == [True, True, False, False]


def test_results_of_synthetic_data_are_shown_without_the_reference():
    text = report.results_markdown(_metrics(blur_nme=5.5), _context("synthetic"))
    assert text.splitlines()[0] == "# Evaluation of data/model/model.pt"
    models, scores = tables(text)
    assert models == [  # no reference row, no difference row
        [
            "Arch",
            "Input Size",
            "NME test",
            "pose",
            "illumination",
            "occlusion",
            "blur",
            "makeup",
            "expression",
        ],
        ["DeepPose R50, Wing (this run)", "256x256", "5.00", "8.00", "4.50", "6.00", "5.50", "4.75", "5.25"],
    ]
    assert scores == [
        ["", "test", "pose", "illumination", "occlusion", "blur", "makeup", "expression", "val"],
        ["NME (%)", "5.00", "8.00", "4.50", "6.00", "5.50", "4.75", "5.25", "3.00"],
        ["FR@0.1 (%)", *["12.50"] * 7, "0.00"],
        ["AUC@0.1", *["0.5500"] * 7, "0.7000"],
        ["faces", "8", "2", "1", "3", "1", "1", "2", "2"],
    ]
    assert "Face box: `landmarks` (the extent of the ground-truth landmarks" in text
    assert "Flip test: on. Epoch: 12." in text and "Data: `synthetic`." in text
    assert "The data source is `synthetic`, not real WFLW" in text


def test_results_of_real_wflw_sit_beside_the_reference_with_the_difference():
    text = report.results_markdown(_metrics(blur_nme=None), _context("wflw"))
    models, scores = tables(text)
    assert models[1:] == [
        ["DeepPose R50, Wing (this run)", "256x256", "5.00", "8.00", "4.50", "6.00", "–", "4.75", "5.25"],
        [
            "DeepPose R50, Wing (MMPose, the reference)",
            "256x256",
            "4.64",
            "8.25",
            "4.59",
            "5.56",
            "5.26",
            "4.59",
            "5.07",
        ],
        # 5.00 - 4.64, 8.00 - 8.25, 4.50 - 4.59, 6.00 - 5.56, none, 4.75 - 4.59, 5.25 - 5.07
        ["difference (this run − reference)", "", "+0.36", "-0.25", "-0.09", "+0.44", "–", "+0.16", "+0.18"],
    ]
    assert scores[1] == ["NME (%)", "5.00", "8.00", "4.50", "6.00", "–", "4.75", "5.25", "3.00"]
    assert scores[4] == ["faces", "8", "2", "1", "3", "0", "1", "2", "2"]
    assert "The data source is" not in text


def test_the_ced_table_of_four_faces_by_hand():
    nme = np.array([0.02, 0.06, 0.08, 0.12])
    flags = np.zeros((4, 6), bool)
    flags[[1, 3], wflw.ATTRIBUTES.index("pose")] = True
    thresholds, curves = report.ced_table(nme, flags, 0.1, steps=4)
    assert thresholds == pytest.approx([0.0, 2.5, 5.0, 7.5, 10.0])  # NME %
    assert curves["test"].tolist() == [0.0, 0.25, 0.25, 0.5, 0.75]  # NME <= 0, 0.025, 0.05, 0.075, 0.1
    assert curves["pose"].tolist() == [0.0, 0.0, 0.0, 0.5, 0.5]  # faces 1 (0.06) and 3 (0.12)
    assert [s for s, curve in curves.items() if curve is None] == list(wflw.ATTRIBUTES[1:])  # no faces


def test_the_ced_csv_has_a_column_per_subset_and_empty_cells_for_an_empty_one():
    curves = dict.fromkeys(wflw.SUBSETS)
    curves["test"], curves["blur"] = np.array([0.0, 2 / 3, 1.0]), np.array([0.0, 0.5, 0.5])
    text = report.ced_csv(np.array([0.0, 5.0, 10.0]), curves)
    assert text.splitlines() == [
        "threshold,test,pose,expression,illumination,makeup,occlusion,blur",
        "0,0,,,,,,0",
        "5,0.666667,,,,,,0.5",
        "10,1,,,,,,0.5",
    ]


def test_best_and_worst_faces_with_ties_kept_in_order():
    picks = report.best_and_worst(np.array([0.3, 0.1, 0.2, 0.1]), 2)
    assert picks["best"].tolist() == [1, 3] and picks["worst"].tolist() == [0, 2]
    picks = report.best_and_worst(np.array([0.3, 0.1, 0.2, 0.1]), 9)  # more than there are
    assert picks["best"].tolist() == [1, 3, 2, 0] and picks["worst"].tolist() == [0, 2, 3, 1]
