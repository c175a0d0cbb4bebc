"""Typed, frozen params loaded from params.yaml, with `dotted.key=value` overrides.

No field has a default: params.yaml is the one source of default values, and a params file (or the
params stored in a checkpoint) that misses a key is an error naming the key, never a silent fallback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import PipelineError


class ParamsError(PipelineError):
    """A params file or override that is missing, malformed or out of range."""


@dataclass(frozen=True)
class SyntheticParams:
    """The synthetic WFLW generator (the embedded default data)."""

    seed: int
    train_faces: int
    test_faces: int
    min_image_size: int
    max_image_size: int
    workers: int

    def validate(self, key: str) -> None:
        _non_negative(self, key, "seed")
        _require(self.train_faces >= 1 and self.test_faces >= 1, f"{key}: need >= 1 face per split")
        _require(
            64 <= self.min_image_size <= self.max_image_size,
            f"{key}: need 64 <= min_image_size <= max_image_size",
        )
        _require(self.workers >= 0, f"{key}.workers: must be >= 0 (0 = all cores)")


@dataclass(frozen=True)
class WflwSourceParams:
    """Where the official archives are downloaded from, and the SHA-256 they must have."""

    images_url: str
    annotations_url: str
    images_sha256: str | None
    annotations_sha256: str | None
    cache_dir: str
    retries: int
    timeout_s: float

    def validate(self, key: str) -> None:
        for name in ("images_sha256", "annotations_sha256"):
            digest = getattr(self, name)
            ok = digest is None or (len(digest) == 64 and all(c in "0123456789abcdef" for c in digest))
            _require(ok, f"{key}.{name}: must be 64 lowercase hex digits or null")
        _require(self.retries >= 0, f"{key}.retries: must be >= 0")
        _require(self.timeout_s > 0, f"{key}.timeout_s: must be > 0")


@dataclass(frozen=True)
class LocalSourceParams:
    """Archives the user already has on disk."""

    images_archive: str | None
    annotations_archive: str | None
    images_sha256: str | None
    annotations_sha256: str | None


@dataclass(frozen=True)
class DataParams:
    source: Literal["synthetic", "wflw", "local"]
    synthetic: SyntheticParams
    wflw: WflwSourceParams
    local: LocalSourceParams

    def validate(self, key: str) -> None:
        if self.source == "local":
            for name in ("images_archive", "annotations_archive"):
                _require(
                    getattr(self.local, name) is not None,
                    f"{key}.local.{name}: must be set when {key}.source is 'local'",
                )


@dataclass(frozen=True)
class ConvertParams:
    """How faces are cropped from the original images into Parquet."""

    bbox: Literal["landmarks", "landmarks_ceil", "rect"]
    padding: float
    context: float
    crop_size: int
    jpeg_quality: int
    val_fraction: float
    seed: int
    max_outside: float
    on_error: Literal["fail", "skip"]
    workers: int

    def validate(self, key: str) -> None:
        _require(self.padding >= 1.0, f"{key}.padding: must be >= 1")
        _require(self.context >= 1.0, f"{key}.context: must be >= 1")
        _require(16 <= self.crop_size <= 2048, f"{key}.crop_size: must be in [16, 2048]")
        _require(1 <= self.jpeg_quality <= 100, f"{key}.jpeg_quality: must be in [1, 100]")
        _require(0.0 <= self.val_fraction < 1.0, f"{key}.val_fraction: must be in [0, 1)")
        _require(self.max_outside >= 0.0, f"{key}.max_outside: must be >= 0")
        _non_negative(self, key, "seed")
        _require(self.workers >= 0, f"{key}.workers: must be >= 0 (0 = all cores)")


@dataclass(frozen=True)
class ModelParams:
    """DeepPose: a torchvision ResNet, global average pooling, Linear(98 x 2)."""

    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101"]
    pretrained: str
    input_size: int
    head_init: Literal["mean_shape", "normal"]
    zero_init_residual: bool

    def validate(self, key: str) -> None:
        _require(32 <= self.input_size <= 1024, f"{key}.input_size: must be in [32, 1024]")
        _require(
            self.pretrained != "imagenet",
            f"{key}.pretrained: say which ImageNet weights, imagenet_v1 (MMPose's reference) or imagenet_v2",
        )
        _require(
            self.pretrained != "imagenet_v2" or self.arch in ("resnet50", "resnet101"),
            f"{key}.pretrained: torchvision has imagenet_v2 weights for resnet50 and resnet101 only; found "
            f"{self.arch}",
        )


@dataclass(frozen=True)
class WingParams:
    omega: float
    epsilon: float

    def validate(self, key: str) -> None:
        _positive(self, key, "omega", "epsilon")


@dataclass(frozen=True)
class SoftWingParams:
    omega1: float
    omega2: float
    epsilon: float

    def validate(self, key: str) -> None:
        _positive(self, key, "omega1", "omega2", "epsilon")


@dataclass(frozen=True)
class LossParams:
    """The regression loss; `units: normalized` is the reference (MMPose), `pixels` the Wing paper."""

    name: Literal["wing", "softwing", "l1", "smoothl1"]
    units: Literal["normalized", "pixels"]
    wing: WingParams
    softwing: SoftWingParams
    smoothl1_beta: float
    outside_points: Literal["count", "ignore"]

    def validate(self, key: str) -> None:
        _positive(self, key, "smoothl1_beta")


@dataclass(frozen=True)
class AugmentParams:
    """Random flip, scale, rotation and shift, drawn as MMPose 1.x's RandomBBoxTransform does."""

    flip_prob: float
    scale_min: float
    scale_max: float
    rotation_deg: float
    rotation_prob: float
    shift_frac: float
    shift_prob: float

    def validate(self, key: str) -> None:
        for name in ("flip_prob", "rotation_prob", "shift_prob"):
            _require(0.0 <= getattr(self, name) <= 1.0, f"{key}.{name}: must be in [0, 1]")
        _require(0 < self.scale_min <= self.scale_max, f"{key}: need 0 < scale_min <= scale_max")
        _require(0 <= self.rotation_deg <= 180, f"{key}.rotation_deg: must be in [0, 180]")
        _require(0 <= self.shift_frac < 1, f"{key}.shift_frac: must be in [0, 1)")


@dataclass(frozen=True)
class TrainParams:
    """Optimiser, schedule, devices and checkpoints of the train stage."""

    epochs: int
    batch_size: int
    drop_last: bool
    lr: float
    weight_decay: float
    warmup_iters: int
    warmup_ratio: float
    schedule: Literal["step", "cosine"]
    milestones: tuple[int, ...]
    gamma: float
    device: Literal["auto", "cuda", "mps", "cpu"]
    precision: Literal["auto", "bf16", "fp32"]
    channels_last: bool
    compile: bool
    compile_cache: str | None
    seed: int
    resume: Literal["auto", "never"]
    checkpoint_interval_s: float
    threads: int

    def validate(self, key: str) -> None:
        _require(self.epochs >= 1, f"{key}.epochs: must be >= 1")
        _require(self.batch_size >= 1, f"{key}.batch_size: must be >= 1")
        _require(self.lr > 0, f"{key}.lr: must be > 0")
        _non_negative(self, key, "weight_decay", "warmup_iters", "seed")
        _require(0 < self.warmup_ratio <= 1, f"{key}.warmup_ratio: must be in (0, 1]")
        increasing = all(a < b for a, b in zip(self.milestones, self.milestones[1:], strict=False))
        _require(
            increasing and all(m >= 1 for m in self.milestones),
            f"{key}.milestones: must be epochs >= 1, strictly increasing; found {list(self.milestones)}",
        )
        _require(0 < self.gamma <= 1, f"{key}.gamma: must be in (0, 1]; found {self.gamma}")
        _require(self.threads >= 0, f"{key}.threads: must be >= 0 (0 = torch's default)")
        _require(self.checkpoint_interval_s >= 0, f"{key}.checkpoint_interval_s: must be >= 0")
        _require(
            self.compile_cache is None or self.compile_cache.strip() != "",
            f"{key}.compile_cache: must be a folder or null (torch's default location)",
        )


@dataclass(frozen=True)
class EvaluateParams:
    """How the trained model is evaluated on the test split (and val, when there is one)."""

    flip_test: bool
    batch_size: int
    device: Literal["auto", "cuda", "mps", "cpu"]
    precision: Literal["auto", "bf16", "fp32"]
    failure_threshold: float
    grid_faces: int

    def validate(self, key: str) -> None:
        _require(self.batch_size >= 1, f"{key}.batch_size: must be >= 1")
        _require(0 < self.failure_threshold <= 1, f"{key}.failure_threshold: must be in (0, 1]")
        _require(self.grid_faces >= 1, f"{key}.grid_faces: must be >= 1")


@dataclass(frozen=True)
class TrackingParams:
    """MLflow: where runs go, and how hard live logging tries before it warns and goes on."""

    enabled: bool
    uri: str | None
    experiment: str
    retries: int
    timeout_s: float

    def validate(self, key: str) -> None:
        _require(self.experiment.strip() != "", f"{key}.experiment: must not be empty")
        _require(self.retries >= 1, f"{key}.retries: must be >= 1")
        _require(self.timeout_s > 0, f"{key}.timeout_s: must be > 0")


@dataclass(frozen=True)
class RegistryParams:
    """The registered model, and the gate `wflw promote` applies before moving alias `champion`."""

    model_name: str
    max_subset_regression: float
    require_significant: bool
    bootstrap_samples: int
    confidence: float
    seed: int
    lock_lease_s: float

    def validate(self, key: str) -> None:
        _require(self.model_name.strip() != "", f"{key}.model_name: must not be empty")
        _require(self.max_subset_regression >= 0, f"{key}.max_subset_regression: must be >= 0")
        _require(self.bootstrap_samples >= 100, f"{key}.bootstrap_samples: must be >= 100")
        _require(0.5 <= self.confidence < 1, f"{key}.confidence: must be in [0.5, 1)")
        _non_negative(self, key, "seed")
        _positive(self, key, "lock_lease_s")


@dataclass(frozen=True)
class PredictParams:
    """`wflw predict` on a user's own photos: the face detector, the crop refinement, batches, drawing."""

    upsample: int
    detect_max_side: int
    min_score: float
    refine: int
    batch_size: int
    device: Literal["auto", "cuda", "mps", "cpu"]
    overlay_max_side: int

    def validate(self, key: str) -> None:
        _require(0 <= self.upsample <= 3, f"{key}.upsample: must be in [0, 3]")
        _require(self.detect_max_side >= 64, f"{key}.detect_max_side: must be >= 64")
        _require(0 <= self.refine <= 10, f"{key}.refine: must be in [0, 10]")
        _require(self.batch_size >= 1, f"{key}.batch_size: must be >= 1")
        _require(self.overlay_max_side >= 64, f"{key}.overlay_max_side: must be >= 64")


@dataclass(frozen=True)
class Params:
    """Everything params.yaml holds; each stage reads its own sections."""

    data: DataParams
    convert: ConvertParams
    model: ModelParams
    loss: LossParams
    augment: AugmentParams
    train: TrainParams
    evaluate: EvaluateParams
    tracking: TrackingParams
    registry: RegistryParams
    predict: PredictParams

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Params:
        """Rebuild params saved with `to_dict` (e.g. in a checkpoint); as strict as `load_params`."""
        return _build(cls, data, "")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ParamsError(message)


def _positive(section: Any, key: str, *names: str) -> None:
    """Each of `names` of `section` > 0, else a ParamsError naming the key and the value found."""
    for name in names:
        value = getattr(section, name)
        _require(value > 0, f"{key}.{name}: must be > 0; found {value}")


def _non_negative(section: Any, key: str, *names: str) -> None:
    """Each of `names` of `section` >= 0, else a ParamsError naming the key and the value found."""
    for name in names:
        value = getattr(section, name)
        _require(value >= 0, f"{key}.{name}: must be >= 0; found {value}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type hint `hint`, building nested dataclasses."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, found {value!r}")
        return _build(hint, value, key)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ParamsError(f"{key}: must be one of {', '.join(map(str, choices))}; found {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{key}: expected a list, found {value!r}")
        return tuple(_coerce(item, inner, f"{key}[{i}]") for i, item in enumerate(value))
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ParamsError(f"{key}: must be a finite number; found {value}")
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ParamsError(f"{key}: expected {hint.__name__}, found {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build `cls` from `data`: every field must be present (no defaults), no other key may be."""
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ParamsError(f"{where}: unknown key (known: {', '.join(sorted(fields))})")
    missing = [f"{prefix}.{name}" if prefix else name for name in fields if name not in data]
    if missing:
        also = f"; also missing: {', '.join(missing[1:])}" if len(missing) > 1 else ""
        raise ParamsError(f"{missing[0]}: missing key (every key must be set; see params.yaml){also}")
    kwargs = {}
    for name in fields:
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(data[name], hints[name], key)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(prefix)
    return obj


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ParamsError(f"override {override!r}: expected dotted.key=value")
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ParamsError(f"override {override!r}: {'.'.join(parents[: i + 1])} is not a mapping")
        node = child
    node[leaf] = yaml.safe_load(raw) if raw else None


def add_params_options(parser: argparse.ArgumentParser, default: str = "params.yaml") -> None:
    """--params (the file, `default` unless given) and --set, which every command takes."""
    parser.add_argument("--params", default=default, help="params file (default: %(default)s)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one param, e.g. --set convert.crop_size=256 (repeatable; value parsed as YAML)",
    )


def load_params(path: str | Path = "params.yaml", overrides: typing.Sequence[str] = ()) -> Params:
    """Read a params file, apply overrides and return the validated, typed params."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    for override in overrides:
        apply_override(data, override)
    try:
        return _build(Params, data, "")
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
