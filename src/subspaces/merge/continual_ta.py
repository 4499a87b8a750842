"""Continual task arithmetic: the sequential task-arithmetic baseline of OPCM's paper.

Baseline of Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable Continual
Model Merging", NeurIPS 2025, https://arxiv.org/abs/2501.09522 (task arithmetic itself: Ilharco et al., "Editing
Models with Task Arithmetic", https://arxiv.org/abs/2212.04089). Official code: https://github.com/tanganke/fusion_bench
(``fusion_bench/method/opcm/task_arithmetic.py``, ``ContinualTaskArithmeticForCLIP``).

Rule: θ^(t) = θ^(t−1) + λ τ_t = θ₀ + λ Σ_{i≤t} (θ_i − θ₀), λ = 0.3 in the paper. This is the running *sum* variant
(what the official code and the paper's "Continual TA" rows use), not the running average: the merged task vector
grows with t, which is exactly what OPCM's adaptive λ_t corrects. The state is θ₀ and the running sum Σ τ_i.

Deviations: every float tensor of the state dict is summed (the official code sums the parameters with
``requires_grad`` and leaves buffers at θ₀); the sum is kept in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor

from .._errors import SubspacesError
from .._registry import MERGE
from ._stream import Base, StreamMethod, StreamStep, order, require_models

PAPER = "https://arxiv.org/abs/2501.09522"


def stream(*, base: Any, models: Iterable[Any], scaling: float = 0.3, shuffle_order: bool = False,
           seed: int | None = None, device: Any = None, dtype: Any = None) -> Iterator[StreamStep]:
    """Continual task arithmetic over ``models`` (read one at a time); yields θ₀ + scaling·Σ τ_i after each.

    device: where the arithmetic runs (default: where the tensors are); dtype: output dtype of float tensors.
    """
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise SubspacesError(f"continual_ta: scaling={scaling!r}; allowed: a number (0.3 in the OPCM paper)")
    b = Base(base, device=device, dtype=dtype)
    return _continual_ta(b, order(models, shuffle_order, seed), float(scaling))


def _continual_ta(b: Base, models: Iterable[tuple[int, Any]], scaling: float) -> Iterator[StreamStep]:
    from ._io import open_model

    total: dict[str, Tensor] = {}
    t = 0
    for index, model in models:
        src = open_model(model, f"models[{index}]")
        t += 1
        for k in b.keys:
            tau = b.task_vector(src, k)
            total[k] = tau if t == 1 else total[k].add_(tau)
        src = tau = None  # drop the incoming model before yielding
        yield StreamStep(b.merged(total, scaling), step=t, index=index, info={"scaling": scaling})
    require_models(t, "continual_ta")


@MERGE.register("continual_ta", paper=PAPER, status="complete")
class ContinualTA(StreamMethod):
    """Registry entry: ``ss.merge_stream("continual_ta", ...)`` / ``ss.merge("continual_ta", ...)``."""

    stream = staticmethod(stream)
