"""Model I/O for merging: lazy safetensors in, one tensor at a time; streamed safetensors shards out, atomically.

Inputs (`open_model`): a Hugging Face folder (``model.safetensors`` or a sharded ``*.safetensors.index.json``), a single
``.safetensors`` file, an in-memory state dict or an ``nn.Module``. Pickled checkpoints are refused, never loaded.

Output (`write_model`): the shard layout is planned from the tensors' shapes and dtypes before any data is produced,
so each shard's safetensors header is written first and every tensor is appended as soon as it is computed: the
merged model is never held in memory. Everything is written into a temporary folder beside ``out`` and renamed onto
it at the end; ``out`` must not exist. The folder gets the config and tokenizer files of ``like`` (dtype updated)
and ``merge_config.json``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import SubspacesError
from .._io import _usual_mode

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {v: k for k, v in _DTYPES.items()}
# Files of a Hugging Face folder that describe the model rather than hold weights: copied to the merged folder.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
               "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json")
SHARD_BYTES = 2 * 1024**3


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
        hint = (f" It holds {', '.join(pickled[:3])}: pickled checkpoints are never loaded; convert them to safetensors "
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


def _plan(specs: list[tuple[str, tuple[int, ...], torch.dtype]], shard_bytes: int) -> list[list[int]]:
    shards, size = [[]], 0
    for i, (_, shape, dtype) in enumerate(specs):
        n = _nbytes(shape, dtype)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.tensor([], dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n


def _shard_header(specs, metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in specs:
        n = _nbytes(shape, dtype)
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_shards(folder: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 tensors: Iterator[tuple[str, torch.Tensor]], *, shard_bytes: int = SHARD_BYTES,
                 progress: Any = None) -> list[str]:
    """Write tensors (in the order of ``specs``) into safetensors shards under ``folder``; return the file names.
    Each item is (name, tensor) or (name, iterator over blocks of the tensor's rows)."""
    plan = _plan(specs, shard_bytes)
    n = len(plan)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, idx in zip(names, plan):
        shard_specs = [specs[i] for i in idx]
        with open(folder / fname, "wb") as fh:
            fh.write(_shard_header(shard_specs, {"format": "pt"}))
            for name, shape, dtype in shard_specs:
                got_name, t = next(tensors)
                written = 0
                for block in [t] if isinstance(t, torch.Tensor) else t:  # a tensor or blocks of its rows
                    if got_name != name or tuple(block.shape[1:]) != shape[1:] or block.dtype != dtype:
                        raise AssertionError(f"planned {name} {shape} {dtype}, got {got_name} {tuple(block.shape)} "
                                             f"{block.dtype}")
                    fh.write(_tensor_bytes(block))
                    written += block.numel()
                if written != math.prod(shape):
                    raise AssertionError(f"{name}: wrote {written} of {math.prod(shape)} entries")
                weight_map[name] = fname
                if progress is not None:
                    progress.update(1)
    if n > 1:
        total = sum(_nbytes(s, d) for _, s, d in specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def copy_side_files(like: Path | None, folder: Path, dtype: torch.dtype | None) -> None:
    """Config and tokenizer files of the folder ``like``; config.json's dtype follows the written weights."""
    if like is None:
        return
    for fname in _SIDE_FILES:
        src = like / fname
        if src.is_file():
            shutil.copyfile(src, folder / fname)
    cfg = folder / "config.json"
    if cfg.is_file() and dtype is not None:
        try:
            obj = json.loads(cfg.read_text())
        except ValueError:
            return
        name = str(dtype).removeprefix("torch.")
        for key in ("torch_dtype", "dtype"):
            if key in obj:
                obj[key] = name
        cfg.write_text(json.dumps(obj, indent=2) + "\n")


def check_new_output(out: str | os.PathLike) -> Path:
    out = Path(out).expanduser()
    if out.exists():
        raise SubspacesError(f"output {out} already exists; choose a new folder (inputs are never overwritten)")
    return out


def write_model(out: str | os.PathLike, tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *,
                like: Any = None, config: dict | None = None,
                specs: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None,
                shard_bytes: int = SHARD_BYTES, extra_files: dict[str, str] | None = None,
                progress: Any = None) -> Path:
    """Write a Hugging Face folder atomically: shards, config/tokenizer of ``like``, ``merge_config.json``.

    ``tensors`` is a dict or an iterator of (name, tensor); an iterator needs ``specs`` (name, shape, dtype) in the
    order it yields, so the shards can be planned before the first tensor exists.
    """
    out = check_new_output(out)
    if isinstance(tensors, dict):
        specs = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
        tensors = iter(tensors.items())
    elif specs is None:
        raise TypeError("write_model: an iterator of tensors needs specs")
    else:
        tensors = iter(tensors)
    like_folder = like if isinstance(like, Path) or like is None else getattr(like, "folder", None)
    if isinstance(like, (str, os.PathLike)) and Path(like).is_dir():
        like_folder = Path(like)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_shards(tmp, specs, tensors, shard_bytes=shard_bytes, progress=progress)
        floats = [d for _, _, d in specs if d.is_floating_point]
        copy_side_files(like_folder, tmp, max(set(floats), key=floats.count) if floats else None)
        (tmp / "merge_config.json").write_text(json.dumps(config or {}, indent=2, default=str) + "\n")
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        _usual_mode(tmp, directory=True)
        os.rename(tmp, out)  # fails if out appeared meanwhile: never replace someone's folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

