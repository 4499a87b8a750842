"""Atomic file output and safe input: temp file then rename; tensors via safetensors only. Also the user cache
folder (``$SUBSPACES_CACHE``, else ``$XDG_CACHE_HOME/subspaces``, else ``~/.cache/subspaces``) where derived
assets (extracted docstrings, the converted SmolLM2 checkpoint) live."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

from ._errors import SubspacesError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp make private (0600/0700) entries; outputs get the usual mode under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    _usual_mode(Path(tmp))
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata=None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_json(path: str | os.PathLike) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SubspacesError(f"cannot read {path}: {e}") from None
    if not isinstance(obj, dict):
        raise SubspacesError(f"cannot read {path}: expected a JSON object")
    return obj


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise SubspacesError(f"cannot read {path}: not a valid safetensors file ({e})") from None


@contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite_ours: tuple[str, ...] = ()):
    """Yield a temp folder; move its files into ``path`` when the block succeeds.

    ``path`` may exist only if it is empty or holds nothing but files named in ``overwrite_ours``
    (our own earlier outputs), so a user's other files are never mixed with or replaced by ours.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise SubspacesError(f"output {path} exists and is not a folder")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in overwrite_ours)
        if foreign:
            raise SubspacesError(
                f"output folder {path} already holds other files ({', '.join(foreign[:5])}); "
                "choose a new or empty folder"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        path.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, path / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    _usual_mode(tmp, directory=True)
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
