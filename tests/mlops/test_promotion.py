"""The promotion gate: paired faces, paired bootstrap, the rules of `decide`, the table, champion history."""

from datetime import UTC, datetime

import numpy as np
import pytest
from md_tables import rows

from wflw_pipeline.data.wflw import SUBSETS
from wflw_pipeline.mlops import promotion
from wflw_pipeline.mlops.promotion import (
    BASELINE,
    METRICS,
    GateRules,
    PromotionError,
    VersionResult,
    champion_chain,
    decide,
    format_comparison,
    new_move,
    paired_bootstrap,
    paired_faces,
    rollback_target,
)
from wflw_pipeline.params import RegistryParams

DATA = {
    "source": "https://example.org/wflw",
    "archives": {"WFLW_annotations.tar.gz": "a" * 64, "WFLW_images.tar.gz": "b" * 64},
    "crop": {"bbox": "landmarks", "padding": 0.1, "context": 0.2, "crop_size": 256, "jpeg_quality": 95},
}
RULES = GateRules(
    max_subset_regression=0.1, require_significant=True, bootstrap_samples=2000, confidence=0.95, seed=0
)
CHAMPION_NME = np.tile([4.0, 5.0, 6.0, 5.0], 25)  # 100 faces, mean 5.0


def _result(version, nme, metrics=None, data=DATA, face_id=None):
    """A version whose every NME metric is the mean of `nme`, with FR 4, AUC 0.55 and a mean-shape NME of 20
    unless overridden."""
    nme = np.asarray(nme, np.float64)
    ids = np.arange(len(nme)) if face_id is None else np.asarray(face_id)
    base = {f"nme_{subset}": float(nme.mean()) for subset in SUBSETS} | {"fr_test": 4.0, "auc_test": 0.55}
    base[BASELINE] = 20.0
    return VersionResult(version, base | (metrics or {}), data, ids.astype(np.int64), nme)


def test_rules_come_from_the_registry_params():
    params = RegistryParams("wflw", 0.2, False, 500, 0.9, 7, 60.0)
    assert GateRules.from_params(params) == GateRules(0.2, False, 500, 0.9, 7)
    assert SUBSETS == ("test", "pose", "expression", "illumination", "makeup", "occlusion", "blur")
    assert METRICS[0] == "nme_test" and METRICS[-2:] == ("fr_test", "auc_test") and len(METRICS) == 9


def test_bootstrap_of_a_constant_difference_is_that_constant():
    interval = paired_bootstrap(np.full(50, -0.75), samples=1000, confidence=0.95, seed=3)
    assert interval.low == interval.high == interval.mean == -0.75
    assert (interval.samples, interval.faces, interval.confidence) == (1000, 50, 0.95)


def test_bootstrap_on_a_tiny_case_is_deterministic_per_seed():
    diff = np.array([-1.0, -0.5, 0.5, -2.0, 0.25])  # sum -2.75
    first = paired_bootstrap(diff, samples=200, confidence=0.9, seed=1)
    assert first.mean == -0.55
    assert -2.0 <= first.low < first.mean < first.high <= 0.5
    assert paired_bootstrap(diff, samples=200, confidence=0.9, seed=1) == first
    other = paired_bootstrap(diff, samples=200, confidence=0.9, seed=2)
    assert (other.low, other.high) != (first.low, first.high)
    narrower = paired_bootstrap(diff, samples=200, confidence=0.5, seed=1)
    assert first.low < narrower.low < narrower.high < first.high


def test_bootstrap_chunks_do_not_change_the_result(monkeypatch):
    diff = np.array([-1.0, -0.5, 0.5, -2.0, 0.25])
    whole = paired_bootstrap(diff, samples=300, confidence=0.9, seed=4)
    monkeypatch.setattr(promotion, "_CHUNK_ELEMENTS", 12)  # two samples of five faces per chunk
    assert paired_bootstrap(diff, samples=300, confidence=0.9, seed=4) == whole


def test_bootstrap_needs_faces():
    with pytest.raises(PromotionError, match="no per-face differences"):
        paired_bootstrap(np.array([]), samples=100, confidence=0.95, seed=0)


def test_paired_faces_aligns_on_face_id():
    candidate = _result("2", [3.0, 1.0, 2.0], face_id=[30, 10, 20])
    champion = _result("1", [10.0, 20.0, 30.0], face_id=[10, 20, 30])
    ours, theirs = paired_faces(candidate, champion)
    assert ours.tolist() == [1.0, 2.0, 3.0] and theirs.tolist() == [10.0, 20.0, 30.0]


def test_other_faces_or_repeated_ids_raise():
    champion = _result("1", [5.0, 5.0, 5.0, 5.0], face_id=[0, 1, 2, 3])
    other = _result("2", [4.0, 4.0, 4.0, 4.0], face_id=[0, 1, 7, 8])
    with pytest.raises(PromotionError, match="2 face ids only in candidate v2, 2 only in champion v1"):
        paired_faces(other, champion)
    with pytest.raises(PromotionError, match="different faces"):
        decide(other, champion, RULES)
    repeated = _result("2", [4.0, 4.0, 4.0, 4.0], face_id=[0, 0, 1, 2])
    with pytest.raises(PromotionError, match="v2: 1 face ids appear more than once"):
        paired_faces(repeated, champion)


def test_with_no_champion_a_candidate_better_than_the_mean_shape_is_accepted():
    decision = decide(_result("1", CHAMPION_NME), None, RULES)
    assert decision.accepted and decision.interval is None
    assert decision.reasons == ["no champion yet; test NME 5.000 < mean shape 20.000"]


def test_a_candidate_not_better_than_the_mean_shape_is_refused_with_or_without_a_champion():
    tie = _result("1", CHAMPION_NME, {BASELINE: 5.0})
    first = decide(tie, None, RULES)
    assert not first.accepted
    assert first.reasons == [
        "test NME 5.000 is not lower than always predicting the mean training shape (5.000)"
    ]
    forced_champion = _result("1", CHAMPION_NME + 20)
    later = decide(_result("2", CHAMPION_NME, {BASELINE: 4.5}), forced_champion, RULES)
    assert not later.accepted
    assert later.reasons == [
        "test NME 5.000 is not lower than always predicting the mean training shape (4.500)"
    ]


def test_a_candidate_without_a_recorded_baseline_is_refused():
    decision = decide(_result("1", CHAMPION_NME, {BASELINE: None}), None, RULES)
    assert not decision.accepted
    assert decision.reasons == [
        "no mean-shape baseline to compare with (test NME 5.000, mean shape —): register the version again"
    ]


def test_a_candidate_one_point_better_on_every_face_is_promoted():
    decision = decide(_result("2", CHAMPION_NME - 1), _result("1", CHAMPION_NME), RULES)
    assert decision.accepted
    assert decision.reasons == [
        "test NME 4.000 < mean shape 20.000; test NME 4.000 < 5.000; "
        "no subset worse by more than 0.100; 95 % interval [-1.000, -1.000] < 0"
    ]
    assert decision.interval.mean == -1.0 and decision.interval.faces == 100


def test_a_worse_candidate_is_refused_on_test_nme():
    decision = decide(_result("2", CHAMPION_NME + 0.5), _result("1", CHAMPION_NME), RULES)
    assert not decision.accepted
    assert "test NME 5.500 is not lower than the champion's 5.000" in decision.reasons
    assert any(
        reason.startswith("not significant: 95 % interval [0.500, 0.500]") for reason in decision.reasons
    )


def test_a_subset_regression_beyond_the_threshold_is_refused_naming_the_subset():
    champion = _result("1", CHAMPION_NME)
    worse_pose = _result("2", CHAMPION_NME - 1, {"nme_pose": 5.3, "nme_blur": 5.05})
    decision = decide(worse_pose, champion, RULES)
    assert not decision.accepted
    assert decision.reasons == ["pose NME 5.300 is 0.300 worse than 5.000 (limit 0.100)"]  # blur: within 0.1
    assert decide(worse_pose, champion, GateRules(0.5, True, 2000, 0.95, 0)).accepted


def test_an_improvement_that_is_not_significant_needs_require_significant_off():
    champion = _result("1", np.full(8, 5.0))
    noisy = _result("2", 5.0 + np.array([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 0.8]))  # mean diff -0.025
    strict = decide(noisy, champion, RULES)
    assert strict.interval.low < strict.interval.mean < 0 < strict.interval.high
    assert not strict.accepted
    assert len(strict.reasons) == 1 and strict.reasons[0].startswith("not significant: 95 % interval")
    lenient = decide(noisy, champion, GateRules(0.1, False, 2000, 0.95, 0))
    assert lenient.accepted and lenient.reasons == [
        "test NME 4.975 < mean shape 20.000; test NME 4.975 < 5.000; no subset worse by more than 0.100"
    ]


def test_other_archives_or_crop_are_refused_naming_them():
    champion = _result("1", CHAMPION_NME)
    images = DATA | {"archives": DATA["archives"] | {"WFLW_images.tar.gz": "c" * 64}}
    decision = decide(_result("2", CHAMPION_NME - 1, data=images), champion, RULES)
    assert not decision.accepted and decision.interval is None
    line = "archive WFLW_images.tar.gz: cccccccccccc (candidate) vs bbbbbbbbbbbb (champion)"
    assert decision.reasons == [f"evaluated on other test data: {line}"]
    crop = DATA | {"crop": DATA["crop"] | {"crop_size": 128}}
    decision = decide(_result("2", CHAMPION_NME - 1, data=crop), champion, RULES)
    assert decision.reasons == [
        "evaluated on other test data: crop crop_size: 128 (candidate) vs 256 (champion)"
    ]
    renamed = DATA | {"source": "/mnt/mirror/wflw"}
    assert decide(_result("2", CHAMPION_NME - 1, data=renamed), champion, RULES).accepted
    unknown = decide(_result("2", CHAMPION_NME - 1, data={"source": "x"}), champion, RULES)
    assert unknown.reasons[0] == "evaluated on other test data: archive: not recorded for the candidate"


def _row(text, metric):
    """The cells of the table row of `metric`."""
    (row,) = [row for row in rows(text) if row[0] == metric]
    return row


def test_format_comparison_shows_every_metric_both_versions_and_the_verdict():
    candidate = _result("4", CHAMPION_NME - 1, {"fr_test": 3.5, "auc_test": 0.6, "nme_makeup": None})
    text = format_comparison(decide(candidate, _result("3", CHAMPION_NME), RULES))
    assert "champion v3" in text and "candidate v4" in text
    for metric in METRICS:
        assert _row(text, metric)[0] == metric
    assert _row(text, "nme_test") == ["nme_test", "5.000", "4.000", "-1.000"]
    assert _row(text, "fr_test") == ["fr_test", "4.00", "3.50", "-0.50"]
    assert _row(text, "auc_test") == ["auc_test", "0.5500", "0.6000", "+0.0500"]
    assert _row(text, "nme_makeup") == ["nme_makeup", "5.000", "—", "—"]
    assert "paired bootstrap over 100 faces, 2000 samples: mean difference -1.000, 95 % interval" in text
    assert text.splitlines()[-2:] == [
        "PROMOTE",
        "  test NME 4.000 < mean shape 20.000; test NME 4.000 < 5.000; "
        "no subset worse by more than 0.100; 95 % interval [-1.000, -1.000] < 0",
    ]


def test_format_comparison_without_a_champion():
    text = format_comparison(decide(_result("1", CHAMPION_NME, {"auc_test": None}), None, RULES))
    assert "champion" not in text.splitlines()[0] and "candidate v1" in text
    assert _row(text, "nme_test") == ["nme_test", "5.000"] and _row(text, "auc_test") == ["auc_test", "—"]
    assert "paired bootstrap" not in text and text.splitlines()[-2:] == [
        "PROMOTE",
        "  no champion yet; test NME 5.000 < mean shape 20.000",
    ]


def _moves(*steps):
    """History from (kind, to) steps; `from` is filled from the chain as it grows."""
    moves = []
    for seq, (kind, to) in enumerate(steps, start=1):
        chain = champion_chain(moves)
        moves.append(new_move(seq, kind, chain[-1] if chain else None, to, "test"))
    return moves


def test_champion_chain_follows_promotions_and_rollbacks():
    moves = _moves(("first", "1"), ("promote", "2"), ("rollback", "1"), ("promote", "3"), ("rollback", "1"))
    assert [champion_chain(moves[:n]) for n in range(1, 6)] == [["1"], ["1", "2"], ["1"], ["1", "3"], ["1"]]
    assert champion_chain(reversed(moves)) == ["1"]  # sorted by seq
    with pytest.raises(PromotionError, match="no previous champion to roll back to"):
        rollback_target(moves)
    stacked = _moves(("first", "1"), ("promote", "2"), ("force", "3"), ("rollback", "2"))
    assert champion_chain(stacked) == ["1", "2"] and rollback_target(stacked) == "1"
    assert rollback_target(stacked[:3]) == "2"


def test_rollback_with_a_single_champion_raises():
    with pytest.raises(PromotionError, match="no previous champion to roll back to"):
        rollback_target(_moves(("first", "1")))
    with pytest.raises(PromotionError, match="rolls back with no champion"):
        champion_chain([new_move(1, "rollback", None, "1", "oops")])


def test_new_move_records_when_and_what():
    now = datetime(2024, 5, 1, 12, 0, 0, 123, tzinfo=UTC)
    move = new_move(3, "force", "1", "2", "hotfix", now=now)
    assert move == {
        "seq": 3,
        "at": "2024-05-01T12:00:00+00:00",
        "from": "1",
        "to": "2",
        "kind": "force",
        "reason": "hotfix",
    }
    assert datetime.fromisoformat(new_move(1, "first", None, "1", "x")["at"]).tzinfo is not None
    with pytest.raises(PromotionError, match="must be one of"):
        new_move(4, "demote", "2", "1", "no such kind")
