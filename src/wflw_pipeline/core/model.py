"""DeepPose: a torchvision ResNet backbone, global average pooling, one linear layer to 98 x 2 coordinates."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models import WeightsEnum

from ..data import wflw
from ..errors import PipelineError
from ..fileio import atomic_path
from .geometry import CropRule, View
from .runtime import Precision

ARCHITECTURES: dict[str, Callable[..., models.ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
    "resnet101": models.resnet101,
}
"""arch -> its torchvision constructor."""
IMAGENET_WEIGHTS: dict[str, dict[str, WeightsEnum]] = {
    "imagenet_v1": {
        "resnet18": models.ResNet18_Weights.IMAGENET1K_V1,
        "resnet34": models.ResNet34_Weights.IMAGENET1K_V1,
        "resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
        "resnet101": models.ResNet101_Weights.IMAGENET1K_V1,
    },
    "imagenet_v2": {
        "resnet50": models.ResNet50_Weights.IMAGENET1K_V2,
        "resnet101": models.ResNet101_Weights.IMAGENET1K_V2,
    },
}
"""`model.pretrained` -> arch -> torchvision's ImageNet weights. MMPose's `torchvision://resnet50` is V1."""
HEAD_INIT_STD = 0.01
"""`head_init: normal`: MMPose's RegressionHead draws the Linear weights from Normal(0, 0.01), bias 0."""


@dataclass(frozen=True)
class Normalize:
    """RGB mean and std in 0-255 units: the network sees (pixel - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


IMAGENET = Normalize(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
"""The statistics of the ImageNet weights' training images: what train normalises with."""


class ModelError(PipelineError):
    """An unknown architecture, or backbone weights that cannot be obtained or do not fit."""


class DeepPose(nn.Module):
    """ResNet without its fc -> global average pooling -> Linear(features, 98 * 2).

    The output is (B, 98, 2): x then y of each point, normalised to the network input ([0, 1] spans
    its width and height). With `head_init="mean_shape"` the head starts with zero weights and
    `mean_shape` (default: every point at 0.5, the input centre) as bias, so the first prediction is the
    mean shape for any image; with `"normal"` as MMPose's RegressionHead (weights Normal(0, 0.01), bias 0:
    first predictions near the input's top-left corner). `zero_init_residual` starts each residual
    block's last BatchNorm at zero, as MMPose's ResNet does.

    The head always runs in fp32, under autocast too: bf16 keeps 8 significant bits, so an output in
    [0.5, 1) would move in steps of 1/256 of the input, a whole pixel at 256 px.
    """

    def __init__(
        self,
        arch: str,
        mean_shape: Tensor | None = None,
        head_init: str = "mean_shape",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = _resnet(arch, zero_init_residual)
        features = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        self.head = nn.Linear(features, wflw.NUM_POINTS * 2)
        _init_head(self.head, head_init, mean_shape)

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        with torch.autocast(x.device.type, enabled=False):
            points = self.head(features.float())
        return points.view(-1, wflw.NUM_POINTS, 2)


def _resnet(arch: str, zero_init_residual: bool) -> models.ResNet:
    if arch not in ARCHITECTURES:
        raise ModelError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](weights=None, zero_init_residual=zero_init_residual)


def _init_head(head: nn.Linear, how: str, mean_shape: Tensor | None) -> None:
    if how == "normal":
        nn.init.normal_(head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(head.bias)
    elif how == "mean_shape":
        nn.init.zeros_(head.weight)
        with torch.no_grad():
            head.bias.copy_(_initial_bias(mean_shape))
    else:
        raise ModelError(f"unknown head_init {how!r}: choose mean_shape or normal")


def _initial_bias(mean_shape: Tensor | None) -> Tensor:
    if mean_shape is None:
        return torch.full((wflw.NUM_POINTS * 2,), 0.5)
    if tuple(mean_shape.shape) != (wflw.NUM_POINTS, 2):
        raise ModelError(f"mean_shape must have shape ({wflw.NUM_POINTS}, 2), got {tuple(mean_shape.shape)}")
    return mean_shape.detach().float().reshape(-1)


def build_model(
    arch: str,
    pretrained: str,
    mean_shape: Tensor | None = None,
    head_init: str = "mean_shape",
    zero_init_residual: bool = False,
) -> DeepPose:
    """DeepPose with backbone weights from `pretrained`: `none`, `imagenet_v1`, `imagenet_v2`
    (IMAGENET_WEIGHTS), or a state_dict file path.

    A file must hold a torchvision ResNet state_dict of the same arch (`conv1.weight`, `layer1.0...`);
    its `fc.*` entries are ignored.
    """
    model = DeepPose(arch, mean_shape, head_init, zero_init_residual)
    if pretrained in IMAGENET_WEIGHTS:
        weights = imagenet_weights(arch, pretrained)
        _load_backbone(model, _imagenet_state_dict(arch, weights), f"ImageNet weights {weights} for {arch}")
    elif pretrained != "none":
        _load_backbone(model, _file_state_dict(Path(pretrained)), pretrained)
    return model


def imagenet_weights(arch: str, pretrained: str) -> WeightsEnum:
    """torchvision's weights that `pretrained` (imagenet_v1 | imagenet_v2) names for `arch`."""
    found = IMAGENET_WEIGHTS[pretrained].get(arch)
    if found is None:
        have = ", ".join(IMAGENET_WEIGHTS[pretrained])
        raise ModelError(f"torchvision has no {pretrained} weights for {arch} (only for {have})")
    return found


def _imagenet_state_dict(arch: str, weights: WeightsEnum) -> Mapping[str, Tensor]:
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except OSError as err:
        raise ModelError(
            f"could not download the ImageNet weights {weights} for {arch} ({err}): this machine is "
            f"probably offline. Either download them where there is internet (torchvision caches them "
            f"under {torch.hub.get_dir()}/checkpoints) or save a torchvision {arch} state_dict with "
            f"`torch.save(torchvision.models.{arch}(weights=...).state_dict(), PATH)` and set "
            "pretrained to PATH."
        ) from err


def _load_mapping(path: Path, what: str, error: type[ModelError]) -> Mapping:
    """torch.load a dict-like file safely (`weights_only`), or raise `error` naming the path."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a file that is not a checkpoint
        raise error(f"{path}: cannot read {what}: {_unreadable(err)}") from None
    if not isinstance(state, Mapping):
        raise error(f"{path}: holds a {type(state).__name__}, not {what}")
    return state


def _unreadable(err: Exception) -> str:
    """Why torch.load refused a file, in one line and without PyTorch's advice to load it unsafely."""
    if "Unsupported global" in str(err):
        return "it holds Python objects beyond tensors and plain containers, which are never unpickled"
    return f"not a PyTorch file, or a damaged one ({type(err).__name__})"


def _file_state_dict(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise ModelError(f"pretrained {str(path)!r}: not 'none', 'imagenet' or an existing state_dict file")
    return _load_mapping(path, "a state_dict", ModelError)


def _load_backbone(model: DeepPose, state: Mapping[str, Tensor], source: str) -> None:
    """Load a torchvision ResNet state_dict (`fc.*` ignored) into the backbone, or say what does not fit."""
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    expected = model.backbone.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    for problem, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shapes", mismatched)):
        if keys:
            raise ModelError(
                f"{source}: not a torchvision {model.arch} state_dict: {len(keys)} {problem}: {keys[:5]}"
            )
    model.backbone.load_state_dict(state)


class CheckpointError(ModelError):
    """A trained-model file that is missing, unreadable or not what `wflw train` writes."""


MODEL_FORMAT_VERSION = 2
TRAINED_KEYS = (
    "format_version", "model", "arch", "view", "face_box", "normalize", "landmarks", "mean_shape", "data",
    "epoch", "params",
)  # fmt: skip
VIEW_KEYS = ("crop_size", "context", "input_size")
LANDMARKS = {
    "points": wflw.NUM_POINTS,
    "layout": "WFLW 98-point",
    "output": "(N, 98, 2) x then y, normalised to the network input: [0, 1] spans its width and height",
    "pixels": "continuous: pixel i covers [i, i + 1), an image of side n spans [0, n]",
}
"""How to read the model's output (stored in model.pt, so a user needs no checkout to interpret it)."""


@dataclass(frozen=True)
class TrainedModel:
    """A model.pt of `wflw train`: the network, in eval mode, and everything needed to feed it a face."""

    model: DeepPose
    arch: str
    view: View
    crop: CropRule
    normalize: Normalize
    mean_shape: Tensor
    """(98, 2), normalised to the network input: the mean training shape, the head's initial bias."""
    data: dict[str, Any]
    """The training data's identity: source, archive SHA-256s, crop parameters (the Parquet metadata)."""
    epoch: int
    params: dict[str, Any]
    """The resolved params of the training run."""
    channels_last: bool
    """The memory format it was trained in (train.channels_last) and is loaded in."""

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device


def save_trained(
    path: Path,
    weights: Mapping[str, Tensor],
    *,
    arch: str,
    view: View,
    face_box: dict[str, Any],
    normalize: Normalize,
    mean_shape: Tensor,
    data: dict[str, Any],
    epoch: int,
    params: dict[str, Any],
) -> None:
    """Write model.pt: the weights and everything inference needs to reproduce crop and normalisation.

    `face_box`: bbox rule and padding; `data`: source, archive SHA-256s and crop parameters of the
    training data. `load_trained` reads it back.
    """
    state = {
        "format_version": MODEL_FORMAT_VERSION,
        "model": dict(weights),
        "arch": arch,
        "view": {key: getattr(view, key) for key in VIEW_KEYS},
        "face_box": face_box,
        "normalize": {"mean": list(normalize.mean), "std": list(normalize.std)},
        "landmarks": LANDMARKS,
        "mean_shape": mean_shape,
        "data": data,
        "epoch": epoch,
        "params": params,
    }
    save_atomic(state, path)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` atomically, byte-for-byte the same for the same `obj`.

    Saved through a file object: torch.save to a path names the zip's inner folder after the file, here
    a random temporary name, so equal weights would give different bytes (and DVC would see a change).
    """
    with atomic_path(path) as temp, open(temp, "wb") as file:
        torch.save(obj, file)


def load_trained(path: Path, device: torch.device | str = "cpu") -> TrainedModel:
    """The model `wflw train` saved (data/model/model.pt), in eval mode on `device` in the memory format it
    was trained in. Read with `weights_only=True` (no code runs from the file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: trained model not found (run `wflw train` first)")
    state = _load_mapping(path, "a trained model", CheckpointError)
    missing = [key for key in TRAINED_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not a model written by this version of `wflw train` (lacks {missing})"
        )
    if state["format_version"] != MODEL_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: model format {state['format_version']!r}, this version reads {MODEL_FORMAT_VERSION}"
        )
    view = state["view"]
    if not isinstance(view, Mapping) or any(key not in view for key in VIEW_KEYS):
        raise CheckpointError(f"{path}: `view` must hold {VIEW_KEYS}, found {view!r}")
    try:
        model = DeepPose(str(state["arch"]))
        model.load_state_dict(state["model"])
    except ModelError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: weights do not fit DeepPose {state['arch']} ({err})") from None
    trained = _trained(path, state, model)
    model.to(device=device, memory_format=Precision(None, trained.channels_last).memory_format())
    return trained


def _trained(path: Path, state: Mapping[str, Any], model: DeepPose) -> TrainedModel:
    """The typed fields of a model.pt's `state`, or CheckpointError naming the one that does not fit."""
    view = state["view"]
    try:
        trained_view = View(int(view["crop_size"]), float(view["context"]), int(view["input_size"]))
        box, normalize = state["face_box"], state["normalize"]
        trained = TrainedModel(
            model=model.eval(),
            arch=str(state["arch"]),
            view=trained_view,
            crop=CropRule(
                str(box["bbox"]), float(box["padding"]), trained_view.context, trained_view.crop_size
            ),
            normalize=Normalize(tuple(map(float, normalize["mean"])), tuple(map(float, normalize["std"]))),
            mean_shape=state["mean_shape"],
            data=dict(state["data"]),
            epoch=int(state["epoch"]),
            params=dict(state["params"]),
            channels_last=bool(state["params"]["train"]["channels_last"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: malformed model file ({type(err).__name__}: {err})") from None
    return trained
