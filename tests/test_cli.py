import json
import logging

import pytest
from paths import PARAMS_YAML

from wflw_pipeline import cli
from wflw_pipeline.errors import ERROR_FILE_ENV, EXIT_USER_ERROR
from wflw_pipeline.outputs import EVAL, MODEL, PARQUET, RAW, REGISTER, TRAIN

COMMANDS = (
    "fetch",
    "convert",
    "train",
    "evaluate",
    "preview",
    "register",
    "promote",
    "rollback",
    "models",
    "export",
)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_reads_a_params_file_and_set_overrides(command):
    args = cli.build_parser().parse_args([command, "--params", "x.yaml", "--set", "train.epochs=3"])

    assert (args.params, args.overrides) == ("x.yaml", ["train.epochs=3"])
    assert callable(args.run)


def test_the_stages_default_to_the_folders_dvc_yaml_gives_them():
    parser = cli.build_parser()

    assert parser.parse_args(["fetch"]).out == str(RAW)
    convert = parser.parse_args(["convert"])
    assert (convert.raw, convert.out) == (str(RAW), str(PARQUET))
    train = parser.parse_args(["train"])
    assert (train.parquet, train.model_dir, train.train_dir) == (str(PARQUET), str(MODEL), str(TRAIN))
    evaluate = parser.parse_args(["evaluate"])
    assert (evaluate.checkpoint, evaluate.out) == (str(MODEL / "model.pt"), str(EVAL))
    assert parser.parse_args(["register"]).out == str(REGISTER)


def test_a_user_error_is_one_logged_line_exit_2_and_the_error_file(tmp_path, monkeypatch, caplog):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv(ERROR_FILE_ENV, str(error_file))

    with caplog.at_level(logging.ERROR):
        code = cli.main(["fetch", "--params", str(PARAMS_YAML), "--set", "train.epochs=-1"])

    assert code == EXIT_USER_ERROR
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "train.epochs" in record.getMessage() and "\n" not in record.getMessage()
    assert json.loads(error_file.read_text()) == {"message": record.getMessage(), "exit_code": 2}


def test_without_the_environment_variable_no_error_file_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(ERROR_FILE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)

    assert cli.main(["fetch", "--params", str(tmp_path / "missing.yaml")]) == EXIT_USER_ERROR
    assert list(tmp_path.iterdir()) == []


def test_bench_arguments_go_to_bench_s_own_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "no-such-mode"])

    assert exit_.value.code == 2
    assert "invalid choice: 'no-such-mode'" in capsys.readouterr().err
