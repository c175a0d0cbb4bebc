"""bench/cli.py: the parser of `wflw bench`."""

import argparse

import pytest

from wflw_pipeline.bench import step
from wflw_pipeline.bench.cli import _sizes


def test_train_step_help_lists_every_variant():
    from wflw_pipeline.bench import cli as bench_cli

    parser = bench_cli.build_parser()
    text = parser._subparsers._group_actions[0].choices["train-step"].format_help()
    for name in [*step.BASES, *step.OPTIONS]:
        assert f"  {name} " in text, name


def test_a_list_of_sizes_is_comma_separated_integers():
    assert _sizes("256,384, 512,") == [256, 384, 512]
    with pytest.raises(argparse.ArgumentTypeError, match=r"not a comma-separated list of integers: '2,x'"):
        _sizes("2,x")
