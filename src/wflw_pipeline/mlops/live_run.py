"""train's MLflow run, the only MLflow code the train stage imports.

train opens the run before the first epoch (params, tags, the data as a dataset input), writes its id to
`mlflow_run.json` (outputs.RUN_REF, a DVC output of train) and logs each epoch's history row as it ends
(step = epoch). Nothing here may stop training: a call that still fails after `tracking.retries` tries is
warned about and later epochs are not logged live; history.csv, which train writes anyway, is logged at the
end instead, or by register when the server is back. A training stopped by Ctrl-C or SIGTERM closes its
run as KILLED; the run of one killed outright (SIGKILL, a lost machine) is closed by the next run opened
from the same workspace on the same machine, which finds it by its process tags (provenance.PROCESS_TAGS).
"""

from __future__ import annotations

import csv
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric

from .. import fileio
from ..core.runtime import Distributed, device_facts, resolve_device
from ..data.contract import data_identity
from ..outputs import TrainOutputs, untracked
from ..params import Params
from . import provenance
from .client import Tracking, TrackingError, connect, experiment_id

logger = logging.getLogger(__name__)


CURVES = ("train_loss", "val_nme", "lr", "images_per_s")
"""history.csv columns logged as MLflow metrics of the same name, with step = epoch."""
TRAIN_SUMMARY = {
    "selected_epoch": "selected_epoch",
    "val_nme": "nme_val_selected",
    "baseline_val_nme": "nme_val_mean_shape",
    "train_seconds": "train_seconds",
    "images_per_s": "train_images_per_s_median",
}
"""train metrics.json key -> the MLflow metric (logged once)."""


RAN_ON_TAGS = {"device": "device", "device_name": "device.name", "torch_version": "torch.version"}
"""train metrics.json key (core.runtime.device_facts) -> the run tag: what the training ran on."""


def run_tags(identity: dict[str, Any], source: str, ran_on: dict[str, Any]) -> dict[str, str]:
    """Tags a run gets at its start: the command that opened it, provenance, data, and what the training
    ran on (`ran_on`: device_facts' keys; train's metrics.json for a run register opens)."""
    return {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": source,
        **provenance.git_tags(provenance.project_root()),
        **provenance.caller_tags(),
        **provenance.process_tags(),
        **provenance.data_tags(identity),
        **{tag: str(ran_on[key]) for key, tag in RAN_ON_TAGS.items() if key in ran_on},
    }


def dataset_input(params: Params, identity: dict[str, Any], train_split: Path) -> DatasetInput:
    """The data as an MLflow dataset: name, where it came from, digest of both archive SHA-256s.

    The source is the official URL (wflw), the user's archive (local), or the train split's Parquet
    file (synthetic: generated, so the file trained on is the most useful pointer).
    """
    source = params.data.source
    if source == "wflw":
        uri = params.data.wflw.images_url
    elif source == "local":
        uri = Path(str(params.data.local.images_archive)).expanduser().resolve().as_uri()
    else:
        uri = train_split.resolve().as_uri()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "file:" resolves to LocalArtifactDatasetSource twice
        resolved = resolve_dataset_source(uri)
    dataset = MetaDataset(resolved, name=f"wflw-{source}", digest=provenance.data_digest(identity))
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])


def start_run(
    tracking: Tracking, params: Params, train_split: Path, source: str, ran_on: dict[str, Any]
) -> str:
    """A new run opened by the command `source`, with every param, the start tags and the dataset input."""
    identity = data_identity(train_split)
    experiment = experiment_id(tracking, params.tracking.experiment)
    close_abandoned(tracking, experiment)
    run = tracking.call(
        "create a run",
        tracking.client.create_run,
        experiment,
        run_name=provenance.run_name(params),
        tags=run_tags(identity, source, ran_on),
    )
    run_id = run.info.run_id
    tracking.log_batch(run_id, params=provenance.flatten(params.to_dict()))
    dataset = dataset_input(params, identity, train_split)
    tracking.call("log the dataset", tracking.client.log_inputs, run_id, datasets=[dataset])
    return run_id


def epoch_metrics(row: dict[str, Any]) -> list[Metric]:
    """One history row as metrics at step = epoch (an empty val_nme is skipped)."""
    stamp = int(time.time() * 1000)
    step = int(row["epoch"])
    return [Metric(name, float(row[name]), stamp, step) for name in CURVES if row.get(name) not in (None, "")]


def read_history(path: Path) -> list[dict[str, Any]]:
    """history.csv rows (strings; an empty val_nme where there was no val split)."""
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def log_training(
    tracking: Tracking, run_id: str, history: Path, train_metrics: Path, logged: frozenset[int] = frozenset()
) -> None:
    """The epochs of history.csv not `logged` yet (step = epoch), train's summary metrics, both files."""
    rows = [row for row in read_history(history) if int(row["epoch"]) not in logged]
    curves = [metric for row in rows for metric in epoch_metrics(row)]
    summary = json.loads(train_metrics.read_text())
    stamp = int(time.time() * 1000)
    totals = [
        Metric(name, float(summary[key]), stamp, 0)
        for key, name in TRAIN_SUMMARY.items()
        if summary.get(key) is not None
    ]
    tracking.log_batch(run_id, metrics=[*curves, *totals])
    for path in (history, train_metrics):
        tracking.call(f"upload {path.name}", tracking.client.log_artifact, run_id, str(path), "training")


class TrainTracker:
    """Live tracking of one training; every failure becomes a warning, never an exception."""

    def __init__(self, tracking: Tracking | None, run_id: str | None) -> None:
        self.tracking = tracking
        self.run_id = run_id
        self.live = run_id is not None
        self.logged: set[int] = set()

    @classmethod
    def start(cls, params: Params, parquet_dir: Path, ref: Path) -> TrainTracker:
        """Open the run (or warn and go on without one) and write its id to `ref`."""
        try:
            tracking = connect(params.tracking)
            ran_on = device_facts(resolve_device(params.train.device))
            run_id = start_run(tracking, params, parquet_dir / "train.parquet", "wflw train", ran_on)
        except TrackingError as err:
            logger.warning("%s: training goes on untracked; `wflw register` will track it", err)
            fileio.write_json(ref, untracked(str(err)))
            return cls(None, None)
        fileio.write_json(
            ref,
            {"run_id": run_id, "tracking_uri": tracking.uri, "experiment": params.tracking.experiment},
        )
        logger.info("MLflow: run %s at %s", run_id, tracking.uri)
        return cls(tracking, run_id)

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        """Log one epoch's curves; after a failure, stop logging live (finish logs the history)."""
        if not self.live or self.tracking is None or self.run_id is None:
            return
        try:
            self.tracking.log_batch(self.run_id, metrics=epoch_metrics(row))
            self.logged.add(int(row["epoch"]))
        except TrackingError as err:
            self.live = False
            logger.warning("%s: not logging curves live any more; history.csv is logged at the end", err)

    def finish(self, history: Path, train_metrics: Path) -> None:
        """Log the whole history and train's metrics, and close the run as finished."""
        self._close(
            lambda tracking, run_id: log_training(
                tracking, run_id, history, train_metrics, frozenset(self.logged)
            ),
            "FINISHED",
        )

    def fail(self, status: str) -> None:
        """Close the run as FAILED or KILLED."""
        self._close(lambda tracking, run_id: None, status)

    def _close(self, log: Callable[[Tracking, str], None], status: str) -> None:
        if self.tracking is None or self.run_id is None:
            return
        try:
            log(self.tracking, self.run_id)
            self.tracking.log_batch(self.run_id, tags={"wflw.stage": "trained"})
            self.tracking.call("close the run", self.tracking.client.set_terminated, self.run_id, status)
        except TrackingError as err:
            logger.warning("%s: `wflw register` will complete the run", err)


def close_abandoned(tracking: Tracking, experiment: str) -> None:
    """Mark KILLED the RUNNING runs of `experiment` that a process of this workspace on this machine opened
    and that is gone (killed before it could close its run)."""
    mine = provenance.process_tags()
    running = tracking.call(
        "look for interrupted runs",
        tracking.client.search_runs,
        [experiment],
        f"attributes.status = 'RUNNING' and tags.`{provenance.HOST_TAG}` = '{mine[provenance.HOST_TAG]}'",
    )
    for run in running:
        tags = run.data.tags
        pid = tags.get(provenance.PID_TAG, "")
        same_checkout = tags.get(provenance.CHECKOUT_TAG) == mine[provenance.CHECKOUT_TAG]
        if not same_checkout or not pid.isdigit() or fileio.process_running(int(pid)):
            continue
        tracking.call("close the interrupted run", tracking.client.set_terminated, run.info.run_id, "KILLED")
        logger.info("MLflow: run %s of a killed process (pid %s) marked KILLED", run.info.run_id, pid)


@contextmanager
def tracked_training(
    params: Params, parquet_dir: Path, outputs: TrainOutputs
) -> Iterator[Callable[[dict[str, Any]], None] | None]:
    """Around `run_train`: yields its on_epoch_end callback (None on ranks other than 0)."""
    if not Distributed.from_env().main:
        yield None
        return
    tracker = TrainTracker.start(params, parquet_dir, outputs.run_ref)
    try:
        yield tracker.on_epoch_end
    except KeyboardInterrupt:
        tracker.fail("KILLED")
        raise
    except BaseException:
        tracker.fail("FAILED")
        raise
    tracker.finish(outputs.history, outputs.metrics)
