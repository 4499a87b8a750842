"""Inputs of the learned merges (AdaMerging, Concrete, aTLAS; see ``_learned``): task vectors from the models, one
batch → (model inputs, labels) on the model's device, the model run at given parameters, per-task logits callables,
endless per-task batches, hyperparameter checks and the registry ``run`` / output writing.

A batch is ``inputs``, ``(inputs, labels)`` or a dict of model kwargs whose "labels"/"label" entry is taken out as the
labels; inputs are a Tensor (``model(x)``), a tuple (``model(*x)``) or a dict (``model(**x)``). Only aTLAS reads
labels. Logits: per task a callable ``head(output)`` or ``head(output, inputs)`` (e.g. the task's own classifier on
the mean-pooled hidden states of a shared backbone); default: the output itself or its ``.logits``.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .._errors import SubspacesError, did_you_mean
from ._io import open_model
from ._shards import check_new_output, write_model

INPUTS = ("data", "logits", "progress")  # arguments of a learned merge that are not hyperparameters
_LABEL_KEYS = ("labels", "label")


def task_vectors(model: nn.Module, models: Sequence[Any]) -> list[dict[str, torch.Tensor]]:
    """τ_t = θ_t − θ0 for every floating-point parameter of ``model`` (θ0; tied weights once), in θ0's dtype and
    device. ``models``: state dicts, safetensors paths or modules with (at least) the model's parameter names."""
    base = {k: p.detach() for k, p in model.named_parameters() if p.is_floating_point()}
    out = []
    for i, m in enumerate(models):
        src = open_model(m, f"models[{i}]")
        missing = [k for k in base if k not in set(src.keys())]
        if missing:
            raise SubspacesError(f"models[{i}] lacks {missing[0]!r} ({len(missing)} of the base model's {len(base)} "
                                 f"parameters; its keys look like {sorted(src.keys())[:2]}): give weights of the base "
                                 "model's architecture, with the same names")
        tv = {}
        for k, b in base.items():
            if tuple(src.shape(k)) != tuple(b.shape):
                raise SubspacesError(f"models[{i}]: {k!r} has shape {list(src.shape(k))}, base has {list(b.shape)}")
            tv[k] = (src.get(k).to(b.device, torch.float32) - b.float()).to(b.dtype)
        out.append(tv)
    return out


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    return type(x)(to_device(v, device) for v in x) if isinstance(x, (tuple, list)) else x


def split(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """(inputs, labels or None) of one batch: a dict loses its label keys; ``(inputs, labels)`` is split."""
    if isinstance(batch, Mapping):
        labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        return {k: v for k, v in batch.items() if k not in _LABEL_KEYS}, labels
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def call(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Any) -> Any:
    """``model(inputs)`` with ``params`` in place of its own tensors (the others stay the model's)."""
    if isinstance(inputs, Mapping):
        return functional_call(model, dict(params), (), dict(inputs), strict=False)
    return functional_call(model, dict(params), tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,),
                           strict=False)


def forward(model: nn.Module, params: Mapping[str, torch.Tensor], batch: Any, head: Callable,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, labels or None) of ``model`` at ``params`` on one batch, moved to ``device``."""
    inputs, labels = to_device(split(batch), device)
    return head(call(model, params, inputs), inputs), labels


def default_logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    raise SubspacesError(f"cannot find logits in a model output of type {type(output).__name__}; pass logits=[...] "
                         "(per task a callable mapping the output, or (output, inputs), to logits)")


def _two_args(fn: Callable) -> bool:
    try:
        ps = inspect.signature(fn.forward if isinstance(fn, nn.Module) else fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in ps) >= 2 or any(
        p.kind is p.VAR_POSITIONAL for p in ps)


def heads(logits: Any, tasks: int | Sequence[Any]) -> list[Callable[[Any, Any], torch.Tensor]]:
    """One ``(output, inputs) -> logits`` per task. ``tasks`` a count n: ``logits`` is None, one callable or a
    sequence of n; ``tasks`` the task keys (aTLAS): ``logits`` is None, one callable or ``{task: callable}``."""
    if not isinstance(tasks, int):
        if isinstance(logits, Mapping) and (missing := [t for t in tasks if t not in logits]):
            raise SubspacesError(f"logits: no head for task {missing[0]!r}; heads are given for "
                                 f"{sorted(map(str, logits))}")
        return [heads(logits[t] if isinstance(logits, Mapping) else logits, 1)[0] for t in tasks]
    fns = [logits] * tasks if logits is None or callable(logits) else list(logits)
    if len(fns) != tasks or not all(f is None or callable(f) for f in fns):
        raise SubspacesError(f"logits: give one callable per model ({tasks}), one callable for all, or None")
    return [(lambda o, x: default_logits(o)) if f is None else f if _two_args(f) else (lambda o, x, f=f: f(o))
            for f in fns]


class Batches:
    """Endless batches per task: an iterable is restarted when it runs out (a shuffling loader reshuffles)."""

    def __init__(self, data: Any, n: int) -> None:
        if not isinstance(data, (list, tuple)) or len(data) != n:
            raise SubspacesError(f"data: give a list of {n} iterables of unlabelled batches, one per model "
                                 f"(got {type(data).__name__})")
        self.data, self.its = list(data), [iter(d) for d in data]

    def next(self, t: int) -> Any:
        for _ in range(2):
            try:
                return next(self.its[t])
            except StopIteration:
                self.its[t] = iter(self.data[t])
        raise SubspacesError(f"data[{t}] has no batches")


@dataclasses.dataclass
class Job:
    """The checked inputs of a learned merge."""
    config: Any
    tvs: list[dict[str, torch.Tensor]]
    fns: list[Callable]
    batches: Batches


def config_of(method: str, config: type, hp: Mapping, inputs: Sequence[str] = INPUTS) -> Any:
    """``config(**hp)``; an unknown key is an error naming the close ones (``inputs``: the other arguments)."""
    valid = [f.name for f in dataclasses.fields(config)]
    for k in hp:
        if k not in valid:
            raise SubspacesError(f"{method}: unknown hyperparameter {k!r}." + did_you_mean(k, valid + list(inputs)))
    return config(**hp)


def check_model(method: str, model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise SubspacesError(f"{method} needs base= an nn.Module (the model it runs; θ0 = its weights), got "
                             f"{type(model).__name__}")


def prepare(method: str, config: type, model: Any, models: Any, data: Any, logits: Any, hp: Mapping) -> Job:
    """Validate a learned merge's inputs; ``models`` may be a dict, with ``data``/``logits`` dicts keyed alike."""
    cfg = config_of(method, config, hp)
    check_model(method, model)
    if data is None:
        raise SubspacesError(f"{method} needs data=[...]: one iterable of unlabelled test batches per model")
    if isinstance(models, Mapping):
        for name, v in (("data", data), ("logits", logits)):
            if isinstance(v, Mapping) and set(v) != set(models):
                raise SubspacesError(f"{name} has keys {sorted(map(str, v))}, models {sorted(map(str, models))}")
        data, logits = ([v[n] for n in models] if isinstance(v, Mapping) else v for v in (data, logits))
        models = models.values()
    models = list(models)
    if not models:
        raise SubspacesError(f"{method}: models is empty; give at least one fine-tuned model")
    return Job(cfg, task_vectors(model, models), heads(logits, len(models)), Batches(data, len(models)))


def save(out: Any, method: str, models: Any, result: Any, hyperparameters: Mapping, **extra: Any) -> None:
    """Write ``result.state_dict`` to ``out`` (config/tokenizer from the first model given as a path) with the
    hyperparameters, coefficients, final loss and ``extra`` in merge_config.json."""
    ms = list(models.values()) if isinstance(models, Mapping) else list(models)
    like = next((m for m in ms if isinstance(m, str) or hasattr(m, "__fspath__")), None)
    cfg = {"method": method, "hyperparameters": dict(hyperparameters), "coefficients": result.coefficients.tolist(),
           "final_loss": result.losses[-1] if result.losses else None, **extra}
    write_model(out, result.state_dict, like=like, config=cfg)


def run_learned(method: str, fn: Callable, *, base: Any, models: Any, out: Any = None,
                **hp: Any) -> dict[str, torch.Tensor]:
    """A registry ``run``: ``fn(base, models, **hp)``; with ``out``, also writes the merged model there."""
    if out is not None:
        check_new_output(out)  # fail before training, not after
    models = models if isinstance(models, Mapping) else list(models)
    result = fn(base, models, **hp)
    if out is not None:
        save(out, method, models, result, {k: v for k, v in hp.items() if k not in INPUTS})
    return result.state_dict
