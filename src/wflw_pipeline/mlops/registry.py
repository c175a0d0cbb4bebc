"""The registry's aliases: `wflw promote`, `rollback` and `models` move and show `champion`.

The gate is promotion.decide, on each version's tags and its run's per_face.parquet. Each move is recorded
twice: as a registered-model tag `wflw.move.<seq>` (JSON: when, from which version, to which, what kind,
why), the history rollback walks back; and as tags on the versions (`wflw.promoted_at`,
`wflw.promoted_from`, `wflw.promotion_reason`; `wflw.demoted_at`, `wflw.demoted_by`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from typing import Any

import mlflow
import numpy as np
import pyarrow.parquet as pq

from ..errors import EXIT_REFUSED, PipelineError
from ..params import Params
from ..tables import format_table
from . import promotion, provenance
from .client import Tracking, connect, fluent
from .lock import Lease, champion_lock
from .promotion import Decision, GateRules, PromotionError, VersionResult

logger = logging.getLogger(__name__)


CHAMPION = "champion"
CHALLENGER = "challenger"
MOVE_TAG = "wflw.move."
PER_FACE = "evaluation/per_face.parquet"


class PromotionRefused(PipelineError):
    """The gate refused the candidate; `report` is the comparison that says why."""

    exit_code = EXIT_REFUSED

    def __init__(self, message: str, report: str) -> None:
        super().__init__(message)
        self.report = report


def register_version(
    tracking: Tracking,
    name: str,
    run_id: str,
    model_uri: str,
    metrics: dict[str, float],
    identity: dict[str, Any],
    onnx_tags: dict[str, str],
) -> str:
    """The run's version of `name` (created once), tagged with its results, data and ONNX file; alias
    challenger."""
    client = tracking.client
    found = tracking.call(
        "search the model versions", client.search_model_versions, f"name = '{name}' and run_id = '{run_id}'"
    )
    if found:
        version = str(max(int(v.version) for v in found))
    else:
        tags = {
            **{key: f"{value:.6g}" for key, value in metrics.items()},
            **provenance.data_tags(identity),
            "data.identity": json.dumps(identity, sort_keys=True),
            **provenance.git_tags(provenance.project_root()),
            **onnx_tags,
        }
        created = tracking.call("register the model", _register_model, tracking, model_uri, name, tags)
        version = str(created.version)
    tracking.call("set the alias", client.set_registered_model_alias, name, CHALLENGER, version)
    return version


def _register_model(tracking: Tracking, model_uri: str, name: str, tags: dict[str, str]) -> Any:
    with fluent(tracking.uri):
        return mlflow.register_model(model_uri, name, tags=tags)


def _alias(tracking: Tracking, name: str, alias: str) -> str | None:
    """The version `alias` points at, or None when it points nowhere."""
    try:
        return str(tracking.client.get_model_version_by_alias(name, alias).version)
    except Exception:  # MlflowException: no such alias (or model)
        return None


def _registered(tracking: Tracking, name: str) -> Any:
    try:
        return tracking.client.get_registered_model(name)
    except Exception as err:  # MlflowException RESOURCE_DOES_NOT_EXIST, or the server
        tracking.call("reach the tracking server", tracking.client.search_experiments, max_results=1)
        raise PromotionError(
            f"registered model {name!r} not found at {tracking.uri}: run the pipeline (`dvc repro`) first"
        ) from err


def moves(tracking: Tracking, name: str) -> list[dict[str, Any]]:
    """Every recorded move of `champion`, oldest first."""
    tags = _registered(tracking, name).tags
    found = [json.loads(value) for key, value in tags.items() if key.startswith(MOVE_TAG)]
    return sorted(found, key=lambda move: move["seq"])


def version_result(tracking: Tracking, name: str, version: str) -> VersionResult:
    """A version's metrics and data (its tags) and its per-face NME (its run's per_face.parquet)."""
    client = tracking.client
    try:
        found = client.get_model_version(name, version)
    except Exception as err:  # MlflowException: no such version
        raise PromotionError(f"{name} has no version {version}") from err
    tags = found.tags
    metrics = {
        key: float(tags[key]) if key in tags else None for key in (*promotion.METRICS, promotion.BASELINE)
    }
    data = json.loads(tags.get("data.identity", "{}"))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(found.run_id, PER_FACE, tmp)
        except Exception as err:  # missing artifact or unreachable store
            raise PromotionError(
                f"{name} version {version}: cannot read {PER_FACE} of run {found.run_id} ({err})"
            ) from err
        table = pq.read_table(path, columns=["face_id", "nme"])
    return VersionResult(
        version=str(version),
        metrics=metrics,
        data=data,
        face_id=table.column("face_id").to_numpy().astype(np.int64),
        nme=table.column("nme").to_numpy().astype(np.float64),
    )


def promote(params: Params, version: str | None, *, force: bool, reason: str | None) -> str:
    """Gate `version` (default: the challenger) against the champion; move `champion` if it passes.

    Returns the comparison text. Raises PromotionRefused when the gate says no and `force` is off. The
    champion is read, compared and moved under the champion lock, so a concurrent move is seen.
    """
    if force and not reason:
        raise PromotionError("--force needs --reason TEXT: the reason is recorded on the model versions")
    tracking = connect(params.tracking)
    name = params.registry.model_name
    _registered(tracking, name)
    candidate = version or _alias(tracking, name, CHALLENGER)
    if candidate is None:
        raise PromotionError(f"{name} has no alias {CHALLENGER!r}: pass --version N")
    with champion_lock(tracking, name, params.registry.lock_lease_s) as lease:
        champion = _alias(tracking, name, CHAMPION)
        if champion == str(candidate):
            return f"{name} version {candidate} is already the champion"
        decision = _decide(tracking, name, str(candidate), champion, params, force=force)
        text = promotion.format_comparison(decision) if decision else ""
        if decision is not None and not decision.accepted and not force:
            raise PromotionRefused(f"{name} version {candidate} not promoted: {decision.reasons[0]}", text)
        if decision is not None and decision.accepted:
            kind, why = ("first" if champion is None else "promote"), "; ".join(decision.reasons)
        else:
            kind, why = "force", str(reason)
        _move(tracking, lease, name, kind, champion, str(candidate), why)
    return f"{text}\n{name}: champion -> version {candidate} ({kind})".lstrip()


def _decide(
    tracking: Tracking, name: str, candidate: str, champion: str | None, params: Params, *, force: bool
) -> Decision | None:
    """The gate's decision; with --force, a comparison that cannot be made (other faces) is skipped."""
    rules = GateRules.from_params(params.registry)
    try:
        result = version_result(tracking, name, candidate)
        best = version_result(tracking, name, champion) if champion else None
        return promotion.decide(result, best, rules)
    except PromotionError as err:
        if not force:
            raise
        logger.warning("%s: no comparison; --force moves the champion anyway", err)
        return None


def rollback(params: Params, reason: str | None) -> str:
    """Move `champion` back to the champion before the current one."""
    tracking = connect(params.tracking)
    name = params.registry.model_name
    with champion_lock(tracking, name, params.registry.lock_lease_s) as lease:
        target = promotion.rollback_target(moves(tracking, name))
        current = _alias(tracking, name, CHAMPION)
        _move(tracking, lease, name, "rollback", current, target, reason or "rollback")
    return f"{name}: champion -> version {target} (rolled back from version {current})"


def _move(
    tracking: Tracking,
    lease: Lease,
    name: str,
    kind: str,
    from_version: str | None,
    to_version: str,
    reason: str,
) -> None:
    """Point `champion` at `to_version` and record the move on the model and both versions."""
    client = tracking.client
    history = moves(tracking, name)
    move = promotion.new_move(len(history) + 1, kind, from_version, to_version, reason)
    lease.check()
    tracking.call("set the alias", client.set_registered_model_alias, name, CHAMPION, to_version)
    tracking.call(
        "record the move",
        client.set_registered_model_tag,
        name,
        f"{MOVE_TAG}{move['seq']:04d}",
        json.dumps(move),
    )
    tags = {
        "wflw.promoted_at": move["at"],
        "wflw.promoted_from": str(from_version),
        "wflw.promotion_reason": reason,
    }
    for key, value in tags.items():
        tracking.call("tag the version", client.set_model_version_tag, name, to_version, key, value)
    if from_version is not None:
        for key, value in {"wflw.demoted_at": move["at"], "wflw.demoted_by": to_version}.items():
            tracking.call("tag the version", client.set_model_version_tag, name, from_version, key, value)


def models(params: Params) -> str:
    """The versions (aliases, metrics, data, run) and the champion's history, as text."""
    tracking = connect(params.tracking)
    name = params.registry.model_name
    registered = _registered(tracking, name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (registered.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    found = tracking.call("list the versions", tracking.client.search_model_versions, f"name = '{name}'")
    rows = [
        [
            version.version,
            ",".join(sorted(aliases.get(str(version.version), []))) or "-",
            _tag(version.tags, "nme_test", 3),
            _tag(version.tags, "fr_test", 2),
            _tag(version.tags, "auc_test", 4),
            version.tags.get("data.source", "-"),
            version.run_id,
        ]
        for version in sorted(found, key=lambda v: int(v.version))
    ]
    headers = ["version", "aliases", "NME test", "FR", "AUC", "data", "run"]
    lines = [f"registered model {name} at {tracking.uri}", format_table(headers, rows)]
    history = moves(tracking, name)
    lines.append("champion history:" if history else "champion history: none yet")
    for move in history:
        lines.append(
            f"  {move['seq']:>3}. {move['at']}  {move['kind']:<8} v{move['from'] or '-'} -> v{move['to']}: "
            f"{move['reason']}"
        )
    return "\n".join(lines)


def _tag(tags: dict[str, str], key: str, digits: int) -> str:
    return f"{float(tags[key]):.{digits}f}" if key in tags else "-"
