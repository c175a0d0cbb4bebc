from urllib.error import URLError

import pytest
import torch
import torchvision

from wflw_pipeline import model as model_module
from wflw_pipeline.model import DeepPose, ModelError, build_model


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
        build_model("resnet18", "imagenet")
    assert "state_dict" in str(info.value) and "pretrained" in str(info.value)


def test_imagenet_uses_the_torchvision_weights(monkeypatch, resnet18_file):
    _, reference = resnet18_file
    requested = []

    def cached(weights, **kwargs):
        requested.append(weights)
        return reference

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", cached)
    backbone = build_model("resnet18", "imagenet").backbone
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    assert torch.equal(backbone.conv1.weight, reference["conv1.weight"])


def test_unknown_arch_lists_the_choices():
    with pytest.raises(ModelError, match="resnet18, resnet34, resnet50, resnet101"):
        build_model("vgg16", "none")
    assert set(model_module.ARCHITECTURES) == {"resnet18", "resnet34", "resnet50", "resnet101"}
