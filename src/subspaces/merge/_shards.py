"""Writing safetensors shards as a stream: the shard layout and each shard's header are planned from the tensors'
shapes and dtypes before any data exists, then every tensor (or block of its rows) is appended as soon as it is
computed, so a merged model is never held in memory. ``write_model`` builds a whole Hugging Face folder in a temporary
folder beside ``out`` and renames it onto ``out`` at the end; ``out`` must not exist.
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

from .._errors import SubspacesError
from .._io import _usual_mode

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {v: k for k, v in DTYPES.items()}
# Files of a Hugging Face folder that describe the model rather than hold weights: copied to the merged folder.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
               "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json")
SHARD_BYTES = 2 * 1024**3



def _plan(specs: list[tuple[str, tuple[int, ...], torch.dtype]], shard_bytes: int) -> list[list[int]]:
    shards, size = [[]], 0
    for i, (_, shape, dtype) in enumerate(specs):
        n = nbytes(shape, dtype)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.tensor([], dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n


def _shard_header(specs, metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in specs:
        n = nbytes(shape, dtype)
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
        total = sum(nbytes(s, d) for _, s, d in specs)
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

