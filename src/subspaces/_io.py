"""Atomic file output and safe input: temp file then rename; tensors via safetensors only."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ._errors import SubspacesError


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
