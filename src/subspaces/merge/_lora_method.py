"""What the LoRA merges (lora_svd, lora_cat, lora_lego) share: the registry entry with its hyperparameter checks,
per-module factors with each adapter's weight and scale folded into B, and the final PeftLoRA / folder."""
from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._errors import SubspacesError
from ._shards import check_new_output
from ._lora import LoRASet, PeftLoRA, build, write_peft


def check_out(out: Any) -> None:
    """Refuse an existing ``out`` before any work (nothing is written on bad input)."""
    if out is not None:
        check_new_output(out)


def check_weights(weights: Any, n: int, method: str) -> list[float]:
    """One weight per adapter (default 1: the plain sum)."""
    if weights is None:
        return [1.0] * n
    values = list(weights) if isinstance(weights, (list, tuple)) else [weights] * n
    if len(values) != n or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                   for v in values):
        raise SubspacesError(f"{method}: weights={weights!r} must be one finite number or one per adapter ({n})")
    return [float(v) for v in values]


def work_dtype(sets: list[LoRASet]) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype: float32 at least, output dtype: the inputs' common dtype, else float32)."""
    dtypes = {t.dtype for s in sets for f in s.modules.values() for t in (f.A, f.B)}
    out = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return torch.promote_types(out, torch.float32), out


def factors(sets: list[LoRASet], name: str, weights: list[float], work: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """Module ``name`` of every adapter as matrices (A_i (r_i, d_in), w_i s_i B_i (d_out, r_i)) in ``work``."""
    fs = [s.modules[name] for s in sets]
    return [(f.A.flatten(1).to(work), f.B.flatten(1).to(work) * (w * f.scaling)) for f, w in zip(fs, weights)]


def finish(method: str, sets: list[LoRASet], merged: dict[str, tuple[Tensor, Tensor]], report: list[dict], *,
           dtype: torch.dtype, base: Any, out: Any, models: Any, hp: dict[str, Any]) -> PeftLoRA:
    """The merged matrices ``{module: (A (k, d_in), B (d_out, k))}`` reshaped to the inputs' layout (conv kernels)
    as a PeftLoRA at scale 1, written to ``out`` when given."""
    shaped = {}
    for name, (A, B) in merged.items():
        ref, k = sets[0].modules[name], A.shape[0]
        shaped[name] = (A.reshape(k, *ref.A.shape[1:]), B.reshape(ref.B.shape[0], k, *ref.B.shape[2:]))
    embedding = {n for n, f in sets[0].modules.items() if f.embedding}
    base_name = str(base) if isinstance(base, (str, Path)) else sets[0].base
    result = build(shaped, fan_in_fan_out=sets[0].fan_in_fan_out, base=base_name, embedding=embedding, dtype=dtype,
                   report=report)
    if out is not None:
        described = [str(m) if isinstance(m, (str, Path)) else f"<in-memory {type(m).__name__}>" for m in models]
        write_peft(out, result, info={"method": method, "hyperparameters": hp, "models": described})
    return result


class LoRAMethod:
    """Registry entry of a LoRA merge (kind "lora"): ``run`` checks the hyperparameters against ``fn``'s
    keyword-only parameters (those without a default are required) and calls ``fn(models, base=, out=, **hp)``."""

    kind = "lora"
    fn: Any

    @classmethod
    def run(cls, *, base: Any = None, models: Any, out: Any = None, **hp: Any) -> PeftLoRA:
        params = {p.name: p for p in inspect.signature(cls.fn).parameters.values()
                  if p.kind is p.KEYWORD_ONLY and p.name not in ("base", "out")}
        name = cls.registry_name
        unknown = sorted(set(hp) - set(params))
        if unknown:
            raise SubspacesError(f"{name}: unknown hyperparameter {unknown[0]!r}; valid: {', '.join(sorted(params))}")
        missing = [n for n, p in params.items() if p.default is p.empty and n not in hp]
        if missing:
            raise SubspacesError(f"{name}: {missing[0]} is required")
        return cls.fn(models, base=base, out=out, **hp)
