"""Random: a seeded Gaussian random projection, the cheap baseline projector (no SVD, no stored basis).

The projection is the one of APOLLO (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
https://arxiv.org/abs/2412.05270, official code https://github.com/zhuhanqing/APOLLO): a matrix ``P`` (s, r) with
i.i.d. entries N(0, 1/r), redrawn every T steps from a seed (Flora, https://arxiv.org/abs/2402.03293, uses the same).

Update (W (m, n), m >= n; the wide case projects on the left): every T steps a fresh ``P`` (n, r);
``R = G P`` (m, r); Adam on R gives N; ``W ← W − η α N Pᵀ``; then ``W ← W − η λ W``.
Since ``E[P Pᵀ] = I``, the back-projected gradient ``G P Pᵀ`` is an unbiased estimate of ``G``.

``P`` is never stored: ``basis()`` regenerates it on the gradient's device from (the parameter's seed, the refresh
count), both 0-d tensors in the state, so the state holds no matrix (``state_bytes`` is 0) and a resumed run draws
the same matrices. The cost is two s×r Gaussian draws per step and parameter (for ``down`` and ``up``), small next
to the m×n×r matmuls. The numbers depend on the device type's generator (CPU and CUDA draw different ``P``).

Not APOLLO: APOLLO uses the projected Adam state only to estimate channel-wise (or tensor-wise) scaling factors for
the raw full-rank gradient, with a norm-growth limiter; none of that is implemented here. This projector plugs the
random projection into ``Projected`` (Adam in the projected space, GaLore-style), as a baseline for GaLore and DCT.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from .._errors import SubspacesError
from .._registry import TRAIN
from ._projector import Projector, State, side_of


def _size(shape: torch.Size | tuple[int, ...]) -> int:
    return shape[1] if side_of(shape) == "right" else shape[0]


# pretrain defaults: GaLore's recipe.
@TRAIN.register("random", paper="https://arxiv.org/abs/2412.05270",
                defaults={"pretrain": {"lr": 1e-2, "scale": 0.25}}, status="complete")
@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomProjector(Projector):
    """A seeded random projection (entries N(0, 1/r), redrawn every ``update_every`` steps): the cheap baseline.

    Not orthonormal: ``up(down(G)) = G P Pᵀ`` equals ``G`` only in expectation. APOLLO's gradient scaling is not
    implemented (see the module docstring).
    """

    update_every: int = 200

    def init_state(self, param: Tensor, seed: int) -> State:
        state = super().init_state(param, seed)
        state["refreshes"] = torch.zeros((), dtype=torch.int64)
        return state

    def refresh(self, state: State, grad: Tensor) -> None:
        state["refreshes"] = state["refreshes"] + 1  # the next draw; nothing else to compute

    def matrix(self, state: State, size: int, like: Tensor) -> Tensor:
        """The current ``P`` (size, r) in ``like``'s dtype and device, drawn in float32 from the state's seed."""
        from ..adapters._core import stable_seed

        draw = int(state["refreshes"])
        if draw < 1:
            raise SubspacesError("RandomProjector: no projection drawn yet; refresh() runs at the first step")
        gen = torch.Generator(device=like.device).manual_seed(stable_seed("random", int(state["seed"]), draw))
        P = torch.randn(size, self.rank, generator=gen, device=like.device, dtype=torch.float32)
        return P.mul_(1.0 / math.sqrt(self.rank)).to(like.dtype)

    def basis(self, state: State, shape: torch.Size, like: Tensor) -> Tensor:
        """``P`` (s, r) for a parameter of ``shape``."""
        return self.matrix(state, _size(shape), like)

    def state_bytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        return 0  # P is regenerated, never stored
