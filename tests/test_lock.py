"""The locked dependency set (requirements/*.txt, written by `make lock`) agrees with pyproject.toml's ranges, is
complete (no dependency left for pip to pick freely) and is what this environment runs on."""
from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def read_lock(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
            assert m, f"{name}: not an exact pin: {line!r}"
            pins[canonicalize_name(m[1])] = Version(m[2])
    return pins


DEMO, TEST = read_lock("demo.txt"), read_lock("test.txt")
CORE = [Requirement(r) for r in PROJECT["dependencies"]]
CLI = [Requirement(r) for r in PROJECT["optional-dependencies"]["cli"]]
TEST_EXTRA = [Requirement(r) for r in PROJECT["optional-dependencies"]["test"]]


@pytest.mark.parametrize("lock, requirements", [(DEMO, CORE + CLI), (TEST, CORE + CLI + TEST_EXTRA)],
                         ids=["demo", "test"])
def test_lock_satisfies_pyproject(lock, requirements):
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in lock, f"{req} is in pyproject.toml but not in the lock: run `make lock`"
        assert req.specifier.contains(lock[name], prereleases=True), \
            f"the lock pins {name}=={lock[name]}, outside pyproject.toml's {req}: run `make lock`"


def test_demo_lock_is_the_test_lock_without_the_test_extra():
    assert {n: v for n, v in TEST.items() if n in DEMO} == DEMO  # the demo runs the versions the suite tested
    only_test = set(TEST) - set(DEMO)
    assert {canonicalize_name(r.name) for r in TEST_EXTRA} <= only_test | set(DEMO)
    assert not {"pytest", "peft", "galore-torch", "mergekit", "bitsandbytes"} & set(DEMO)  # the demo stays lean


def test_torch_pin_matches_the_lock():
    pin = Requirement(next(line for line in (ROOT / "requirements" / "torch.in").read_text().splitlines()
                           if line.startswith("torch")))
    assert pin.specifier.contains(TEST["torch"]) and pin.specifier.contains(DEMO["torch"])


def test_this_environment_runs_the_locked_versions():
    for name, version in TEST.items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name}=={version} is locked but not installed: run `make test`")
        assert installed == version, f"{name} {installed} is installed, the lock says {version}: run `make test`"


@pytest.mark.parametrize("lock, file", [(DEMO, "demo.txt"), (TEST, "test.txt")], ids=["demo", "test"])
def test_lock_is_complete(lock, file):
    """Every dependency of every locked package is locked too, so pip never chooses a version on its own."""
    missing = []
    for name in lock:
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                if canonicalize_name(req.name) not in lock:
                    missing.append(f"{req} (needed by {name})")
    assert not missing, f"not in requirements/{file}: {missing}; run `make lock`"
