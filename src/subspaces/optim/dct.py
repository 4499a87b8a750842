"""DCT: SVD-free low-rank Adam with columns picked from one fixed DCT basis (DCT-AdamW).

Modoranu, Safaryan, Schultheis, Alistarh, "SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language
Models", https://arxiv.org/abs/2505.17967 (later versions: "FFT-based Dynamic Subspace Selection for Low-Rank
Adaptive Optimization of Large Language Models"). Official code:
https://github.com/IST-DASLab/ISTA-DASLab-Optimizers (``ista_daslab_optimizers/fft_low_rank/``).

Update (W (m, n), m >= n; the wide case scores the rows of ``Qᵀ G``): at a refresh
``idx = top-r_j ‖(G Q)[:, j]‖_ℓ`` with ``Q`` the orthonormal s×s DCT-II matrix
``Q[k, j] = √(2/s) c_k cos(π k (2j+1) / 2s)`` (s = n); then ``R = G Q[:, idx]`` (m, r), Adam on R gives N,
``W ← W − η α N Q[:, idx]ᵀ``, and ``W ← W − η λ W``.

``Q`` is built once per (s, dtype, device) and shared by every layer (``dct_matrix``, a module-level cache); a
layer's state is its r column indices (int32) and counters, never an r×s float projector. Refreshes happen at the
official code's steps t = 1, T, 2T, ... (t counted from 1); T = 1 by default, i.e. a re-selection every step.
Matrices with a side >= ``max_shape`` (embeddings, lm_head) and non-2-D parameters get the plain inner optimizer.
``norm`` is the ℓ of the column scores; ``theoretical_similarity`` multiplies them by the ℓ-norms of Q's columns
(the code's negative ``ell_norm``).

Deviations, all deliberate:
- the selected indices are kept sorted: ``topk`` order is unspecified in the code, and a fixed order lets
  ``on_switch="keep"`` keep each kept column's moments in place (at r = s the projection is then exactly the
  identity map, momentum included);
- the refresh multiplies by ``Q[:, idx]`` again instead of reusing the columns of ``G Q`` (an extra r/s of the
  refresh's cost) so that ``Projected`` stays generic;
- not implemented: error feedback (``use_ef``, off by default), the Makhoul FFT similarity (a speed option),
  the code's hard-coded right-side rule for 512×3584 / 1024×4096 LLaMA-3 / Qwen2.5 layers (the code keeps a
  single Q of one size; the per-size cache here makes it unnecessary);
- decoupled weight decay is applied after the update (``Projected``'s order), the code applies it before: they
  differ by O(η²λ);
- ``on_switch="rotate"`` (the code's ``rotate_subspace``) uses ``Projected``'s generic ``R = Q_oldᵀ Q_new``, which
  here is a 0/1 partial permutation up to rounding (entries off by ~1e-7 in float32, ~1e-3 in bfloat16).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import Tensor

from .._errors import SubspacesError
from .._registry import TRAIN
from ._projector import Projector, State, check_positive_int, side_of


def dct_matrix(size: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """The orthonormal DCT-II matrix ``Q`` (size, size), ``Q[k, j] = √(2/s) c_k cos(π k (2j+1) / 2s)`` with
    ``c_0 = 1/√2``, ``c_k = 1``; built in float64 once per (size, dtype, device) and shared (do not modify it)."""
    return _dct_matrix(size, dtype, torch.device(device))


@functools.lru_cache(maxsize=None)
def _dct_matrix(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    k = torch.arange(size, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(size, dtype=torch.float64).unsqueeze(0)
    Q = math.sqrt(2.0 / size) * torch.cos(math.pi * k * (2 * j + 1) / (2 * size))
    Q[0] *= math.sqrt(0.5)
    return Q.to(device=device, dtype=dtype)


def _size(shape: torch.Size | tuple[int, ...]) -> int:
    """The basis size s of a parameter (m, n): n on the right side, m on the left."""
    return shape[1] if side_of(shape) == "right" else shape[0]


# pretrain defaults: GaLore's recipe; DCT keeps its own update_every (re-selection is cheap).
@TRAIN.register("dct", paper="https://arxiv.org/abs/2505.17967",
                defaults={"pretrain": {"lr": 1e-2, "scale": 0.25}}, status="complete",
                note="options not implemented: error feedback (use_ef), Makhoul FFT similarity")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DCT(Projector):
    """DCT projector: r columns of a shared DCT-II basis chosen by the gradient's ℓ-norm scores.

    Args (beyond ``Projector``'s): ``norm`` ℓ of the column scores (1 as in the code; any p > 0 or ``inf``);
    ``theoretical_similarity`` weights the scores by Q's column ℓ-norms; ``max_shape``: a 2-D parameter with a
    side >= this is not projected. ``update_every`` defaults to 1 (the code's ``update_proj_gap``).
    """

    update_every: int = 1
    norm: float = 1.0
    theoretical_similarity: bool = False
    max_shape: int = 32_000

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("DCT", "max_shape", self.max_shape)
        if isinstance(self.norm, bool) or not isinstance(self.norm, (int, float)) or not self.norm > 0:
            raise SubspacesError(f"DCT norm={self.norm!r}: must be a number > 0 (1 = L1, 2 = L2, inf)")
        if not isinstance(self.theoretical_similarity, bool):
            raise SubspacesError(f"DCT theoretical_similarity={self.theoretical_similarity!r}: must be True/False")

    def applies_to(self, shape: torch.Size) -> bool:
        return super().applies_to(shape) and max(shape) < self.max_shape

    def init_state(self, param: Tensor, seed: int) -> State:
        state = super().init_state(param, seed)
        state["index"] = torch.zeros(self.rank, dtype=torch.int32, device=param.device)
        return state

    def due(self, step: int) -> bool:
        # The code counts t = step + 1 and refreshes at t == 1 or t % T == 0.
        return step == 0 or (step + 1) % self.update_every == 0

    def refresh(self, state: State, grad: Tensor) -> None:
        right = side_of(grad.shape) == "right"
        Q = dct_matrix(_size(grad.shape), grad.dtype, grad.device)
        S = grad @ Q if right else Q.T @ grad
        score = S.norm(p=self.norm, dim=0 if right else 1)
        if self.theoretical_similarity:
            score = score * Q.norm(p=self.norm, dim=0)
        idx = torch.topk(score.float(), self.rank, sorted=False).indices.sort().values
        state["index"] = idx.to(torch.int32)

    def rotation(self, old: State, new: State, like: Tensor) -> Tensor:
        """Columns of one Q: ``Q[:, old]ᵀ Q[:, new]`` is the 0/1 partial permutation matching equal indices, built
        exactly (a gather: moments of kept columns carried, the rest exactly 0) instead of by a rounding matmul."""
        return (old["index"][:, None] == new["index"][None, :]).float()

    def columns(self, state: State, size: int, like: Tensor) -> Tensor:
        """``Q[:, index]`` (size, r) in ``like``'s dtype and device."""
        return dct_matrix(size, like.dtype, like.device).index_select(1, state["index"].to(like.device))

    def basis(self, state: State, shape: torch.Size, like: Tensor) -> Tensor:
        """``Q[:, index]`` (s, r) for a parameter of ``shape``."""
        return self.columns(state, _size(shape), like)

    def state_bytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        return self.rank * 4  # the int32 indices
