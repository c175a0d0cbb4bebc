"""Stage train: devices, precision, DDP, the reference schedule, checkpoints, resume, history."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import fileio, stage_code
from .core.engine import (
    EpochBatches,
    EpochResult,
    NonFiniteLossError,
    epoch_generators,
    predict,
    train_one_epoch,
)
from .core.geometry import View
from .core.losses import loss_from_params
from .core.metrics import mean_shape_nme, nme_per_face
from .core.model import IMAGENET, build_model, save_atomic, save_trained
from .core.optim import build_training
from .core.runtime import (
    Distributed,
    Precision,
    compile_model,
    configure_backends,
    device_facts,
    resolve_device,
    resolve_precision,
)
from .data import augment
from .data.contract import data_identity
from .data.dataset import FaceSet, iters_per_epoch, load_faces
from .errors import PipelineError, require_mlflow
from .outputs import TrainOutputs, untracked
from .params import Params, TrainParams

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
HISTORY_FIELDS = ("epoch", "lr", "train_loss", "val_nme", "seconds", "images_per_s")
RESUME_SECTIONS = ("model", "loss", "augment", "train")


class TrainError(PipelineError):
    """A training run that cannot start or go on (names the cause)."""


def mean_shape(faces: FaceSet, view: View) -> torch.Tensor:
    """Mean landmarks of the un-augmented view, normalised to the network input (98, 2)."""
    identity = augment.identity_params(len(faces), faces.landmarks.device)
    matrices = augment.view_matrices(identity, view.crop_size, view.context, view.input_size)
    points = augment.transform_landmarks(faces.landmarks, matrices, identity.flip)
    return (points / view.input_size).mean(dim=0).cpu()


def val_nme(model: nn.Module, faces: FaceSet, view: View, batch_size: int, precision: Precision) -> float:
    """NME (%) of the un-augmented predictions on `faces`; NME is the same in crop and image pixels."""
    pred = predict(model, faces, view=view, batch_size=batch_size, precision=precision, normalize=IMAGENET)
    return 100.0 * float(nme_per_face(pred.numpy(), faces.landmarks.cpu().numpy()).mean())


def write_history(rows: list[dict[str, Any]], path: Path) -> None:
    """history.csv: one row per epoch (an empty val_nme where there is no val split)."""
    lines = [",".join(HISTORY_FIELDS)]
    lines += [",".join(_csv_value(row[field]) for field in HISTORY_FIELDS) for row in rows]
    fileio.write_text(path, "\n".join(lines) + "\n")


def _csv_value(value: Any) -> str:
    return "" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))


def resume_key(params: Params, data: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for a checkpoint to be continued: the params train reads, the data, the code."""
    full = params.to_dict()
    return {
        **{section: full[section] for section in RESUME_SECTIONS},
        "data": data,
        "code": stage_code.digest(stage_code.stage_sources("train")),
    }


def load_checkpoint(
    path: Path, key: dict[str, Any], config: TrainParams, world_size: int
) -> dict[str, Any] | None:
    """The checkpoint to continue (`train.resume: auto`), or None to start afresh.

    Never continued: a finished run, or one written with other params, data or code. A run of another
    number of processes is refused: its schedule counted iterations of another global batch.
    """
    if config.resume == "never" or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a damaged file
        logger.warning("%s cannot be read (%s): starting afresh", path, err)
        return None
    if not isinstance(state, dict) or state.get("resume_key") != key:
        logger.warning("%s was written with other params, data or code: starting afresh", path)
        return None
    if state["epoch"] >= config.epochs:
        logger.info(
            "%s is a finished run (epoch %d of %d): starting afresh", path, state["epoch"], config.epochs
        )
        return None
    if state["world_size"] != world_size:
        raise TrainError(
            f"{path} was written by {state['world_size']} process(es) (global batch "
            f"{state['world_size'] * config.batch_size}), this run has {world_size} (global batch "
            f"{world_size * config.batch_size}): the learning-rate schedule counts iterations, so resume "
            f"with {state['world_size']} process(es), or start afresh with train.resume=never"
        )
    logger.info("resuming from %s after epoch %d", path, state["epoch"])
    return state


def agreed_checkpoint(
    path: Path, key: dict[str, Any], config: TrainParams, world: Distributed
) -> dict[str, Any] | None:
    """Rank 0 decides whether and what to resume (its file, its error) and every rank follows."""
    decision: tuple[str, Any] | None = None
    if world.main:
        try:
            decision = ("state", load_checkpoint(path, key, config, world.world_size))
        except TrainError as err:
            decision = ("error", str(err))
    kind, value = world.broadcast(decision)  # type: ignore[misc]
    if kind == "error":
        raise TrainError(value)
    return value


class _Run:
    """The mutable state of one training run: model, optimiser, schedule, history, best epoch."""

    def __init__(self, params: Params, train: FaceSet, device: torch.device, world: Distributed) -> None:
        config = params.train
        self.params = params
        self.world_size = world.world_size
        self.view = View(train.crop_size, train.context, params.model.input_size)
        self.mean_shape = mean_shape(train, self.view)
        model = params.model
        self.model = build_model(
            model.arch, model.pretrained, self.mean_shape, model.head_init, model.zero_init_residual
        ).to(device)
        self.precision = resolve_precision(config.precision, config.channels_last, device)
        self.model = self.model.to(memory_format=self.precision.memory_format())
        self.iters_per_epoch = iters_per_epoch(
            len(train), config.batch_size, world.world_size, config.drop_last
        )
        self.optimizer, self.scheduler = build_training(self.model, config, device, self.iters_per_epoch)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": 0, "val_nme": None, "model": None}

    def state(self, key: dict[str, Any]) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "epoch": self.epoch,
            "world_size": self.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "best": self.best,
            "mean_shape": self.mean_shape,
            "params": self.params.to_dict(),
            "resume_key": key,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.history, self.best = state["epoch"], state["history"], state["best"]
        self.mean_shape = state["mean_shape"]

    def record(self, result: EpochResult, nme: float | None) -> dict[str, Any]:
        """Append one epoch to the history; keep its weights if it is the best on val so far."""
        row = {
            "epoch": self.epoch,
            "lr": result.lr,
            "train_loss": result.loss,
            "val_nme": nme,
            "seconds": result.seconds,
            "images_per_s": result.images / max(result.seconds, 1e-9),
        }
        self.history.append(row)
        improved = nme is not None and (self.best["val_nme"] is None or nme < self.best["val_nme"])
        if improved:
            self.best = {"epoch": self.epoch, "val_nme": nme, "model": self.cpu_weights()}
        return row

    def selected_weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The epoch and weights model selection picked: best on val, or the last epoch."""
        if self.best["model"] is not None:
            return self.best["epoch"], self.best["model"]
        return self.epoch, self.cpu_weights()

    def cpu_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


EpochCallback = Callable[[dict[str, Any]], None]
"""Called on rank 0 with each epoch's history row once it is written (e.g. live curves in tracking)."""


def tracking(params: Params, parquet_dir: Path, outputs: TrainOutputs) -> contextlib.AbstractContextManager:
    """Around `run_train`: MLflow's live tracking (tracking.enabled; yields on_epoch_end), else the run
    reference that says there is none (MLflow is not imported then)."""
    if params.tracking.enabled:
        require_mlflow()
        from .mlops.live_run import tracked_training

        return tracked_training(params, parquet_dir, outputs)
    if Distributed.from_env().main:
        fileio.write_json(outputs.run_ref, untracked("tracking.enabled is false"))
    return contextlib.nullcontext()


def run_train(
    params: Params,
    parquet_dir: Path,
    outputs: TrainOutputs,
    on_epoch_end: EpochCallback | None = None,
) -> dict[str, Any]:
    """Stage train: fit DeepPose on train.parquet, select on val.parquet, write model and history."""
    config = params.train
    world = Distributed.from_env()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device, world.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    configure_backends(device)
    if world.world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(params, parquet_dir, outputs, device, world, on_epoch_end)
    finally:
        if world.world_size > 1:
            dist.destroy_process_group()


def _train(
    params: Params,
    parquet_dir: Path,
    outputs: TrainOutputs,
    device: torch.device,
    world: Distributed,
    on_epoch_end: EpochCallback | None,
) -> dict[str, Any]:
    config = params.train
    torch.manual_seed(config.seed)
    train = load_faces(parquet_dir / "train.parquet", device)
    val = load_faces(parquet_dir / "val.parquet", device)
    if len(train) == 0:
        raise TrainError(f"{parquet_dir / 'train.parquet'}: no training faces")
    run = _Run(params, train, device, world)
    data = data_identity(parquet_dir / "train.parquet")
    key = resume_key(params, data)
    state = agreed_checkpoint(outputs.checkpoint, key, config, world)
    if state is not None:
        run.restore(state)
    module = run.model
    model: nn.Module = DistributedDataParallel(module) if world.world_size > 1 else module
    if config.compile:
        model = compile_model(model, config.compile_cache)
    loss_fn = loss_from_params(params.loss, params.model.input_size)
    logger.info(
        "training %s on %s (%d train, %d val faces, %d process(es), %s)",
        params.model.arch,
        device,
        len(train),
        len(val),
        world.world_size,
        run.precision.name,
    )
    saved_epoch = run.epoch if state is not None else None
    last_save = time.monotonic()
    while run.epoch < config.epochs:
        order, augmentation = epoch_generators(config.seed, run.epoch, world.rank, device)
        try:
            result = train_one_epoch(
                model,
                run.optimizer,
                run.scheduler,
                loss_fn,
                EpochBatches(
                    train,
                    view=run.view,
                    augmentation=params.augment,
                    batch_size=config.batch_size,
                    drop_last=config.drop_last,
                    order_generator=order,
                    augment_generator=augmentation,
                    precision=run.precision,
                    rank=world.rank,
                    world_size=world.world_size,
                ),
                progress=world.main,
            )
        except NonFiniteLossError as err:
            kept = f"; {outputs.checkpoint} (epoch {saved_epoch}) is kept" if saved_epoch else ""
            raise TrainError(f"epoch {run.epoch + 1}: {err}{kept}") from None
        run.epoch += 1
        nme = val_nme(module, val, run.view, config.batch_size, run.precision) if len(val) else None
        row = run.record(result, nme)
        if world.main:
            _log_epoch(row, config.epochs)
            due = time.monotonic() - last_save >= config.checkpoint_interval_s
            if due or run.epoch == 1 or run.epoch == config.epochs:
                save_atomic(run.state(key), outputs.checkpoint)
                saved_epoch, last_save = run.epoch, time.monotonic()
            write_history(run.history, outputs.history)
            if on_epoch_end is not None:
                on_epoch_end(dict(row))
        world.barrier()
    metrics = _finish(run, val, data, outputs, world, device)
    world.barrier()
    return metrics


def _log_epoch(row: dict[str, Any], epochs: int) -> None:
    val = "" if row["val_nme"] is None else f", val NME {row['val_nme']:.3f} %"
    logger.info(
        "epoch %d/%d: loss %.5f%s, lr %.2e, %.1f s, %.0f images/s",
        row["epoch"],
        epochs,
        row["train_loss"],
        val,
        row["lr"],
        row["seconds"],
        row["images_per_s"],
    )


def _baseline_nme(run: _Run, faces: FaceSet) -> float:
    """NME (%) on `faces` of always predicting the run's mean training shape."""
    view = run.view
    return mean_shape_nme(run.mean_shape.numpy(), view.crop_size, view.context, faces.landmarks.cpu().numpy())


def _finish(
    run: _Run,
    val: FaceSet,
    data: dict[str, Any],
    outputs: TrainOutputs,
    world: Distributed,
    device: torch.device,
) -> dict[str, Any]:
    """Write the selected model and the run's metrics (rank 0 only); return the metrics."""
    epoch, weights = run.selected_weights()
    history = run.history
    speeds = [row["images_per_s"] for row in history if row["epoch"] > 1] or [history[-1]["images_per_s"]]
    metrics = {
        "epochs": run.epoch,
        "selected_epoch": epoch,
        "selected_by": "val_nme" if run.best["model"] is not None else "last_epoch",
        "val_nme": run.best["val_nme"],
        "baseline_val_nme": _baseline_nme(run, val) if len(val) else None,
        "train_loss": history[-1]["train_loss"],
        "train_seconds": sum(row["seconds"] for row in history),
        "images_per_s": statistics.median(speeds),
        "world_size": world.world_size,
        **device_facts(device),
    }
    if world.main:
        config = run.params
        save_trained(
            outputs.model,
            weights,
            arch=config.model.arch,
            view=run.view,
            face_box={"bbox": data["crop"]["bbox"], "padding": data["crop"]["padding"]},
            normalize=IMAGENET,
            mean_shape=run.mean_shape,
            data=data,
            epoch=epoch,
            params=config.to_dict(),
        )
        fileio.write_json(outputs.metrics, metrics)
        logger.info("wrote %s (epoch %d, selected by %s)", outputs.model, epoch, metrics["selected_by"])
    return metrics
