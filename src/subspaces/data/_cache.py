"""The user cache folder and atomic writes into it (standard library only).

Everything subspaces derives from its embedded assets (extracted docstrings, the converted SmolLM2
checkpoint) lives under one folder:

* ``$SUBSPACES_CACHE`` when set, else
* ``$XDG_CACHE_HOME/subspaces`` when ``XDG_CACHE_HOME`` is set, else
* ``~/.cache/subspaces``.

Writers never leave a half-written result under its final name: a file or folder is built under a
hidden temporary name in the same parent folder and then renamed into place (a rename inside one
file system is atomic). If two processes race, the first rename wins and the loser discards its copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["cache_dir", "atomic_folder", "atomic_write_json"]

# Temporary folders older than this are leftovers of a killed process and may be removed.
_STALE_SECONDS = 24 * 3600


def cache_dir(*parts: str) -> Path:
    """Return ``<cache>/<parts...>`` (not created); the root is read from the environment on each call."""
    root = os.environ.get("SUBSPACES_CACHE")
    if root:
        base = Path(root).expanduser()
    elif os.environ.get("XDG_CACHE_HOME"):
        base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "subspaces"
    else:
        base = Path.home() / ".cache" / "subspaces"
    return base.joinpath(*parts)


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _remove_stale_temps(final: Path) -> None:
    now = time.time()
    for p in final.parent.glob(_tmp_prefix(final) + "*"):
        try:
            if now - p.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        except OSError:
            pass  # another process may be cleaning up too


def atomic_folder(final: str | os.PathLike, build: Callable[[Path], Any]) -> Path:
    """Create the folder ``final`` by calling ``build(tmp)`` on an empty temporary folder, then renaming it.

    If ``final`` already exists it is returned untouched and ``build`` is not called: its existence
    means a previous build completed. If ``build`` raises, the temporary folder is removed and the
    exception propagates; ``final`` is never created half-way.
    """
    final = Path(final)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # A concurrent build finished first (rename onto a non-empty folder fails): keep theirs.
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` through a temporary file and an atomic replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
