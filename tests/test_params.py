from pathlib import Path

import pytest

from wflw_pipeline.params import Params, ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_load_and_match_the_dataclass_keys():
    params = load_params(ROOT / "params.yaml")
    assert params.data.source == "synthetic"
    assert params.convert.bbox == "landmarks"
    assert params.convert.padding == 1.25


def test_overrides_are_parsed_as_yaml_and_typed(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("convert:\n  crop_size: 96\n")
    params = load_params(
        path, ["convert.crop_size=128", "convert.padding=1", "data.local.images_archive=x.tgz"]
    )
    assert params.convert.crop_size == 128
    assert params.convert.padding == 1.0 and isinstance(params.convert.padding, float)
    assert params.data.local.images_archive == "x.tgz"


def test_missing_sections_take_dataclass_defaults(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("{}\n")
    assert load_params(path) == Params()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("convert.crop_sise=3", r"convert.crop_sise: unknown key"),
        ("convert.crop_size=big", r"convert.crop_size: expected int, found 'big'"),
        ("convert.bbox=face", r"convert.bbox: must be one of landmarks, rect; found 'face'"),
        ("convert.padding=0.5", r"convert.padding: must be >= 1"),
        ("data.source=local", r"data.local.images_archive: must be set when data.source is 'local'"),
        ("data.wflw.images_sha256=abc", r"data.wflw.images_sha256: must be 64 lowercase hex"),
        ("convert.on_error=true", r"convert.on_error: must be one of fail, skip"),
        ("nonsense", r"expected dotted.key=value"),
    ],
)
def test_bad_params_name_the_key(tmp_path, override, message):
    path = tmp_path / "p.yaml"
    path.write_text("{}\n")
    with pytest.raises(ParamsError, match=message):
        load_params(path, [override])


def test_missing_or_invalid_file_is_reported(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("convert: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
