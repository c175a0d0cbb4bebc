"""What the tests of several `wflw bench` modes share: the tiny CLI settings and a run of `wflw`."""

from __future__ import annotations

from paths import ROOT

from wflw_pipeline import cli

TINY = ("--set", "model.input_size=32", "--set", "train.device=cpu")
"""params.yaml's ResNet-18 at 32 px on the CPU, for the CLI."""


def run_wflw(words: str, *extra: str) -> None:
    """`wflw <words> <extra...>` with the repository's params.yaml; must exit 0."""
    assert cli.main([*words.split(), *extra, "--params", str(ROOT / "params.yaml")]) == 0
