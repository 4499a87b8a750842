"""Shared machinery of the learned merges (AdaMerging, Concrete, aTLAS): merged weights as a differentiable function
of merging coefficients, run through ``torch.func.functional_call``, and test-time entropy minimization.

Merge rule (:func:`merge_params`): θ_k = θ0_k + Σ_t c[t, b(k)] · (m_k ⊙ τ_{t,k}) for every parameter k with a task
vector; ``coef`` is (T,) (one coefficient per task) or (T, B) with a block b(k) per parameter (default: each tensor its
own block, i.e. layer-wise); the optional mask m is shared by all tasks. Computed in float32 (at least) and cast to
θ0's dtype, so bf16 models work on CPU (aTLAS composes its own blocks: ``atlas.Composition``). The model is never
modified or wrapped. Inputs (task vectors, batches, heads, forward, ``run``): ``_learned_inputs``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ._learned_inputs import Batches, forward, heads, prepare, run_learned, task_vectors  # noqa: F401


@dataclasses.dataclass
class LearnedMerge:
    state_dict: dict[str, torch.Tensor]  # every key of the base model's state dict, base dtypes
    coefficients: torch.Tensor  # (T,) or (T, P), as applied (after clamping)
    losses: list[float]  # summed entropy over the tasks, one per step
    mask: dict[str, torch.Tensor] | None = None  # Concrete: the final (rescaled) mask


def merge_params(base: Mapping[str, torch.Tensor], tvs: Sequence[Mapping[str, torch.Tensor]], coef: torch.Tensor,
                 *, blocks: Mapping[str, int] | None = None,
                 mask: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """θ0 + Σ_t c[t, b(k)] (m ⊙ τ_t) for the keys of the task vectors; differentiable in ``coef`` and ``mask``."""
    keys = list(tvs[0])
    blocks = blocks if blocks is not None else {k: i for i, k in enumerate(keys)}
    out = {}
    for k in keys:
        c = coef if coef.dim() == 1 else coef[:, blocks[k]]
        work = torch.promote_types(torch.promote_types(coef.dtype, tvs[0][k].dtype), torch.float32)
        delta = sum(c[t].to(work) * tv[k].to(work) for t, tv in enumerate(tvs))
        if mask is not None:  # one mask shared by every task: m ⊙ Σ c τ = Σ c (m ⊙ τ)
            delta = mask[k].to(work) * delta
        out[k] = (base[k].to(work) + delta).to(base[k].dtype)
    return out


def merged_state_dict(model: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's full state dict with ``params`` substituted (tied aliases too), as detached copies."""
    canon = {id(p): k for k, p in model.named_parameters()}
    alias = {k: canon[id(p)] for k, p in model.named_parameters(remove_duplicate=False)}
    return {k: params.get(alias.get(k, k), v).detach().clone() for k, v in model.state_dict().items()}


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the last axis, in float32 (leading axes flattened)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


def entropy_grads(model: nn.Module, params: Mapping[str, torch.Tensor], leaves: Sequence[torch.Tensor],
                  batches: Batches, fns: Sequence[Callable]) -> tuple[float, list[torch.Tensor]]:
    """Σ_t H(head_t(model(x_t; params))) on the next batch of every task, and its gradient w.r.t. ``leaves``.

    One backward per task (the merge graph is kept between them): one task's activations are alive at a time.
    ``torch.autograd.grad`` leaves every ``.grad`` (heads, θ0) untouched."""
    device = next(iter(params.values())).device
    total, grads = 0.0, [torch.zeros_like(x) for x in leaves]
    for t, head in enumerate(fns):
        loss = entropy_loss(forward(model, params, batches.next(t), head, device)[0])
        gs = torch.autograd.grad(loss, list(leaves), retain_graph=t < len(fns) - 1, allow_unused=True)
        grads = [a if g is None else a + g for a, g in zip(grads, gs)]
        total += loss.item()
    return total, grads


def adam_step(opt: torch.optim.Optimizer, leaves: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    for x, g in zip(leaves, grads):
        x.grad = g
    opt.step()
    opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def learning(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout: predictions as at test time) with gradients on; the model's mode is restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, was in modes:
            m.training = was


def steps(n: int, progress: bool, desc: str) -> Iterable[int]:
    if not progress:
        return range(n)
    from tqdm.auto import trange

    return trange(n, desc=desc)


def minimize_entropy(model: nn.Module, params_fn: Callable[[], Mapping[str, torch.Tensor]],
                     leaves: Sequence[torch.Tensor], batches: Batches, fns: Sequence[Callable], *, n_steps: int,
                     lr: float, progress: bool = False, desc: str = "entropy") -> list[float]:
    """Adam on ``leaves`` for ``n_steps``; each step re-merges (``params_fn()``) and sums the tasks' entropies."""
    opt = torch.optim.Adam(list(leaves), lr=lr)
    losses = []
    with learning(model):
        for _ in steps(n_steps, progress, desc):
            loss, grads = entropy_grads(model, params_fn(), leaves, batches, fns)
            adam_step(opt, leaves, grads)
            losses.append(loss)
    return losses
