"""params.yaml is the one source of defaults: every key must be set, in every params file and config."""

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import PARAMS_YAML, default_params
from paths import ROOT

from wflw_pipeline import cli
from wflw_pipeline.params import Params, ParamsError, load_params

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _keys(node: dict[str, Any], prefix: str = "", *, leaves: bool = True) -> list[str]:
    """Dotted keys of a YAML mapping: its leaves (leaves=True) or the mappings themselves (False)."""
    keys = []
    for name, value in node.items():
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, dict):
            keys += [] if leaves else [key]
            keys += _keys(value, key, leaves=leaves)
        elif leaves:
            keys.append(key)
    return keys


def _yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _without(key: str) -> dict[str, Any]:
    """params.yaml as a dict, with the dotted `key` deleted."""
    data = _yaml(PARAMS_YAML)
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node[part]
    del node[leaf]
    return data


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


LEAF_KEYS = _keys(_yaml(PARAMS_YAML))
SECTION_KEYS = _keys(_yaml(PARAMS_YAML), leaves=False)


def test_the_key_walk_sees_every_section_and_nested_leaves():
    assert {"data", "data.synthetic", "loss.wing", "train", "evaluate"} <= set(SECTION_KEYS)
    assert {"train.epochs", "loss.wing.omega", "data.wflw.images_sha256", "train.milestones"} <= set(
        LEAF_KEYS
    )
    assert len(LEAF_KEYS) > 60


def test_repository_params_load():
    params = load_params(PARAMS_YAML)
    assert params.data.source == "synthetic"
    assert params.convert.bbox == "landmarks"
    assert params.train.epochs == 20
    assert params == default_params()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_every_config_loads_and_validates(config):
    params = load_params(config)
    assert isinstance(params, Params)
    assert Params.from_dict(params.to_dict()) == params


def test_there_is_a_config():
    assert CONFIGS, "configs/*.yaml: no config found"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_every_config_has_exactly_the_keys_of_params_yaml(config):
    assert sorted(_keys(_yaml(config))) == sorted(LEAF_KEYS)
    assert sorted(_keys(_yaml(config), leaves=False)) == sorted(SECTION_KEYS)


@pytest.mark.parametrize("key", LEAF_KEYS)
def test_a_missing_key_is_an_error_naming_the_key_and_the_file(tmp_path, key):
    path = _write(tmp_path / "missing.yaml", _without(key))
    with pytest.raises(ParamsError) as error:
        load_params(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {key}: missing key"), message
    assert "see params.yaml" in message


@pytest.mark.parametrize("key", SECTION_KEYS)
def test_a_missing_section_is_an_error_naming_the_section(tmp_path, key):
    path = _write(tmp_path / "missing.yaml", _without(key))
    with pytest.raises(ParamsError, match=rf"^{re.escape(f'{path}: {key}')}: missing key"):
        load_params(path)


def test_every_missing_key_of_a_section_is_named(tmp_path):
    data = _yaml(PARAMS_YAML)
    data["evaluate"] = {"flip_test": True, "batch_size": 8}
    path = _write(tmp_path / "p.yaml", data)
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(error.value) == (
        f"{path}: evaluate.device: missing key (every key must be set; see params.yaml); also missing: "
        "evaluate.precision, evaluate.failure_threshold, evaluate.grid_faces"
    )


def test_params_rebuilt_from_a_checkpoint_must_have_every_key():
    saved = default_params().to_dict()
    assert Params.from_dict(saved) == default_params()
    del saved["train"]["epochs"]
    with pytest.raises(ParamsError, match=r"^train\.epochs: missing key"):
        Params.from_dict(saved)


def test_values_are_read_from_the_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        """
data:
  source: wflw
  synthetic: {seed: 3, train_faces: 11, test_faces: 7, min_image_size: 64, max_image_size: 80, workers: 2}
  wflw: {images_url: http://a/i.tgz, annotations_url: http://a/a.tgz, images_sha256: null,
         annotations_sha256: null, cache_dir: cache, retries: 1, timeout_s: 3}
  local: {images_archive: i.tgz, annotations_archive: null, images_sha256: null, annotations_sha256: null}
convert: {bbox: landmarks_ceil, padding: 1.5, context: 2, crop_size: 40, jpeg_quality: 80, val_fraction: 0.25,
          seed: 9, max_outside: 0.1, on_error: skip, workers: 3}
model: {arch: resnet34, pretrained: none, input_size: 48, head_init: normal, zero_init_residual: true}
loss: {name: softwing, units: pixels, wing: {omega: 1.0, epsilon: 0.5},
       softwing: {omega1: 1.0, omega2: 5.0, epsilon: 0.25}, smoothl1_beta: 0.5, outside_points: ignore}
augment: {flip_prob: 0.1, scale_min: 0.9, scale_max: 1.1, rotation_deg: 30, rotation_prob: 0.2,
          shift_frac: 0.05, shift_prob: 0.4}
train: {epochs: 7, batch_size: 5, drop_last: false, lr: 0.01, weight_decay: 0.0001, warmup_iters: 3,
        warmup_ratio: 0.5, schedule: cosine, milestones: [2, 4], gamma: 0.5, device: cpu, precision: fp32,
        channels_last: false, compile: true, compile_cache: /c, seed: 4, resume: never,
        checkpoint_interval_s: 30, threads: 2}
evaluate: {flip_test: false, batch_size: 6, device: cpu, precision: bf16, failure_threshold: 0.08,
           grid_faces: 3}
tracking: {enabled: false, uri: "http://127.0.0.1:9", experiment: e, retries: 2, timeout_s: 4}
registry: {model_name: m, max_subset_regression: 0.5, require_significant: false, bootstrap_samples: 200,
           confidence: 0.9, seed: 3, lock_lease_s: 30}
predict: {upsample: 0, detect_max_side: 640, min_score: 0.5, refine: 2, batch_size: 4, device: cpu,
          overlay_max_side: 512}
"""
    )
    params = load_params(path)
    assert params.data.source == "wflw" and params.data.synthetic.train_faces == 11
    assert params.data.wflw.timeout_s == 3.0 and isinstance(params.data.wflw.timeout_s, float)
    assert params.data.local.images_archive == "i.tgz" and params.data.local.annotations_archive is None
    assert (params.convert.bbox, params.convert.crop_size, params.convert.on_error) == (
        "landmarks_ceil",
        40,
        "skip",
    )
    assert params.convert.context == 2.0 and isinstance(params.convert.context, float)
    assert (params.model.arch, params.model.input_size) == ("resnet34", 48)
    assert (params.loss.name, params.loss.units, params.loss.softwing.omega2) == ("softwing", "pixels", 5.0)
    assert params.augment.rotation_deg == 30.0 and params.augment.shift_prob == 0.4
    assert params.train.epochs == 7 and params.train.milestones == (2, 4) and params.train.drop_last is False
    assert (params.train.schedule, params.train.resume, params.train.compile) == ("cosine", "never", True)
    assert params.train.compile_cache == "/c"
    assert params.evaluate.flip_test is False and params.evaluate.precision == "bf16"
    assert params.evaluate.failure_threshold == 0.08
    assert (params.tracking.enabled, params.tracking.uri, params.tracking.timeout_s) == (
        False,
        "http://127.0.0.1:9",
        4.0,
    )
    assert (params.registry.model_name, params.registry.require_significant) == ("m", False)
    assert (params.registry.bootstrap_samples, params.registry.confidence) == (200, 0.9)
    assert params.registry.lock_lease_s == 30
    assert (params.model.head_init, params.model.zero_init_residual, params.loss.outside_points) == (
        "normal",
        True,
        "ignore",
    )
    assert (params.predict.upsample, params.predict.detect_max_side, params.predict.refine) == (0, 640, 2)
    assert (params.predict.min_score, params.predict.batch_size, params.predict.device) == (0.5, 4, "cpu")


def test_overrides_are_parsed_as_yaml_and_typed():
    params = load_params(
        PARAMS_YAML, ["convert.crop_size=128", "convert.padding=1", "data.local.images_archive=x.tgz"]
    )
    assert params.convert.crop_size == 128
    assert params.convert.padding == 1.0 and isinstance(params.convert.padding, float)
    assert params.data.local.images_archive == "x.tgz"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("convert.crop_sise=3", r"convert.crop_sise: unknown key"),
        ("nonsense_section.key=1", r"nonsense_section: unknown key"),
        ("convert.crop_size=big", r"convert.crop_size: expected int, found 'big'"),
        ("convert.bbox=face", r"convert.bbox: must be one of landmarks, landmarks_ceil, rect; found 'face'"),
        ("convert.padding=0.5", r"convert.padding: must be >= 1"),
        ("data.source=local", r"data.local.images_archive: must be set when data.source is 'local'"),
        ("data.wflw.images_sha256=abc", r"data.wflw.images_sha256: must be 64 lowercase hex"),
        ("convert.on_error=true", r"convert.on_error: must be one of fail, skip"),
        ("nonsense", r"expected dotted.key=value"),
    ],
)
def test_bad_params_name_the_key(override, message):
    with pytest.raises(ParamsError, match=message):
        load_params(PARAMS_YAML, [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.wing.epsilon=0", "loss.wing.epsilon: must be > 0; found 0.0"),
        ("loss.wing.omega=-1", "loss.wing.omega: must be > 0; found -1.0"),
        ("loss.softwing.omega1=0", "loss.softwing.omega1: must be > 0; found 0.0"),
        ("loss.softwing.omega2=-2", "loss.softwing.omega2: must be > 0; found -2.0"),
        ("loss.softwing.epsilon=0", "loss.softwing.epsilon: must be > 0; found 0.0"),
        ("loss.smoothl1_beta=0", "loss.smoothl1_beta: must be > 0; found 0.0"),
        ("train.weight_decay=-1", "train.weight_decay: must be >= 0; found -1.0"),
        ("train.gamma=0", "train.gamma: must be in (0, 1]; found 0.0"),
        ("train.gamma=-0.1", "train.gamma: must be in (0, 1]; found -0.1"),
        ("train.gamma=2", "train.gamma: must be in (0, 1]; found 2.0"),
        (
            "train.milestones=[-3, 5]",
            "train.milestones: must be epochs >= 1, strictly increasing; found [-3, 5]",
        ),
        ("train.milestones=[0]", "train.milestones: must be epochs >= 1, strictly increasing; found [0]"),
        (
            "train.milestones=[15, 10]",
            "train.milestones: must be epochs >= 1, strictly increasing; found [15, 10]",
        ),
        (
            "train.milestones=[10, 10]",
            "train.milestones: must be epochs >= 1, strictly increasing; found [10, 10]",
        ),
        ("train.lr=.inf", "train.lr: must be a finite number; found inf"),
        ("train.lr=.nan", "train.lr: must be a finite number; found nan"),
        ("augment.scale_max=.inf", "augment.scale_max: must be a finite number; found inf"),
        ("train.seed=-1", "train.seed: must be >= 0; found -1"),
        ("convert.seed=-1", "convert.seed: must be >= 0; found -1"),
        ("data.synthetic.seed=-1", "data.synthetic.seed: must be >= 0; found -1"),
        ("registry.seed=-1", "registry.seed: must be >= 0; found -1"),
        ("registry.lock_lease_s=0", "registry.lock_lease_s: must be > 0; found 0"),
    ],
)
def test_numeric_params_out_of_range_are_refused_at_load_with_the_range(override, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        load_params(PARAMS_YAML, [override])


def test_a_bad_loss_param_fails_before_training_opens_an_mlflow_run(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--params", str(PARAMS_YAML), "--set", "loss.wing.epsilon=0"]
    with caplog.at_level(logging.ERROR):
        assert cli.main([*args, "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    assert "loss.wing.epsilon: must be > 0; found 0.0" in caplog.text
    assert list(tmp_path.iterdir()) == []  # no run opened, no store, no outputs


def test_an_unknown_key_in_the_file_is_an_error(tmp_path):
    data = _yaml(PARAMS_YAML)
    data["train"]["epoch"] = 5
    path = _write(tmp_path / "p.yaml", data)
    with pytest.raises(
        ParamsError, match=rf"^{re.escape(str(path))}: train\.epoch: unknown key \(known: .*epochs"
    ):
        load_params(path)


def test_missing_or_invalid_file_is_reported(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("convert: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_train_with_a_params_file_missing_a_key_exits_2_and_writes_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "missing.yaml", _without("train.epochs"))
    outputs = ["--parquet", "parquet", "--model-dir", "model", "--train-dir", "train"]
    with caplog.at_level(logging.ERROR, logger="wflw_pipeline"):
        code = cli.main(["train", "--params", str(path), *outputs])
    assert code == 2
    assert f"{path}: train.epochs: missing key" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["missing.yaml"]


def test_every_config_sets_the_compile_cache_and_an_empty_one_is_refused(tmp_path):
    for path in [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]:
        assert load_params(path).train.compile_cache == "data/cache/compile", path
    key = "compile_cache: data/cache/compile"
    text = (ROOT / "params.yaml").read_text().replace(key, 'compile_cache: ""')
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=r"params.yaml: train.compile_cache: must be a folder or null"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.pretrained=imagenet"], "model.pretrained: say which ImageNet weights, imagenet_v1"),
        (
            ["model.pretrained=imagenet_v2", "model.arch=resnet18"],
            "model.pretrained: torchvision has imagenet_v2 weights for resnet50 and resnet101 only; found "
            "resnet18",
        ),
        (["model.head_init=zeros"], "model.head_init"),
        (["loss.outside_points=drop"], "loss.outside_points"),
        (["train.drop_last=sometimes"], "train.drop_last"),
        (["convert.bbox=landmarks_round"], "convert.bbox"),
    ],
)
def test_the_mmpose_choices_take_only_their_named_values(overrides, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        load_params(PARAMS_YAML, overrides)


def test_the_reference_config_takes_mmposes_value_for_each_named_choice():
    reference = load_params(ROOT / "configs" / "deeppose_res50_wingloss_wflw.yaml")
    assert (reference.model.pretrained, reference.model.head_init, reference.model.zero_init_residual) == (
        "imagenet_v1",
        "normal",
        True,
    )
    assert reference.loss.outside_points == "ignore"
    assert (reference.train.drop_last, reference.convert.bbox) == (False, "landmarks_ceil")


def test_the_tuned_config_is_the_reference_but_for_the_choices_the_ab_measured_better():
    reference = yaml.safe_load((ROOT / "configs" / "deeppose_res50_wingloss_wflw.yaml").read_text())
    tuned = yaml.safe_load((ROOT / "configs" / "deeppose_res50_wingloss_wflw_tuned.yaml").read_text())
    changed = {
        f"{section}.{key}": (value, tuned[section][key])
        for section, values in reference.items()
        for key, value in values.items()
        if tuned[section][key] != value
    }
    assert changed == {"model.head_init": ("normal", "mean_shape"), "train.drop_last": (False, True)}
    assert tuned.keys() == reference.keys()
