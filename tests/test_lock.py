"""requirements.lock is complete and is what .venv holds. `pip check` (run by the install) sees every plain
requirement, but not what an extra asks for (prefect needs `httpx[http2]`, so h2 must be locked): walked here,
from the project and its extras (dev, s3) down."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from paths import ROOT

LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.MULTILINE)


def locked_pins(text: str) -> dict[str, Version]:
    """The lock's `name==version` pins by canonical name."""
    return {canonicalize_name(name): Version(version) for name, version in PIN.findall(text)}


def gaps(
    roots: Iterable[tuple[str, frozenset[str]]],
    pins: dict[str, Version],
    requires: Callable[[str], list[str]],
) -> list[str]:
    """What the distributions reachable from `roots` (name, extras) need and `pins` lacks or pins outside the
    requirement's range, one line each; `requires(name)` gives a distribution's Requires-Dist."""
    missing, seen, todo = [], set(), list(roots)
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for line in requires(name):
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in {"", *extras}):
                continue
            key = canonicalize_name(req.name)
            if key not in pins:
                missing.append(f"{name}[{','.join(sorted(extras))}] needs {req}: not in the lock")
            elif not req.specifier.contains(pins[key], prereleases=True):
                missing.append(f"{name} needs {req}: the lock pins {pins[key]}")
            else:
                todo.append((key, frozenset(req.extras)))
    return sorted(missing)


def _installed_requires(name: str) -> list[str]:
    return metadata.requires(name) or []


def test_the_lock_holds_everything_the_project_and_its_extras_need():
    pins = locked_pins(LOCK.read_text())

    assert gaps([("wflw_pipeline", frozenset({"dev", "s3"}))], pins, _installed_requires) == []
    assert {"httpx", "h2"} <= pins.keys()  # prefect's httpx[http2]
    assert {"dvc-s3", "boto3", "moto", "flask-cors"} <= pins.keys()  # the S3 extra, moto[server]


def test_the_venv_holds_exactly_the_locked_versions():
    pins = locked_pins(LOCK.read_text())

    differ = {name: str(pin) for name, pin in pins.items() if Version(metadata.version(name)) != pin}
    assert differ == {}


def test_a_gap_in_an_extra_is_found():
    requires = {
        "app": ["lib[fast]>=1", "tool; extra == 'dev'"],
        "lib": ["speedup>=2; extra == 'fast'", "colour; python_version < '3'"],
        "speedup": [],
    }
    pins = {"lib": Version("1.5"), "speedup": Version("1.0")}

    speedup = 'lib needs speedup>=2; extra == "fast": the lock pins 1.0'
    assert gaps([("app", frozenset())], pins, requires.__getitem__) == [speedup]
    assert gaps([("app", frozenset({"dev"}))], pins, requires.__getitem__) == [
        'app[dev] needs tool; extra == "dev": not in the lock',
        speedup,
    ]
