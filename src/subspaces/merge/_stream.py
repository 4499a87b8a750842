"""Continual ("stream") merges: fold fine-tuned models in one at a time and look at the merge after each.

``merge_stream(method, base=..., models=...)`` returns a generator that yields a :class:`StreamStep` (the merged
state dict, plus what the method reports) after every model, so a user can evaluate after every task. Only the base,
the method's running state (one model's worth of tensors) and the incoming model are held: ``models`` may be a lazy
iterable (paths are read one tensor at a time). A stream method registers an object with ``kind = "stream"``,
``stream(*, base, models, **hp)`` (validates eagerly, returns the generator) and ``run(*, base, models, out, **hp)``;
the shared parts (hyperparameter checks, task order, dtypes, the final write) are here.
"""
from __future__ import annotations

import inspect
import os
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._errors import SubspacesError
from .._registry import MERGE
from .._device import parse_dtype
from ._io import Source, open_model
from ._shards import check_new_output, write_model


class StreamStep(dict):
    """The merged state dict after ``step`` models (a plain ``dict[str, Tensor]``, loadable as is).

    ``index`` is the position in ``models`` of the model folded in at this step (differs from ``step - 1`` when the
    order is shuffled); ``info`` holds the method's scalars (e.g. OPCM's λ_t and task-vector norms).
    """

    def __init__(self, tensors: dict[str, Tensor], *, step: int, index: int, info: dict[str, float]) -> None:
        super().__init__(tensors)
        self.step, self.index, self.info = step, index, info

    def __repr__(self) -> str:
        return f"StreamStep(step={self.step}, index={self.index}, tensors={len(self)}, info={self.info})"


def merge_stream(method: str, *, base: Any, models: Iterable[Any], **hp: Any) -> Iterator[StreamStep]:
    """Merge ``models`` (paths, state dicts or modules, consumed one at a time) into ``base`` with a continual method.

    Yields the merged state dict after each model. Example::

        for merged in ss.merge_stream("opcm", base="base/", models=paths, alpha=0.5):
            model.load_state_dict(merged); evaluate(model, tasks[: merged.step])
    """
    import subspaces.merge  # noqa: F401  (importing registers the methods)

    entry = MERGE.get(method)
    kind = getattr(entry.obj, "kind", "tensor")
    if kind != "stream":
        streams = sorted(e.name for e in MERGE.entries() if getattr(e.obj, "kind", None) == "stream")
        raise SubspacesError(f"merge_stream: method {method!r} is of kind {kind!r}, not a stream method; "
                             f"stream methods: {', '.join(streams)} (use ss.merge for the others)")
    check_hyperparameters(method, entry.obj.stream, hp)
    return entry.obj.stream(base=base, models=models, **hp)


def check_hyperparameters(method: str, fn: Callable, hp: dict[str, Any]) -> None:
    valid = sorted(p.name for p in inspect.signature(fn).parameters.values()
                   if p.kind is p.KEYWORD_ONLY and p.name not in ("base", "models"))
    unknown = sorted(set(hp) - set(valid))
    if unknown:
        raise SubspacesError(f"{method}: unknown hyperparameter {unknown[0]!r}; valid: {', '.join(valid)}")


def order(models: Iterable[Any], shuffle_order: bool, seed: int | None) -> Iterable[tuple[int, Any]]:
    """(index, model) pairs in arrival order, or shuffled as fusion-bench does (``random.seed(seed)`` then
    ``random.shuffle``; a private ``random.Random(seed)`` draws the same permutation without touching global state).
    Shuffling needs the whole list, so pass paths rather than loaded models then."""
    if not shuffle_order:
        return enumerate(models)
    items = list(enumerate(models))
    random.Random(seed).shuffle(items)
    return items


class Base:
    """The base model θ₀ seen by a stream: float keys to merge, compute/output dtypes, the compute device."""

    def __init__(self, base: Any, *, device: Any, dtype: Any) -> None:
        self.src: Source = open_model(base, "base")
        self.keys = [k for k in self.src.keys() if self.src.dtype(k).is_floating_point]
        self.device = None if device is None else torch.device(device)
        self.dtype = parse_dtype(dtype)

    def work_dtype(self, key: str) -> torch.dtype:
        # float32 arithmetic for half types (SVD has no bf16/fp16 kernels on CPU), float64 kept
        return torch.promote_types(self.src.dtype(key), torch.float32)

    def get(self, key: str, src: Source | None = None, copy: bool = False) -> Tensor:
        src = self.src if src is None else src
        t = src.get(key)
        return t.to(self.device or t.device, self.work_dtype(key), copy=copy)

    def task_vector(self, src: Source, key: str) -> Tensor:
        if key not in src.keys():
            raise SubspacesError(f"{src.name} lacks tensor {key!r} of the base: all models need the base's tensors")
        if src.shape(key) != self.src.shape(key):
            raise SubspacesError(f"tensor {key!r} has shape {list(src.shape(key))} in {src.name} but "
                                 f"{list(self.src.shape(key))} in the base")
        return self.get(key, src, copy=True).sub_(self.get(key))  # copy: never write into the caller's tensors

    def merged(self, deltas: dict[str, Tensor], scale: float = 1.0) -> dict[str, Tensor]:
        """θ₀ + scale·Δ in the output dtype; non-float tensors (position ids, counters) come from the base."""
        out = {}
        for k in self.src.keys():
            if k in deltas:
                dt = self.dtype or self.src.dtype(k)
                d = deltas[k] if scale == 1.0 else deltas[k] * scale
                out[k] = (self.get(k) + d).to(dt)
            else:
                out[k] = self.src.get(k)
        return out


def sq_norm(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2


def run_stream(method: str, stream: Callable[..., Iterator[StreamStep]], *, base: Any, models: Iterable[Any],
               out: str | os.PathLike | None = None, **hp: Any) -> dict[str, Tensor] | Path:
    """Run a stream to its end: the final merged state dict, or the written folder's path when ``out`` is given."""
    if out is not None:
        check_new_output(out)
    last = None
    for last in stream(base=base, models=models, **hp):
        pass
    assert last is not None  # the stream raises on an empty ``models``
    if out is None:
        return dict(last)
    like = Path(base) if isinstance(base, (str, os.PathLike)) else None
    if like is not None and like.is_file():
        like = None
    config = {"method": method, "hyperparameters": {k: v if isinstance(v, (int, float, str, bool, type(None)))
                                                    else repr(v) for k, v in hp.items()},
              "steps": last.step, "info": last.info}
    return write_model(out, dict(last), like=like, config=config)


class StreamMethod:
    """Base of a registered stream method: ``stream`` (a staticmethod) yields the steps; ``run`` goes to the end."""

    kind = "stream"
    registry_name: str  # set by MERGE.register
    stream: Callable[..., Iterator[StreamStep]]

    @classmethod
    def run(cls, *, base: Any, models: Iterable[Any], out: Any = None, **hp: Any) -> dict[str, Tensor] | Path:
        check_hyperparameters(cls.registry_name, cls.stream, hp)
        return run_stream(cls.registry_name, cls.stream, base=base, models=models, out=out, **hp)


def require_models(t: int, method: str) -> None:
    if t == 0:
        raise SubspacesError(f"{method}: models is empty; give at least one fine-tuned model")
