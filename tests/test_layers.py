"""The import rules of DESIGN.md, checked from the file paths: which layer may import which, MLflow only
under mlops/, Prefect only under flows/, no stage imports another, nothing imports bench/. Every import
counts, lazy ones inside functions included."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from paths import ROOT

PACKAGE_DIR = ROOT / "src" / "wflw_pipeline"
PLUMBING = {"__init__", "params", "errors", "fileio", "progress", "stage_code", "outputs", "retry", "tables"}
STAGES = {"fetch", "convert", "train", "evaluate", "register"}
LAYERS = {"data", "core", "mlops", "serving", "bench"}
TORCH_STACK = {"numpy", "pyarrow", "PIL", "torch", "torchvision", "sklearn", "tqdm", "yaml", "matplotlib"}
ORCHESTRATION = {"mlflow", "prefect", "dvc"}


def layer(module: str) -> str:
    """`core/model` -> core; `train` -> stage; `errors` -> plumbing; `cli` -> cli."""
    head = module.split("/")[0]
    if head in LAYERS:
        return head
    if module in STAGES:
        return "stage"
    if module in PLUMBING:
        return "plumbing"
    return module


def _name(path: Path) -> str:
    """A source file as `core/model` (a package's __init__.py as its folder, the top one as `__init__`)."""
    relative = path.relative_to(PACKAGE_DIR).with_suffix("")
    if relative.name == "__init__" and relative.parent != Path("."):
        relative = relative.parent
    return relative.as_posix()


def _target(parts: list[str]) -> str:
    """The package module `parts` (after wflw_pipeline) names: the longest prefix that is a file or folder."""
    for end in range(len(parts), 0, -1):
        candidate = PACKAGE_DIR.joinpath(*parts[:end])
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return "/".join(parts[:end])
    return "__init__"


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(package modules, top-level outside modules) that the file imports anywhere."""
    here = path.relative_to(PACKAGE_DIR).parent.parts
    package, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "wflw_pipeline":
                    package.add(_target(parts[1:]))
                else:
                    outside.add(parts[0])
        elif isinstance(node, ast.ImportFrom):
            module = node.module.split(".") if node.module else []
            if node.level:
                base = [*here[: len(here) - node.level + 1], *module]
            elif module[0] == "wflw_pipeline":
                base = module[1:]
            else:
                outside.add(module[0])
                continue
            package |= {_target([*base, alias.name]) for alias in node.names}
    package.discard(_name(path))
    return package, outside


def violations(module: str, package: set[str], outside: set[str]) -> list[str]:
    """What `module` imports against DESIGN.md's table, one line each."""
    kind = layer(module)
    bad = [f"{module} imports {target}" for target in sorted(package) if not _allowed(module, kind, target)]
    for name in sorted(outside):
        if name in ORCHESTRATION and not (name == "mlflow" and kind == "mlops"):
            bad.append(f"{module} imports {name}")
        elif kind in {"data", "core"} and name not in TORCH_STACK and name not in sys.stdlib_module_names:
            bad.append(f"{module} imports {name} (data/ and core/ use the torch stack only)")
        elif kind == "plumbing" and name not in {"yaml", "tqdm"} and name not in sys.stdlib_module_names:
            bad.append(f"{module} imports {name} (plumbing uses the standard library, PyYAML, tqdm)")
    return bad


RULES = {
    "data": {"core"},
    "core": {"data"},
    "mlops": {"data", "core"},
    "serving": {"data", "core"},
    "stage": {"data", "core"},
    "bench": {"data", "core", "mlops", "serving", "stage"},
}
"""Which other layers a layer may import (besides plumbing and itself; a stage never another stage)."""
EXCEPTIONS = {"serving": {"mlops/pyfunc"}, "train": {"mlops/live_run"}, "register": {"serving/export"}}
"""Single modules of another layer a layer or stage may import (register: all of mlops/ too)."""


def _allowed(module: str, kind: str, target: str) -> bool:
    other = layer(target)
    if kind == "cli":
        return True
    if kind == "plumbing" or other == "plumbing":
        return other == "plumbing"
    if other == kind:
        return kind != "stage"
    if other in RULES.get(kind, set()) or target in EXCEPTIONS.get(kind, set()) | EXCEPTIONS.get(
        module, set()
    ):
        return True
    return module == "register" and other == "mlops"


SOURCES = sorted(PACKAGE_DIR.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_every_module_keeps_to_its_layers_imports(path):
    assert violations(_name(path), *imports(path)) == []


def test_prefect_only_under_flows_and_the_flows_use_the_package_not_mlflow_internals():
    outside = [path for path in SOURCES if "prefect" in imports(path)[1]]
    assert outside == []
    assert all(path.parent.name == "flows" for path in (ROOT / "flows").glob("*.py"))


@pytest.mark.parametrize(
    ("module", "package", "outside", "expected"),
    [
        ("core/model", {"data/wflw", "errors"}, {"torch"}, []),
        ("core/model", {"mlops/client"}, set(), ["core/model imports mlops/client"]),
        ("core/engine", set(), {"mlflow"}, ["core/engine imports mlflow"]),
        (
            "data/dataset",
            set(),
            {"requests"},
            ["data/dataset imports requests (data/ and core/ use the torch stack only)"],
        ),
        ("train", {"mlops/live_run", "core/engine"}, set(), []),
        ("train", {"mlops/registry"}, set(), ["train imports mlops/registry"]),
        ("evaluate", {"train"}, set(), ["evaluate imports train"]),
        ("register", {"mlops/registry", "serving/export"}, set(), []),
        (
            "register",
            {"serving/predict"},
            {"mlflow"},
            ["register imports serving/predict", "register imports mlflow"],
        ),
        ("mlops/registry", set(), {"mlflow"}, []),
        ("mlops/pyfunc", {"serving/inference"}, set(), ["mlops/pyfunc imports serving/inference"]),
        ("serving/predict", {"mlops/pyfunc", "core/model"}, set(), []),
        ("serving/export", {"mlops/registry"}, set(), ["serving/export imports mlops/registry"]),
        ("bench/step", {"train", "core/engine"}, set(), []),
        ("core/engine", {"bench/step"}, set(), ["core/engine imports bench/step"]),
        (
            "errors",
            {"core/model"},
            {"torch"},
            [
                "errors imports core/model",
                "errors imports torch (plumbing uses the standard library, PyYAML, tqdm)",
            ],
        ),
        ("cli", {"bench/cli", "train", "mlops/registry"}, set(), []),
    ],
)
def test_the_rules_of_the_table(module, package, outside, expected):
    assert violations(module, package, outside) == expected


def test_imports_are_read_from_relative_absolute_and_lazy_statements(tmp_path, monkeypatch):
    package = tmp_path / "wflw_pipeline"
    (package / "core").mkdir(parents=True)
    (package / "mlops").mkdir()
    for name in (
        "__init__.py",
        "errors.py",
        "core/__init__.py",
        "core/model.py",
        "mlops/__init__.py",
        "mlops/client.py",
    ):
        (package / name).write_text("")
    (package / "core" / "engine.py").write_text(
        "import numpy as np\nfrom . import model\nfrom ..errors import E\n"
        "def later():\n    from wflw_pipeline.mlops import client\n    import mlflow.entities\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIR", package)

    assert imports(package / "core" / "engine.py") == (
        {"core/model", "errors", "mlops/client"},
        {"numpy", "mlflow"},
    )
