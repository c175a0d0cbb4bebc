"""The package's own source files that a stage runs, found from the import statements (AST, no import).

`wflw <stage>` runs cli.py's module-level code and the handler `_<stage>` (with the cli functions it
calls); from there every module it imports, anywhere in the module (lazy imports inside functions
included), is followed through the package. dvc.yaml's deps of a stage are exactly these files (a test
checks), and train puts their digest into the resume key, so a checkpoint written by other code is never
continued.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path

PACKAGE = __name__.rpartition(".")[0]
ROOT = Path(__file__).resolve().parent
RUN_AS_FILES = {f"{PACKAGE}.mlops.pyfunc": (f"{PACKAGE}.mlops.pyfunc_model",)}
"""Modules that hand another package file to a tool that runs it (MLflow's models-from-code script)."""


def module_path(name: str) -> Path:
    """The source file of a module of this package (a subpackage is its __init__.py)."""
    relative = Path(*name.split(".")[1:])
    package = ROOT / relative / "__init__.py"
    return package if package.is_file() else (ROOT / relative).with_suffix(".py")


def _exists(name: str) -> bool:
    return name == PACKAGE or module_path(name).is_file()


def _resolve(node: ast.ImportFrom, current: str) -> list[str]:
    """The package modules an `from ... import ...` statement loads."""
    if node.level:
        base = current.split(".")
        is_package = module_path(current).name == "__init__.py"
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        module = ".".join([*base, *([node.module] if node.module else [])])
    else:
        module = node.module or ""
    if module != PACKAGE and not module.startswith(f"{PACKAGE}."):
        return []
    found = [module] if module != PACKAGE else []
    found += [f"{module}.{alias.name}" for alias in node.names if _exists(f"{module}.{alias.name}")]
    return found


def _imports(nodes: Iterable[ast.AST], current: str) -> set[str]:
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith(f"{PACKAGE}.") and _exists(a.name)}
        elif isinstance(node, ast.ImportFrom):
            names |= set(_resolve(node, current))
    return names


def _parents(name: str) -> set[str]:
    """The packages Python imports before `name` (their __init__.py run first)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def closure(modules: Iterable[str]) -> set[str]:
    """Every package module that importing `modules` loads, following imports anywhere in each file."""
    todo, seen = list(modules), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(module_path(name).read_text(), filename=str(module_path(name)))
        todo += [*_imports(ast.walk(tree), name), *_parents(name), *RUN_AS_FILES.get(name, ())]
    return seen


def entry_imports(module: str, function: str) -> set[str]:
    """What running `function` of `module` imports: the module-level imports, its body's, and the bodies'
    of the module's functions it calls (transitively)."""
    tree = ast.parse(module_path(module).read_text())
    top = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    todo, seen = [function], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        calls = (
            n.func.id
            for n in ast.walk(functions[name])
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        )
        todo += [called for called in calls if called in functions]
    bodies = [node for name in seen for node in ast.walk(functions[name])]
    return _imports([*top, *bodies], module) | _parents(module)


def stage_sources(stage: str) -> list[Path]:
    """The source files `wflw <stage>` runs, sorted."""
    cli = f"{PACKAGE}.cli"
    modules = {cli, *closure(entry_imports(cli, f"_{stage.replace('-', '_')}"))}
    return sorted(module_path(name) for name in modules)


def digest(paths: Iterable[Path]) -> str:
    """SHA-256 over the files' names (relative to the package) and contents."""
    sha = hashlib.sha256()
    for path in sorted(paths):
        sha.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()
