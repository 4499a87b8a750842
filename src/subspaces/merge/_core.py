"""``merge(method, base=..., models=[...], out=...)``: the one entry point of the merge family.

Tensor-wise methods (kind "tensor") are pure functions ``fn(base, deltas, *, hyperparameters) -> merged tensor``; their
keyword-only signature is their schema. This file runs them one tensor at a time: for each name it loads that tensor
from the base and every model, hands the method float32 (float64 for float64 inputs) task vectors δ_t = θ_t − θ₀,
casts the result and streams it into the output shards, so neither the inputs nor the merged model are ever held
whole. Non-float tensors (position ids, counters) are copied from the base. Other kinds (learned, stream, lora,
inference) bring their own ``run(base=, models=, out=, **hp)``.

Per-model hyperparameters (``weights``, ``density``) take one value or one per model. Random methods declare a
``generator`` parameter; each tensor gets its own generator seeded from ``seed`` and the tensor's name, so a merge is
reproducible whatever the order or sharding of the inputs.
"""
from __future__ import annotations

import inspect
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .._device import parse_dtype, resolve_device
from .._errors import SubspacesError
from .._registry import MERGE
from ._io import Source, open_model
from ._shards import SHARD_BYTES, check_new_output, write_model

PER_MODEL = ("weights", "density")
# Tensors larger than this are merged in blocks of rows when the method allows it (see _TensorMerge.streamed), so
# the working set stays near (T + 2) blocks however large the embedding matrix is.
BLOCK_ELEMENTS = 1 << 20
def schema(fn) -> dict[str, Any]:
    """The hyperparameters of a tensor-wise method: its keyword-only parameters and defaults (a leading underscore
    marks what the core fills in)."""
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and not p.name.startswith("_")}


def _check_hyperparameters(method: str, fn, hp: dict[str, Any], n: int) -> dict[str, Any]:
    valid = schema(fn)
    allowed = (set(valid) - {"generator"}) | ({"seed"} if "generator" in valid else set())
    unknown = sorted(set(hp) - allowed)
    if unknown:
        raise SubspacesError(f"{method}: unknown hyperparameter {unknown[0]!r}; valid: {', '.join(sorted(allowed))}")
    hp = dict(hp)
    for key in PER_MODEL:
        if key in hp and hp[key] is not None:
            value = hp[key]
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise SubspacesError(f"{method}: {key} has {len(values)} values for {n} models")
            try:
                hp[key] = [float(v) for v in values]
            except (TypeError, ValueError):
                raise SubspacesError(f"{method}: {key}={value!r} must be numbers") from None
    return hp


def _check_inputs(base: Source | None, models: list[Source], dtype: torch.dtype | None) -> Source:
    ref = base if base is not None else models[0]
    keys = set(ref.keys())
    for src in models if base is not None else models[1:]:
        other = set(src.keys())
        if other != keys:
            extra, missing = sorted(other - keys), sorted(keys - other)
            what = f"has tensor {extra[0]!r} that {ref.name} lacks" if extra else f"lacks tensor {missing[0]!r}"
            raise SubspacesError(f"{src.name} {what}: all models must have the same tensors")
        for k in ref.keys():
            if src.shape(k) != ref.shape(k):
                raise SubspacesError(f"tensor {k!r} has shape {list(src.shape(k))} in {src.name} but "
                                     f"{list(ref.shape(k))} in {ref.name}")
            if dtype is None and src.dtype(k) != ref.dtype(k):
                raise SubspacesError(
                    f"mixed dtypes: tensor {k!r} is {str(src.dtype(k)).removeprefix('torch.')} in {src.name} but "
                    f"{str(ref.dtype(k)).removeprefix('torch.')} in {ref.name}; pass dtype= (YAML dtype:) to cast all "
                    "inputs to one")
    return ref


def _generator(seed: int, key: str, device: torch.device) -> torch.Generator:
    return torch.Generator(device).manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % 2**63)


class _TensorMerge:
    """One tensor-wise merge: validated inputs and the per-tensor computation."""

    def __init__(self, method: str, fn, base, models, hp, dtype, device) -> None:
        if not models:
            raise SubspacesError("models is empty: give at least one fine-tuned model")
        if base is None and getattr(fn, "needs_base", True):
            raise SubspacesError(f"{method} needs a base model (base=...; YAML base_model:)")
        self.fn, self.device, self.dtype = fn, resolve_device(device), parse_dtype(dtype)
        self.base = open_model(base, "base") if base is not None else None
        self.models = [open_model(m, f"model {i}") for i, m in enumerate(models)]
        self.ref = _check_inputs(self.base, self.models, self.dtype)
        self.hp = _check_hyperparameters(method, fn, hp, len(self.models))
        self.seed = self.hp.pop("seed", 0)
        self.random = "generator" in schema(fn)

    def out_dtype(self, key: str) -> torch.dtype:
        d = self.ref.dtype(key)
        return self.dtype if self.dtype is not None and d.is_floating_point else d

    def specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(k, self.ref.shape(k), self.out_dtype(k)) for k in self.ref.keys()]

    def inputs(self, key: str, start: int | None = None, stop: int | None = None):
        """(θ₀, [δ_t]) of one tensor, or of its rows start:stop, in the working precision on the device."""
        work = torch.float64 if self.ref.dtype(key) == torch.float64 else torch.float32
        read = (lambda src: src.get(key)) if start is None else (lambda src: src.rows(key, start, stop))
        # copy=True: in-memory inputs are the user's tensors and are updated in place below
        thetas = [read(m).to(self.device, work, copy=True) for m in self.models]
        if self.base is None:  # linear without a base: "task vectors" against zero
            return torch.zeros_like(thetas[0]), thetas
        b = read(self.base).to(self.device, work)
        return b, [t.sub_(b) for t in thetas]

    def float_keys(self) -> list[str]:
        return [k for k in self.ref.keys() if self.ref.dtype(k).is_floating_point]

    def __call__(self, key: str) -> torch.Tensor:
        if not self.ref.dtype(key).is_floating_point:
            return self.ref.get(key)
        base, deltas = self.inputs(key)
        kw = dict(self.hp)
        if self.random:
            kw["generator"] = _generator(self.seed, key, self.device)
        return self.fn(base, deltas, **kw).to(self.out_dtype(key)).cpu()

    def streamed(self, key: str) -> torch.Tensor | Iterator[torch.Tensor]:
        """The merged tensor, or for a large tensor of a row-wise method an iterator over blocks of its rows: the
        method gets its whole-tensor statistics first (``tensor_stats``, from streamed blocks), then each block."""
        shape = self.ref.shape(key)
        numel = math.prod(shape)
        if (not getattr(self.fn, "rowwise", False) or numel <= BLOCK_ELEMENTS or len(shape) < 2
                or self.ref.dtype(key) == torch.float64):
            return self(key)
        step = max(1, BLOCK_ELEMENTS // (numel // shape[0]))
        blocks = _Blocks(lambda: (self.inputs(key, a, a + step) for a in range(0, shape[0], step)), numel,
                         len(self.models))
        kw = dict(self.hp)
        if hasattr(self.fn, "tensor_stats"):
            kw.update(self.fn.tensor_stats(blocks, **kw))
        return (self.fn(b, d, **kw).to(self.out_dtype(key)).cpu() for b, d in blocks())


class _Blocks:
    """A re-iterable stream of (base rows, [δ_t rows]) over one tensor, with its size."""

    def __init__(self, make: Callable[[], Iterator], numel: int, n_models: int) -> None:
        self.make, self.numel, self.n_models = make, numel, n_models

    def __call__(self) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        return self.make()


def _describe(x: Any, what: str) -> str:
    return str(x) if isinstance(x, (str, Path)) else f"<in-memory {what}>"


def merge(method: str, *, base: Any = None, models: Sequence[Any], out: str | Path | None = None,
          dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu", progress: bool = False,
          shard_bytes: int = SHARD_BYTES, extra_files: dict[str, str] | None = None,
          **hyperparameters: Any) -> dict[str, torch.Tensor] | Any:
    """Merge fine-tuned ``models`` (paths, state dicts or modules) with ``method`` against ``base``.

    Returns the merged state dict (LoRA merges: the merged adapter; ``logit_fusion``: the fused model), or, with
    ``out``, writes a Hugging Face folder there (sharded safetensors, the base's config and tokenizer files,
    ``merge_config.json``; a PEFT folder for LoRA merges) and returns its path. ``dtype`` casts every input to one
    dtype (mixed dtypes are refused without it); the arithmetic runs in float32 on ``device``. ``shard_bytes`` caps
    each output shard; ``extra_files`` (name -> text) are written beside the weights.
    Methods and their hyperparameters: ``subspaces methods`` / ``ss.list_methods()``.
    """
    import subspaces.merge  # noqa: F401  (importing registers the methods)

    fn = MERGE.get(method).obj
    if getattr(fn, "kind", "tensor") != "tensor":  # learned, stream, lora, inference: the method's own run
        given = {"dtype": dtype, "device": None if str(device) == "cpu" else device, "progress": progress or None}
        result = fn.run(base=base, models=models, out=out, **{k: v for k, v in given.items() if v is not None},
                        **hyperparameters)
        return Path(out) if out is not None else result
    if out is not None:
        check_new_output(out)
    job = _TensorMerge(method, fn, base, list(models), hyperparameters, dtype, device)
    if hasattr(fn, "prepare"):  # model-wide statistics first (e.g. TIES trimming over the whole task vector)
        job.hp.update(fn.prepare((job.inputs(k) for k in job.float_keys()), **job.hp))
    keys = job.ref.keys()
    bar = _progress(len(keys), method) if progress else None
    try:
        if out is None:
            result = {}
            for k in keys:
                result[k] = job(k)
                if bar is not None:
                    bar.update(1)
            return result
        config = {"method": method, "hyperparameters": {**hyperparameters},
                  "base": _describe(base, "base") if base is not None else None,
                  "models": [_describe(m, f"model {i}") for i, m in enumerate(models)],
                  "dtype": str(job.dtype).removeprefix("torch.") if job.dtype else None}
        like = job.base.folder if job.base is not None else job.models[0].folder
        return write_model(out, ((k, job.streamed(k)) for k in keys), specs=job.specs(), like=like, config=config,
                           shard_bytes=shard_bytes, extra_files=extra_files, progress=bar)
    finally:
        if bar is not None:
            bar.close()


def _progress(total: int, method: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"merge {method}", unit="tensor")
