"""The import closure of each stage, derived from the code, against dvc.yaml; the train code digest."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from paths import ROOT

from wflw_pipeline import stage_code

STAGES = {
    "fetch": "fetch",
    "convert": "convert",
    "train": "train",
    "evaluate": "evaluate",
    "register": "register",
}
"""Each DVC stage and the module that does its work."""


def _relative(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(ROOT)) for path in paths]


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_deps_are_exactly_the_modules_the_stage_imports(stage):
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    code_deps = sorted(dep for dep in declared if dep.startswith("src/"))
    expected = _relative(stage_code.stage_sources(stage))
    assert code_deps == expected, f"dvc.yaml stages.{stage}.deps should list exactly:\n" + "\n".join(
        f"      - {path}" for path in expected
    )


@pytest.mark.parametrize("stage", STAGES)
def test_what_python_actually_imports_is_inside_the_derived_closure(stage):
    """Running the imports for real (no lazy function-level ones) loads a subset of the static closure."""
    module = f"wflw_pipeline.{STAGES[stage]}"
    script = (
        "import json, sys, wflw_pipeline.cli as cli, importlib\n"
        f"cli.build_parser().parse_known_args(['{stage}'])\n"
        f"importlib.import_module('{module}')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('wflw_pipeline'))))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = {stage_code.module_path(name) for name in json.loads(done.stdout)}
    assert stage_code.module_path(module) in loaded
    assert loaded <= set(stage_code.stage_sources(stage))
    assert not any("bench" in path.parts for path in loaded)


def test_relative_absolute_and_lazy_imports_are_followed(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "cli.py": "from .a import x\n\ndef _go():\n    from . import b\n    _helper()\n\n"
        "def _helper():\n    from . import e\n\ndef _other():\n    import pkg.c\n",
        "a.py": "x = 1\n",
        "b.py": "def later():\n    from pkg.sub import d\n",
        "c.py": "",
        "e.py": "",
        "sub/__init__.py": "",
        "sub/d.py": "from ..a import x\nimport numpy\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    monkeypatch.setattr(stage_code, "ROOT", package)
    monkeypatch.setattr(stage_code, "PACKAGE", "pkg")
    names = sorted(str(p.relative_to(package)) for p in stage_code.stage_sources("go"))
    assert names == ["__init__.py", "a.py", "b.py", "cli.py", "e.py", "sub/__init__.py", "sub/d.py"]  # not c


def test_digest_changes_with_any_byte_of_any_file(tmp_path, monkeypatch):
    monkeypatch.setattr(stage_code, "ROOT", tmp_path)
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    paths = [tmp_path / "a.py", tmp_path / "b.py"]
    before = stage_code.digest(paths)
    assert stage_code.digest(reversed(paths)) == before
    (tmp_path / "b.py").write_text("y = 2\n# a comment\n")
    assert stage_code.digest(paths) != before


def test_every_torch_load_in_the_package_reads_weights_only():
    calls = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                calls.append((f"{path.name}:{node.lineno}", safe))
    assert calls, "no torch.load found: the check looks at nothing"
    assert [where for where, safe in calls if not safe] == []
