"""Docstrings of the Python standard library, labelled by top-level package.

Extraction rules (deliberate choices):

* Source: the running interpreter's ``sysconfig.get_paths()["stdlib"]``, parsed with :mod:`ast`
  (nothing is imported, so e.g. ``tkinter`` works without a display).
* A "package" is a top-level stdlib package folder (``asyncio/``) or a single module (``csv.py``).
* Docstrings of modules, classes, functions and methods (``ast.get_docstring`` with ``clean=True``),
  then every run of whitespace collapsed to one space.
* Skipped: folders named ``test``, ``tests``, ``idle_test`` (and ``__pycache__``) and files named
  ``test_*.py`` -- their docstrings describe tests, not the package. ``idlelib`` is not a default
  package; if asked for it, only its ``idle_test`` folder is skipped.
* Files that do not parse (none in a normal install) are skipped.

Raw docstrings of each package are cached as JSON per interpreter (key: implementation, full
version, stdlib path hash, extractor version, package), so later calls only read small files.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
from pathlib import Path

from .._io import cache_dir, write_json

# Bump when the extraction rules change: it is part of the cache key.
EXTRACTOR_VERSION = 1

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})
_WS = re.compile(r"\s+")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _package_files(package: str) -> list[Path]:
    root = stdlib_dir()
    folder, module = root / package, root / f"{package}.py"
    if folder.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            files += [
                Path(dirpath) / f
                for f in sorted(filenames)
                if f.endswith(".py") and not f.startswith("test_")
            ]
        return files
    if module.is_file():
        return [module]
    raise ValueError(
        f"package {package!r} is neither a folder nor a module in the standard library at {root}"
    )


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                text = _WS.sub(" ", doc).strip()
                if text:
                    out.append(text)
    return out


def _cache_file(package: str) -> Path:
    impl = sys.implementation.name
    version = ".".join(map(str, sys.version_info[:3]))
    where = hashlib.sha256(str(stdlib_dir()).encode()).hexdigest()[:8]
    key = f"{impl}{version}-{where}-v{EXTRACTOR_VERSION}"
    return cache_dir("data", "stdlib-docstrings", key, f"{package}.json")


def package_docstrings(package: str) -> list[str]:
    """All (whitespace-cleaned) docstrings of one stdlib package, in a deterministic order; cached."""
    path = _cache_file(package)
    if path.is_file():
        try:
            with open(path, encoding="utf-8") as f:
                texts = json.load(f)
            if isinstance(texts, list) and all(isinstance(t, str) for t in texts):
                return texts
        except (OSError, ValueError):
            pass  # unreadable cache: rebuild it below
    texts = [t for file in _package_files(package) for t in _docstrings(file)]
    try:
        write_json(path, texts)
    except OSError:
        pass  # a read-only cache is not an error: just slower next time
    return texts
