"""Optimizer-state memory: measured (``state_bytes``) and predicted from each projector's formula
(``expected_state_bytes``). Both count non-scalar tensors only: step counters and seeds are 0-d and left out."""
from __future__ import annotations

import torch
from torch import Tensor

from .._errors import SubspacesError


def _tensor_bytes(obj: object) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size() if obj.ndim > 0 else 0
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer``'s state (moments, projector bases and indices), measured from its tensors."""
    from ._projected import Projected

    if isinstance(optimizer, Projected):
        return state_bytes(optimizer.inner) + sum(_tensor_bytes(s) for _, _, s in optimizer.projector_states())
    inner = getattr(optimizer, "inner", None)  # wrappers that step another optimizer (restarts, SST)
    if isinstance(inner, torch.optim.Optimizer):
        return state_bytes(inner)
    return sum(_tensor_bytes(s) for s in optimizer.state.values())


def moments_per_element(optimizer: torch.optim.Optimizer, group: dict) -> int:
    """How many tensors of a parameter's size the optimizer keeps per parameter (Adam 2, SGD+momentum 1)."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return 3 if group.get("amsgrad") else 2
    if isinstance(optimizer, torch.optim.SGD):
        return 1 if group.get("momentum", 0) else 0
    if isinstance(optimizer, (torch.optim.RMSprop, torch.optim.Adagrad)):
        return 1
    raise SubspacesError(f"no state formula for {type(optimizer).__name__}; use state_bytes() to measure it")


def expected_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The analytic state size after every parameter has stepped once: for a projected W (m, n) with Adam,
    ``2 · numel(proxy)`` moments (GaLore: 2·r·max(m, n)) plus the projector's own state (GaLore: r·min(m, n)
    floats; DCT: r int32 indices), and ``2 · numel(p)`` for every parameter that is not projected."""
    from ._projected import Projected

    if isinstance(optimizer, Projected):
        inner = optimizer.inner
        total = 0
        for g in inner.param_groups:
            k = moments_per_element(inner, g)
            total += sum(k * p.numel() * p.element_size() for p in g["params"])
        for p, proj, _ in optimizer.projector_states():
            total += proj.state_bytes(p.shape, p.dtype)
        return total
    inner = getattr(optimizer, "inner", None)
    if isinstance(inner, torch.optim.Optimizer):
        return expected_state_bytes(inner)
    return sum(moments_per_element(optimizer, g) * p.numel() * p.element_size()
               for g in optimizer.param_groups for p in g["params"])
