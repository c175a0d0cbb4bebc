from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from helpers import default_params

from wflw_pipeline.core import model as model_module
from wflw_pipeline.core.geometry import CropRule, View
from wflw_pipeline.core.model import (
    MODEL_FORMAT_VERSION,
    TRAINED_KEYS,
    CheckpointError,
    DeepPose,
    ModelError,
    Normalize,
    build_model,
    imagenet_weights,
    load_trained,
    save_trained,
)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    return path, reference.state_dict()


def test_forward_gives_98_points_starting_at_the_mean_shape():
    mean_shape = torch.rand(98, 2)
    net = build_model("resnet18", "none", mean_shape).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 98, 2)
    assert torch.allclose(out, mean_shape.expand(2, 98, 2))


def test_default_head_predicts_the_input_centre():
    head = DeepPose("resnet18").head
    assert torch.equal(head.bias, torch.full((196,), 0.5)) and not head.weight.any()


def test_mean_shape_of_wrong_shape_is_rejected():
    with pytest.raises(ModelError, match=r"\(98, 2\)"):
        DeepPose("resnet18", torch.zeros(68, 2))


def test_state_dict_file_round_trips_into_the_backbone(resnet18_file):
    path, reference = resnet18_file
    backbone = build_model("resnet18", str(path)).backbone.state_dict()
    assert not any(key.startswith("fc.") for key in backbone)
    assert backbone.keys() == {key for key in reference if not key.startswith("fc.")}
    for key, value in backbone.items():
        assert torch.equal(value, reference[key]), key


def test_state_dict_file_missing_keys_names_file_and_keys(tmp_path, resnet18_file):
    _, reference = resnet18_file
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in reference.items() if not k.startswith("conv1.")}, path)
    with pytest.raises(ModelError, match=r"partial\.pth.*missing keys.*conv1\.weight"):
        build_model("resnet18", str(path))


def test_state_dict_with_wrong_shapes_is_rejected(tmp_path, resnet18_file):
    _, reference = resnet18_file
    path = tmp_path / "other.pth"
    torch.save({**reference, "conv1.weight": torch.zeros(64, 1, 7, 7)}, path)
    with pytest.raises(ModelError, match=r"other\.pth.*shapes.*conv1\.weight"):
        build_model("resnet18", str(path))


def test_missing_or_unreadable_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match=r"nope\.pth"):
        build_model("resnet18", str(tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"garbage\.pth"):
        build_model("resnet18", str(garbage))


def test_imagenet_offline_explains_how_to_use_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(ModelError, match="offline") as info:
        build_model("resnet18", "imagenet_v1")
    assert "state_dict" in str(info.value) and "pretrained" in str(info.value)


def test_imagenet_uses_the_torchvision_weights(monkeypatch, resnet18_file):
    _, reference = resnet18_file
    requested = []

    def cached(weights, **kwargs):
        requested.append(weights)
        return reference

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", cached)
    backbone = build_model("resnet18", "imagenet_v1").backbone
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    assert torch.equal(backbone.conv1.weight, reference["conv1.weight"])


def test_unknown_arch_lists_the_choices():
    with pytest.raises(ModelError, match="resnet18, resnet34, resnet50, resnet101"):
        build_model("vgg16", "none")
    assert set(model_module.ARCHITECTURES) == {"resnet18", "resnet34", "resnet50", "resnet101"}


# ---------------------------------------------------------------- model.pt


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DeepPose]:
    """A model.pt written by save_trained with hand-picked fields, and the network it holds."""
    torch.manual_seed(0)
    network = DeepPose("resnet18", torch.full((98, 2), 0.25))
    path = tmp_path_factory.mktemp("trained") / "model.pt"
    params = default_params().to_dict()
    params["train"]["channels_last"] = False
    save_trained(
        path,
        network.state_dict(),
        arch="resnet18",
        view=View(64, 1.25, 48),
        face_box={"bbox": "rect", "padding": 1.1},
        normalize=Normalize((1.0, 2.0, 3.0), (4.0, 5.0, 6.0)),
        mean_shape=torch.full((98, 2), 0.25),
        data={"source": "synthetic", "crop": {"bbox": "rect", "padding": 1.1}},
        epoch=7,
        params=params,
    )
    return path, network


def test_load_trained_gives_every_field_typed(saved):
    path, network = saved
    trained = load_trained(path)
    assert trained.arch == "resnet18" and trained.epoch == 7
    assert trained.view == View(crop_size=64, context=1.25, input_size=48)
    assert trained.crop == CropRule(bbox="rect", padding=1.1, context=1.25, crop_size=64)
    assert trained.normalize == Normalize(mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0))
    assert torch.equal(trained.mean_shape, torch.full((98, 2), 0.25))
    assert trained.data == {"source": "synthetic", "crop": {"bbox": "rect", "padding": 1.1}}
    assert trained.params["train"]["channels_last"] is False and trained.channels_last is False
    assert not trained.model.training and trained.device == torch.device("cpu")
    assert all(torch.equal(network.state_dict()[k], v) for k, v in trained.model.state_dict().items())


def test_the_file_keeps_its_format(saved):
    state = torch.load(saved[0], weights_only=True)
    assert tuple(state) == TRAINED_KEYS and state["format_version"] == MODEL_FORMAT_VERSION == 2
    assert state["view"] == {"crop_size": 64, "context": 1.25, "input_size": 48}
    assert state["face_box"] == {"bbox": "rect", "padding": 1.1}
    assert state["normalize"] == {"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0]}


def test_the_model_is_loaded_in_the_memory_format_it_was_trained_in(saved, tmp_path):
    conv = "backbone.conv1.weight"
    assert load_trained(saved[0]).model.state_dict()[conv].is_contiguous()
    state = torch.load(saved[0], weights_only=True)
    state["params"]["train"]["channels_last"] = True
    torch.save(state, tmp_path / "model.pt")
    weight = load_trained(tmp_path / "model.pt").model.state_dict()[conv]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_missing_or_garbled_checkpoints_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere\.pt: trained model not found"):
        load_trained(tmp_path / "nowhere.pt")
    garbled = tmp_path / "garbled.pt"
    garbled.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbled\.pt: cannot read"):
        load_trained(garbled)
    partial = tmp_path / "partial.pt"
    torch.save({"model": {}, "arch": "resnet18"}, partial)
    with pytest.raises(
        CheckpointError, match=r"partial\.pt: not a model written by .* \(lacks \['format_version'"
    ):
        load_trained(partial)
    wrong = tmp_path / "wrong.pt"
    complete = {key: {} for key in TRAINED_KEYS} | {
        "format_version": MODEL_FORMAT_VERSION,
        "arch": "resnet18",
    }
    torch.save(complete | {"view": dict.fromkeys("abc")}, wrong)
    with pytest.raises(CheckpointError, match=r"wrong\.pt: `view` must hold"):
        load_trained(wrong)
    torch.save(complete | {"format_version": 1}, wrong)
    with pytest.raises(CheckpointError, match=r"wrong\.pt: model format 1, this version reads 2"):
        load_trained(wrong)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"PNG? no, just text\n", "not a PyTorch file, or a damaged one (UnpicklingError)"),
        (None, "it holds Python objects beyond tensors and plain containers, which are never unpickled"),
    ],
)
def test_a_file_that_is_no_model_is_refused_in_one_line_without_the_unsafe_advice(tmp_path, content, reason):
    path = tmp_path / "other.pt"
    if content is None:
        torch.save(torch.nn.Linear(2, 2), path)  # a whole module: loading it would run pickled code
    else:
        path.write_bytes(content)

    with pytest.raises(CheckpointError) as refused:
        load_trained(path)

    message = str(refused.value)
    assert message.startswith(f"{path}: cannot read a trained model: {reason}")
    assert "\n" not in message and "weights_only" not in message


def test_a_malformed_field_is_a_checkpoint_error(saved, tmp_path):
    state = torch.load(saved[0], weights_only=True)
    del state["normalize"]["std"]
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt: malformed model file \(KeyError: 'std'\)"):
        load_trained(tmp_path / "model.pt")


def test_the_head_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = build_model("resnet18", "none").eval()
    torch.nn.init.normal_(model.head.weight, std=0.05)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.backbone(x)
        out = model(x)
    assert features.dtype == torch.bfloat16  # the backbone does run in bf16
    assert out.dtype == torch.float32
    exact = (features.float() @ model.head.weight.T + model.head.bias).view(-1, 98, 2)
    assert torch.equal(out, exact)  # bf16 output would differ: its steps are 2^-8 in [0.5, 1)


def test_imagenet_v1_is_mmposes_resnet50_and_v2_the_newer_recipe():
    v1, v2 = imagenet_weights("resnet50", "imagenet_v1"), imagenet_weights("resnet50", "imagenet_v2")
    assert v1.url == "https://download.pytorch.org/models/resnet50-0676ba61.pth"  # mmengine torchvision_0.12
    assert v1.meta["_metrics"]["ImageNet-1K"]["acc@1"] == 76.13
    assert v2.meta["_metrics"]["ImageNet-1K"]["acc@1"] == 80.858
    with pytest.raises(ModelError, match=r"^torchvision has no imagenet_v2 weights for resnet18 \(only for "):
        imagenet_weights("resnet18", "imagenet_v2")


def test_the_normal_head_starts_as_mmposes_and_the_mean_shape_head_at_the_mean_shape():
    torch.manual_seed(0)
    normal = DeepPose("resnet18", head_init="normal").head.requires_grad_(False)
    assert torch.equal(normal.bias, torch.zeros(196))
    assert abs(float(normal.weight.mean())) < 1e-4 and 0.0098 < float(normal.weight.std()) < 0.0102
    shape = torch.rand(98, 2)
    mean = DeepPose("resnet18", shape).head
    assert torch.equal(mean.weight, torch.zeros_like(mean.weight)) and torch.equal(
        mean.bias, shape.reshape(-1)
    )
    with pytest.raises(ModelError, match="unknown head_init 'zeros'"):
        DeepPose("resnet18", head_init="zeros")


@pytest.mark.parametrize(("arch", "last_bn"), [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_starts_each_blocks_last_batchnorm_at_zero(arch, last_bn):
    def last_bn_weights(model: DeepPose) -> list[torch.Tensor]:
        layers = [model.backbone.layer1, model.backbone.layer2, model.backbone.layer3, model.backbone.layer4]
        return [getattr(block, last_bn).weight for layer in layers for block in layer]

    assert all(
        torch.equal(w, torch.zeros_like(w)) for w in last_bn_weights(DeepPose(arch, zero_init_residual=True))
    )
    assert all(torch.equal(w, torch.ones_like(w)) for w in last_bn_weights(DeepPose(arch)))
