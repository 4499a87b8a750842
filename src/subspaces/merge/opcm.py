"""OPCM: continual model merging by orthogonal projection.

Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable Continual Model
Merging", NeurIPS 2025, https://arxiv.org/abs/2501.09522. Official code: https://github.com/tanganke/fusion_bench
(``fusion_bench/method/opcm/opcm.py``, ``OPCMForCLIP``).

Rule, for a linear weight with merged task vector Δ = U S Vᵀ and incoming task vector τ (Δ_1 = τ_1, λ_1 = 1):
    Δ_t = (λ_{t−1} Δ_{t−1} + U P Vᵀ) / λ_t,  P = Uᵀ τ V with P_ii = 0 ∀i and P[:k, :k] = 0,
k = argmax_i [Σ_{j≤i} s_j / Σ_j s_j > α] (0-based); every other float tensor uses P = τ (no projection), and
λ_t = ‖λ_{t−1}Δ_{t−1} + τ̃‖ / mean(‖τ_1‖..‖τ_t‖) (norms over the whole model), so ‖Δ_t‖ = mean_i ‖τ_i‖ exactly.

State between models: θ₀ (lazy if given as a path), Δ (one model's worth of tensors), λ, Σ‖τ_i‖ and t, whatever T is.

Deliberate deviations (none change the result beyond rounding on full-rank updates):
- Thin SVD: τ̃ = τ − U_r M V_rᵀ with M = (U_rᵀ τ V_r) restricted to the top-left k×k block and the diagonal,
  r = min(m, n). The official code builds full m×m and n×n factors; the columns beyond r never touch the block or
  the diagonal, so the result is the same up to rounding (and to the arbitrary basis of repeated/zero singular
  values, where the official result depends on the LAPACK driver too), at O(mn) memory instead of O(m² + n²).
- Works on state dicts: "linear weights" are the ``nn.Linear`` weights when ``base`` is an ``nn.Module``, otherwise
  2-D ``*.weight`` tensors outside embedding modules (override with ``linear=``). Every other float tensor
  (biases, norms, embeddings, float buffers) follows the running-sum rule; the official code skips parameters
  registered directly on non-leaf modules (e.g. CLIP's ``class_embedding``, which it only rescales) and float buffers.
- Δ is kept in float32 (float64 for float64 inputs) across steps; the official code stores the merge in the model
  dtype. α ≥ 1 is refused: the official argmax over an all-False mask then silently protects nothing.
- ``shuffle_order`` defaults to False (a stream arrives in its own order); True with ``seed`` draws fusion-bench's
  permutation (``random.seed(seed); random.shuffle(names)``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .._errors import SubspacesError
from .._registry import MERGE
from ._stream import Base, StreamMethod, StreamStep, order, require_models, sq_norm

PAPER = "https://arxiv.org/abs/2501.09522"
_EMBEDDING_MODULES = ("wte", "wpe", "shared")


def split_rank(s: Tensor, alpha: float) -> int:
    """k: the first (0-based) index where the cumulative singular-value mass exceeds α (0 when Δ = 0)."""
    total = s.sum()
    if total <= 0:
        return 0
    return int((s.cumsum(0) / total > alpha).float().argmax())


def project(delta: Tensor, tau: Tensor, alpha: float) -> Tensor:
    """τ̃: τ without its components on the top-k block and on every singular pair (u_i, v_i) of ``delta``."""
    work = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
    U, s, Vh = torch.linalg.svd(work, full_matrices=False, driver="gesvd" if work.is_cuda else None)
    k = split_rank(s, alpha)
    C = U.T @ tau.to(work.dtype) @ Vh.T
    M = torch.diag_embed(C.diagonal())
    M[:k, :k] = C[:k, :k]
    return (tau - U @ M @ Vh).to(tau.dtype)


def linear_keys(base: Any, b: Base, linear: Iterable[str] | Callable[[str, tuple], bool] | None) -> set[str]:
    keys = set(b.keys)
    if callable(linear):
        return {k for k in b.keys if linear(k, b.src.shape(k))}
    if linear is not None:
        chosen = set(linear)
        bad = sorted(k for k in chosen if k not in keys or len(b.src.shape(k)) != 2)
        if bad:
            raise SubspacesError(f"opcm: linear={bad[0]!r} is not a 2-D float tensor of the base")
        return chosen
    if isinstance(base, nn.Module):
        return {f"{n}.weight" if n else "weight" for n, m in base.named_modules() if isinstance(m, nn.Linear)} & keys

    def is_embedding(key: str) -> bool:
        module = key.rsplit(".", 2)[-2].lower() if "." in key else ""
        return "embed" in module or module in _EMBEDDING_MODULES

    return {k for k in b.keys if len(b.src.shape(k)) == 2 and k.endswith("weight") and not is_embedding(k)}


def stream(*, base: Any, models: Iterable[Any], alpha: float = 0.5, shuffle_order: bool = False,
           seed: int | None = None, linear: Iterable[str] | Callable[[str, tuple], bool] | None = None,
           device: Any = None, dtype: Any = None) -> Iterator[StreamStep]:
    """OPCM over ``models`` (paths, state dicts or modules, read one at a time); yields the merge after each.

    alpha: fraction of the merged update's singular-value mass whose top block is protected, in [0, 1).
    linear: keys that get the projection (default: nn.Linear weights / 2-D non-embedding ``*.weight``), or a
    predicate ``(key, shape) -> bool``. device: where the arithmetic runs (default: where the tensors are).
    dtype: output dtype of float tensors (default: the base's). ``info`` reports lambda, task_vector_norm (n_t),
    avg_task_vector_norm (n̄, = ‖θ_t − θ₀‖).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < 1:
        raise SubspacesError(f"opcm: alpha={alpha!r}; allowed: a number in [0, 1) (0.5 in the paper)")
    b = Base(base, device=device, dtype=dtype)
    lin = linear_keys(base, b, linear)
    return _opcm(b, lin, order(models, shuffle_order, seed), float(alpha))


def _opcm(b: Base, lin: set[str], models: Iterable[tuple[int, Any]], alpha: float) -> Iterator[StreamStep]:
    from ._io import open_model

    delta: dict[str, Tensor] = {}
    lam, norm_sum, t = 1.0, 0.0, 0
    for index, model in models:
        src = open_model(model, f"models[{index}]")
        t += 1
        sq_tau = sq_new = 0.0
        for k in b.keys:
            tau = b.task_vector(src, k)
            sq_tau += sq_norm(tau)
            if t == 1:
                delta[k] = tau  # θ^(1) = θ₁
                continue
            if k in lin:
                tau = project(delta[k], tau, alpha)  # the SVD needs Δ_{t−1}: project before updating it
            delta[k].mul_(lam).add_(tau)  # un-normalized: λ_{t−1} Δ_{t−1} + τ̃ (temporary λ_t = 1)
            sq_new += sq_norm(delta[k])
        src = tau = None  # drop the incoming model before yielding
        norm_sum += math.sqrt(sq_tau)
        avg = norm_sum / t
        if t > 1:
            total = math.sqrt(sq_new)
            lam = total / avg if avg > 0 else 1.0
            if total > 0:
                for d in delta.values():
                    d.mul_(avg / total)
        yield StreamStep(b.merged(delta), step=t, index=index,
                         info={"lambda": lam, "task_vector_norm": math.sqrt(sq_tau), "avg_task_vector_norm": avg})
    require_models(t, "opcm")


@MERGE.register("opcm", paper=PAPER, status="complete")
class OPCM(StreamMethod):
    """Registry entry: ``ss.merge_stream("opcm", ...)`` yields after each model; ``ss.merge("opcm", ...)`` runs to the
    end (and writes ``out``)."""

    stream = staticmethod(stream)
