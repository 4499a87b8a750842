"""Model input for merging: lazy safetensors, one tensor (or a block of rows) at a time.

``open_model`` takes a Hugging Face folder (``model.safetensors`` or a sharded ``*.safetensors.index.json``), a single
``.safetensors`` file, an in-memory state dict or an ``nn.Module``. Pickled checkpoints are refused, never loaded.
Output (streamed shards, atomic folders) is in ``_shards``.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import SubspacesError
from ._shards import DTYPES as _DTYPES, nbytes as _nbytes


class Source:
    """One model's tensors, read lazily. ``keys()`` keeps the file order; ``get`` loads one tensor, ``rows`` a range
    of its rows (along dim 0)."""

    def __init__(self, name: str, folder: Path | None = None) -> None:
        self.name, self.folder = name, folder
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def get(self, key: str) -> torch.Tensor:
        shape = self.shape(key)
        return self.rows(key, 0, shape[0]) if shape else self._scalar(key)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _scalar(self, key: str) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError


class _Memory(Source):
    def __init__(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(name)
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise SubspacesError(f"{name}: entry {bad[0]!r} is a {type(tensors[bad[0]]).__name__}, not a tensor")
        self._tensors = tensors
        self._meta = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key].detach()

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._tensors[key].detach()[start:stop]


class _Safetensors(Source):
    """Reads with plain ``readinto`` at the recorded offsets rather than a memory map: mapped pages of every input
    would otherwise stay resident (and count in RSS) until the end of a merge."""

    def __init__(self, name: str, files: list[Path], folder: Path | None) -> None:
        super().__init__(name, folder)
        self._where: dict[str, tuple[Path, int]] = {}
        for f in files:
            header, data_start = _read_header(f)
            size = f.stat().st_size
            for k, info in header.items():
                if k == "__metadata__":
                    continue
                if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
                    raise SubspacesError(f"{f}: tensor {k!r} has a dtype merging does not support ({info!r:.80})")
                try:
                    shape, dtype = tuple(int(d) for d in info["shape"]), _DTYPES[info["dtype"]]
                    begin, end = (int(o) for o in info["data_offsets"])
                except (KeyError, TypeError, ValueError):
                    raise SubspacesError(f"cannot read {f}: malformed entry for tensor {k!r}") from None
                if end - begin != _nbytes(shape, dtype) or data_start + end > size:
                    raise SubspacesError(f"cannot read {f}: tensor {k!r} does not fit the file (truncated?)")
                self._meta[k] = (shape, dtype)
                self._where[k] = (f, data_start + begin)

    def _read(self, key: str, offset: int, shape: tuple[int, ...]) -> torch.Tensor:
        f, start = self._where[key]
        out = torch.empty(shape, dtype=self.dtype(key))
        if out.numel():
            with open(f, "rb") as fh:
                fh.seek(start + offset)
                fh.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        return out

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        shape = self.shape(key)
        stop = min(stop, shape[0])
        row = _nbytes(shape[1:], self.dtype(key))
        return self._read(key, start * row, (max(stop - start, 0), *shape[1:]))

    def _scalar(self, key: str) -> torch.Tensor:
        return self._read(key, 0, ())


def _read_header(f: Path) -> tuple[dict, int]:
    """The safetensors header and where the data starts."""
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 * 1024**2:
                raise ValueError("header too large")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        return header, 8 + n
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise SubspacesError(f"cannot read {f}: not a valid safetensors file ({e})") from None


def _folder_files(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SubspacesError(f"cannot read {indexes[0]}: {e}") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SubspacesError(f"{indexes[0]} lists shards that are missing: {', '.join(missing[:3])}")
        return files
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if not files:
        pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = (f" It holds {', '.join(pickled[:3])}: pickled checkpoints are never loaded; convert them to "
                "safetensors "
                "(model.save_pretrained(folder, safe_serialization=True)).") if pickled else ""
        raise SubspacesError(f"no .safetensors weights in {folder}.{hint}")
    return files


def open_model(x: Any, name: str = "model") -> Source:
    """A lazy view of a model: path (folder or .safetensors file), state dict or nn.Module."""
    if isinstance(x, Source):
        return x
    if isinstance(x, nn.Module):
        return _Memory(name, dict(x.state_dict()))
    if isinstance(x, dict):
        return _Memory(name, x)
    if isinstance(x, (str, os.PathLike)):
        p = Path(x).expanduser()
        if p.is_dir():
            return _Safetensors(str(p), _folder_files(p), p)
        if p.is_file():
            if p.suffix != ".safetensors":
                raise SubspacesError(f"{p}: only .safetensors files are read (pickled checkpoints are never loaded)")
            return _Safetensors(str(p), [p], None)
        raise SubspacesError(f"{name} {str(p)!r} does not exist")
    raise SubspacesError(f"{name}: expected a path, a state dict or an nn.Module, got {type(x).__name__}")


def load_state_dict(x: Any, name: str = "model") -> dict[str, torch.Tensor]:
    """Every tensor of a model (for small models and learned merges)."""
    src = open_model(x, name)
    return {k: src.get(k) for k in src.keys()}


