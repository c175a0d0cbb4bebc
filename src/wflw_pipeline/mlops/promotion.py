"""The decision of `wflw promote`: whether a candidate model version may take the alias `champion`.

Pure logic, no MLflow: the caller fetches each version's metrics, data identity and per-face NME, and
stores the champion history. A candidate must beat always predicting the mean training shape on its test
faces, and then the champion on the same test faces (same archives, same crop): lower test NME, no
attribute subset worse by more than the allowed points and, when required, a paired bootstrap interval of
the per-face NME difference (candidate - champion) entirely below zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from ..data import wflw
from ..errors import PipelineError
from ..params import RegistryParams
from ..tables import format_table

METRICS = (*(f"nme_{subset}" for subset in wflw.SUBSETS), "fr_test", "auc_test")
BASELINE = "nme_mean_shape"
"""The test NME of always predicting the mean training shape (evaluate's metrics.json `mean_shape`)."""
MOVE_KINDS = ("first", "promote", "force", "rollback")
_DECIMALS = {"fr_test": 2, "auc_test": 4}  # every NME: 3
_CHUNK_ELEMENTS = 1 << 22  # resampled indices held at once by the bootstrap (32 MiB of int64)
_MISSING = "—"


class PromotionError(PipelineError):
    """The two versions cannot be compared, or the champion history cannot do what was asked."""


@dataclass(frozen=True)
class VersionResult:
    """One model version's evaluation on the test split: metrics, data identity and per-face NME (%)."""

    version: str
    metrics: dict[str, float | None]
    data: dict[str, Any]
    face_id: np.ndarray
    nme: np.ndarray


@dataclass(frozen=True)
class GateRules:
    """What a candidate must satisfy to replace the champion."""

    max_subset_regression: float
    require_significant: bool
    bootstrap_samples: int
    confidence: float
    seed: int

    @classmethod
    def from_params(cls, params: RegistryParams) -> GateRules:
        """The rules of params.yaml's registry section."""
        return cls(
            params.max_subset_regression,
            params.require_significant,
            params.bootstrap_samples,
            params.confidence,
            params.seed,
        )


@dataclass(frozen=True)
class Interval:
    """A paired-bootstrap percentile interval of the mean per-face NME difference (candidate - champion)."""

    mean: float
    low: float
    high: float
    confidence: float
    samples: int
    faces: int


@dataclass(frozen=True)
class Decision:
    """The verdict, the lines that explain it and what it was based on."""

    accepted: bool
    reasons: list[str]
    candidate: VersionResult
    champion: VersionResult | None
    interval: Interval | None


def data_mismatch(candidate_data: dict[str, Any], champion_data: dict[str, Any]) -> list[str]:
    """One line per difference in archive SHA-256s or crop parameters (the source name may differ)."""
    archives = _differences(
        "archive", candidate_data.get("archives"), champion_data.get("archives"), lambda sha: str(sha)[:12]
    )
    return archives + _differences("crop", candidate_data.get("crop"), champion_data.get("crop"), repr)


def _differences(
    what: str, candidate: dict | None, champion: dict | None, shown: Callable[[Any], str]
) -> list[str]:
    """The keys whose values differ between two dicts, each with both values."""
    if not candidate or not champion:
        sides = [side for side, found in (("candidate", candidate), ("champion", champion)) if not found]
        return [f"{what}: not recorded for the {' and '.join(sides)}"]
    keys = sorted(candidate.keys() | champion.keys())
    return [
        f"{what} {key}: {shown(candidate.get(key))} (candidate) vs {shown(champion.get(key))} (champion)"
        for key in keys
        if candidate.get(key) != champion.get(key)
    ]


def paired_faces(candidate: VersionResult, champion: VersionResult) -> tuple[np.ndarray, np.ndarray]:
    """Both per-face NME arrays ordered by face_id; the two must hold exactly the same faces."""
    for result in (candidate, champion):
        if np.shape(result.face_id) != np.shape(result.nme) or np.ndim(result.face_id) != 1:
            raise PromotionError(f"v{result.version}: face_id and nme are not two aligned 1-d arrays")
        repeated = len(result.face_id) - len(np.unique(result.face_id))
        if repeated:
            raise PromotionError(f"v{result.version}: {repeated} face ids appear more than once")
    only_candidate = np.setdiff1d(candidate.face_id, champion.face_id).size
    only_champion = np.setdiff1d(champion.face_id, candidate.face_id).size
    if only_candidate or only_champion:
        raise PromotionError(
            f"v{candidate.version} and v{champion.version} were evaluated on different faces: "
            f"{only_candidate} face ids only in candidate v{candidate.version}, "
            f"{only_champion} only in champion v{champion.version}"
        )
    by_id = [np.asarray(r.nme, np.float64)[np.argsort(r.face_id)] for r in (candidate, champion)]
    return by_id[0], by_id[1]


def paired_bootstrap(diff: np.ndarray, samples: int, confidence: float, seed: int) -> Interval:
    """Percentile interval of the mean of `diff`, resampling faces with replacement `samples` times."""
    diff = np.asarray(diff, np.float64)
    if diff.ndim != 1 or diff.size == 0:
        raise PromotionError("paired bootstrap: no per-face differences to resample")
    if samples < 1 or not 0 < confidence < 1:
        raise PromotionError(
            f"paired bootstrap: need samples >= 1 and 0 < confidence < 1, not {samples}, {confidence}"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    chunk = max(1, _CHUNK_ELEMENTS // diff.size)
    means = np.concatenate(
        [
            diff[rng.integers(0, diff.size, size=(min(chunk, samples - start), diff.size))].mean(axis=1)
            for start in range(0, samples, chunk)
        ]
    )
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(diff.mean()), float(low), float(high), confidence, samples, int(diff.size))


def decide(candidate: VersionResult, champion: VersionResult | None, rules: GateRules) -> Decision:
    """Accept the candidate only when every rule holds; the reasons list each failing rule, or why it won."""
    baseline = _baseline_check(candidate.metrics)
    if champion is None:
        failed, passed = baseline
        return Decision(not failed, failed or [f"no champion yet; {passed}"], candidate, None, None)
    mismatch = data_mismatch(candidate.data, champion.data)
    if mismatch:
        reasons = [f"evaluated on other test data: {line}" for line in mismatch]
        return Decision(False, reasons, candidate, champion, None)
    ours, theirs = paired_faces(candidate, champion)
    interval = paired_bootstrap(ours - theirs, rules.bootstrap_samples, rules.confidence, rules.seed)
    checks = [
        baseline,
        _test_check(candidate.metrics, champion.metrics),
        _subset_check(candidate.metrics, champion.metrics, rules.max_subset_regression),
    ]
    if rules.require_significant:
        checks.append(_significance_check(interval))
    failures = [line for failed, _ in checks for line in failed]
    reasons = failures or ["; ".join(passed for _, passed in checks)]
    return Decision(not failures, reasons, candidate, champion, interval)


def _test_check(candidate: dict, champion: dict) -> tuple[list[str], str]:
    """The candidate's test NME must be lower: (failure lines, the line when it holds)."""
    new, old = candidate.get("nme_test"), champion.get("nme_test")
    if new is None or old is None:
        return [
            f"test NME missing: candidate {_cell('nme_test', new)}, champion {_cell('nme_test', old)}"
        ], ""
    if new < old:
        return [], f"test NME {new:.3f} < {old:.3f}"
    return [f"test NME {new:.3f} is not lower than the champion's {old:.3f}"], ""


def _baseline_check(candidate: dict) -> tuple[list[str], str]:
    """The candidate's test NME must be lower than the mean shape's on the same faces."""
    new, base = candidate.get("nme_test"), candidate.get(BASELINE)
    if new is None or base is None:
        shown = f"test NME {_cell('nme_test', new)}, mean shape {_cell(BASELINE, base)}"
        return [f"no mean-shape baseline to compare with ({shown}): register the version again"], ""
    if new < base:
        return [], f"test NME {new:.3f} < mean shape {base:.3f}"
    return [
        f"test NME {new:.3f} is not lower than always predicting the mean training shape ({base:.3f})"
    ], ""


def _subset_check(candidate: dict, champion: dict, limit: float) -> tuple[list[str], str]:
    """No attribute subset's NME may rise by more than `limit` points."""
    failures = []
    for subset in wflw.ATTRIBUTES:
        new, old = candidate.get(f"nme_{subset}"), champion.get(f"nme_{subset}")
        if new is not None and old is not None and new - old > limit:
            failures.append(
                f"{subset} NME {new:.3f} is {new - old:.3f} worse than {old:.3f} (limit {limit:.3f})"
            )
    return failures, f"no subset worse by more than {limit:.3f}"


def _significance_check(interval: Interval) -> tuple[list[str], str]:
    """The interval of the mean per-face difference must lie below zero."""
    text = f"{_percent(interval.confidence)} % interval [{interval.low:.3f}, {interval.high:.3f}]"
    if interval.high < 0:
        return [], f"{text} < 0"
    return [f"not significant: {text} of the per-face NME difference does not lie below 0"], ""


def _percent(confidence: float) -> str:
    return f"{round(confidence * 100, 2):g}"


def _cell(metric: str, value: float | None, signed: bool = False) -> str:
    """A metric value at its precision (NME 3 decimals, FR 2, AUC 4), or a dash."""
    if value is None:
        return _MISSING
    return f"{value:{'+' if signed else ''}.{_DECIMALS.get(metric, 3)}f}"


def _row(metric: str, candidate: VersionResult, champion: VersionResult | None) -> list[str]:
    new = candidate.metrics.get(metric)
    if champion is None:
        return [metric, _cell(metric, new)]
    old = champion.metrics.get(metric)
    diff = None if new is None or old is None else new - old
    return [metric, _cell(metric, old), _cell(metric, new), _cell(metric, diff, signed=True)]


def format_comparison(decision: Decision) -> str:
    """A plain-text table of both versions' metrics, the bootstrap interval, the verdict and its reasons."""
    candidate, champion = decision.candidate, decision.champion
    header = ["metric", f"candidate v{candidate.version}"]
    if champion is not None:
        header = ["metric", f"champion v{champion.version}", header[1], "difference"]
    lines = [format_table(header, [_row(metric, candidate, champion) for metric in METRICS])]
    lines.append(f"({'difference: candidate - champion; ' if champion else ''}NME and FR in %, AUC 0..1)")
    if decision.interval is not None:
        i = decision.interval
        lines.append(
            f"paired bootstrap over {i.faces} faces, {i.samples} samples: mean difference {i.mean:+.3f}, "
            f"{_percent(i.confidence)} % interval [{i.low:.3f}, {i.high:.3f}]"
        )
    lines.append("PROMOTE" if decision.accepted else "REFUSE")
    lines += [f"  {reason}" for reason in decision.reasons]
    return "\n".join(lines)


def champion_chain(moves: Iterable[dict[str, Any]]) -> list[str]:
    """The champions in order, the current one last: a rollback pops it, any other move appends `to`."""
    chain: list[str] = []
    for move in sorted(moves, key=lambda move: move["seq"]):
        if move["kind"] not in MOVE_KINDS:
            raise PromotionError(f"champion history: move {move['seq']} has unknown kind {move['kind']!r}")
        if move["kind"] != "rollback":
            chain.append(move["to"])
        elif chain:
            chain.pop()
        else:
            raise PromotionError(f"champion history: move {move['seq']} rolls back with no champion")
    return chain


def rollback_target(moves: Iterable[dict[str, Any]]) -> str:
    """The champion before the current one."""
    chain = champion_chain(moves)
    if len(chain) < 2:
        raise PromotionError("no previous champion to roll back to")
    return chain[-2]


def new_move(
    seq: int, kind: str, from_version: str | None, to_version: str, reason: str, now: datetime | None = None
) -> dict[str, Any]:
    """One entry of the champion history (`at`: ISO 8601, UTC unless `now` says otherwise)."""
    if kind not in MOVE_KINDS:
        raise PromotionError(f"champion move kind must be one of {', '.join(MOVE_KINDS)}, not {kind!r}")
    at = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    return {"seq": seq, "at": at, "from": from_version, "to": to_version, "kind": kind, "reason": reason}
