"""RandLoRA: Full-rank parameter-efficient fine-tuning of large models (Albert et al., ICLR 2025).
https://arxiv.org/abs/2502.00987

Update rule (d_in ≤ d_out): ΔW = s · Σ_{i=1}^{N} B_i Λ_i A Γ_i, N = ceil(d_min / r), with frozen random A ∈ R^{r×d_min}
(one, shared by the N terms) and B_i ∈ R^{d_max×r}, trainable diagonals Λ ∈ R^{r×N}, Γ ∈ R^{N×d_min}; for d_out < d_in
the same construction is transposed so that Γ always scales the smaller dimension.
Official code: https://github.com/PaulAlbert31/RandLoRA and its Hugging Face PEFT port
(``peft/tuners/randlora``: ``UniqueBaseGrad``, ``_init_randlora_A_randlora_B``), whose defaults we follow.

Scaling: ``scaling="peft"`` (default) s = alpha / r, PEFT's convention and defaults (r = 32, alpha = 640,
"typically 20× the rank"); we default to it because it is the maintained implementation users compare against and
PEFT checkpoints/configs carry ``randlora_alpha`` with that meaning. ``scaling="loralib"`` is the paper repo's
NLG variant s = alpha / (r · √N), which keeps the update's magnitude independent of the number of terms N.

Init: Λ = 0 (ΔW = 0 at init), Γ = 1/max(N, d_min). Λ_i A Γ_i is formed by a custom autograd function that saves
only A, Λ, Γ (not N scaled copies of A), as PEFT's ``UniqueBaseGrad``.

Deliberate deviations:
- Pairing: term i pairs B_i with row-block i of the scaled A (the paper's Σ_i B_i Λ_i A Γ_i); PEFT flattens the scaled
  A in (r, N) order but B in (N, r) order, a fixed permutation of the same distribution. Not bit-compatible.
- Bases are drawn from a CPU ``torch.Generator(seed)`` (PEFT's ``projection_prng_key``) in blocks of rows, each
  block from its own seed, and normalized by the exact std of their distribution (dense: uniform with unit
  variance, i.e. kaiming-uniform / std; sparse: ternary ±√s) instead of the drawn tensor's empirical std. So the
  bases of every layer are slices of one conceptual tensor without knowing the largest layer in advance (PEFT
  allocates at the largest size and slices), and reloading regenerates them bit-identically on any device.
  ``RandLoRA.share`` registers them once per (d_min, d_max), on the first such layer (the others reach them through
  ``owner_of``), so ``model.to()`` converts one tensor per shape; they are never saved (PEFT's
  ``save_projection=False``).
- ``bases="very_sparse"`` uses the layer's own d_min for P(±1) = 1/(2√d_min) each (PEFT: the largest d_min).
Layers: nn.Linear and transformers' GPT-2 Conv1D (weight stored (d_in, d_out)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import SubspacesError
from .._registry import ADAPTERS
from ._core import (AdapterConfig, Delta, linear_dims, master_dtype, owner_of, set_owner, stable_seed,
                    validate_common)

_BASES = ("dense", "sparse", "very_sparse")
_SCALINGS = ("peft", "loralib")
_BLOCK = 256  # rows drawn per generator seed


def _rows(key: tuple, n: int, r: int) -> torch.Tensor:
    """U(0, 1) of shape (n, r), drawn in blocks of rows so that a smaller n gives a prefix of a larger one."""
    blocks = []
    for b in range(math.ceil(n / _BLOCK)):
        seed = stable_seed(*key, b)
        blocks.append(torch.rand(_BLOCK, r, generator=torch.Generator().manual_seed(seed)))
    return torch.cat(blocks)[:n]


def _normalize(u: torch.Tensor, bases: str, d_min: int) -> torch.Tensor:
    if bases == "dense":  # kaiming-uniform divided by its std: U(-√3, √3)
        return (u * 2 - 1) * math.sqrt(3.0)
    s = 3.0 if bases == "sparse" else math.sqrt(d_min)  # P(-1) = P(+1) = 1/(2s); std = 1/√s
    return ((u > 1 - 1 / (2 * s)).float() - (u < 1 / (2 * s)).float()) * math.sqrt(s)


def random_bases(seed: int, rank: int, d_min: int, d_max: int, bases: str = "dense"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_min), B (d_max, N, r)) in float32 on the CPU, reproducible from ``seed``."""
    n = math.ceil(d_min / rank)
    A = _normalize(_rows((seed, "A", rank), d_min, rank), bases, d_min).T.contiguous()
    B = torch.stack([_normalize(_rows((seed, "B", rank, i), d_max, rank), bases, d_min) for i in range(n)], 1)
    return A, B


class _ScaledBase(torch.autograd.Function):
    """(Λ_i A Γ_i)_{i=1..N} as one (N, r, d_min) tensor, saving only A, Λ (r, N) and Γ (N, d_min)."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(A, lam, gamma)
        return lam.T[:, :, None] * A[None] * gamma[:, None, :]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        A, lam, gamma = ctx.saved_tensors
        g_lam = torch.einsum("nkj,kj,nj->kn", g, A, gamma)
        g_gamma = torch.einsum("nkj,kj,kn->nj", g, A, lam)
        return None, g_lam, g_gamma


@ADAPTERS.register("randlora", paper="https://arxiv.org/abs/2502.00987")
@dataclass(frozen=True, kw_only=True)
class RandLoRA(AdapterConfig):
    """RandLoRA hyperparameters (PEFT's defaults: rank 32, alpha 640, no dropout, seed 0, dense bases)."""

    rank: int = 32
    alpha: float = 640.0
    dropout: float = 0.0
    seed: int = 0
    bases: str = "dense"
    scaling: str = "peft"

    def __post_init__(self) -> None:
        validate_common(self)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise SubspacesError(f"randlora seed={self.seed!r}: must be a non-negative integer")
        if self.bases not in _BASES:
            raise SubspacesError(f"randlora bases={self.bases!r}: allowed {', '.join(_BASES)}")
        if self.scaling not in _SCALINGS:
            raise SubspacesError(f"randlora scaling={self.scaling!r}: allowed {', '.join(_SCALINGS)}")

    def num_trainable(self, layer: nn.Module) -> int:
        d_in, d_out, _ = linear_dims(layer, "randlora")
        d_min = min(d_in, d_out)
        n = math.ceil(d_min / self.rank)
        return n * self.rank + n * d_min

    def build(self, layer: nn.Module, *, init: bool = True) -> RandLoRADelta:
        return RandLoRADelta(layer, self)

    def share(self, deltas: list[tuple[str, Delta]], *, init: bool) -> None:
        """Draw the bases once per (d_min, d_max, device, dtype), as non-persistent buffers of the first such layer;
        runs at load too, since the bases are regenerated, never saved."""
        owners: dict[tuple, RandLoRADelta] = {}
        for _, delta in deltas:
            p = delta.randlora_gamma
            owner = owners.setdefault((delta.d_min, delta.d_max, p.device, p.dtype), delta)
            if owner is delta:
                A, B = random_bases(self.seed, self.rank, delta.d_min, delta.d_max, self.bases)
                delta.register_buffer("randlora_A", A.to(device=p.device, dtype=p.dtype), persistent=False)
                delta.register_buffer("randlora_B", B.to(device=p.device, dtype=p.dtype), persistent=False)
            else:
                set_owner(delta, owner)


class RandLoRADelta(Delta):
    def __init__(self, layer: nn.Module, config: RandLoRA) -> None:
        super().__init__()
        d_in, d_out, self.transposed = linear_dims(layer, "randlora")
        w = layer.weight
        dtype = master_dtype(w)
        r, d_min, d_max = config.rank, min(d_in, d_out), max(d_in, d_out)
        n = math.ceil(d_min / r)
        self.small_in = d_in <= d_out  # Γ scales the input side; else the construction is transposed
        self.scaling = config.alpha / r / (math.sqrt(n) if config.scaling == "loralib" else 1.0)
        self.randlora_lambda = nn.Parameter(torch.zeros(r, n, device=w.device, dtype=dtype))
        self.randlora_gamma = nn.Parameter(torch.full((n, d_min), 1 / max(n, d_min), device=w.device, dtype=dtype))
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.d_min, self.d_max = d_min, d_max

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen (A (r, d_min), B (d_max, N, r)) held by this layer's group owner."""
        owner = owner_of(self)
        A, B = owner._buffers.get("randlora_A"), owner._buffers.get("randlora_B")
        if A is None or B is None:
            raise SubspacesError("randlora: the random bases are drawn by RandLoRA.share once every layer is "
                                 "attached; attach deltas with ss.adapt_")
        return A, B

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down (N·r, d_in), up (d_out, N·r)) with ΔW = s · up @ down."""
        A, B = self.bases()
        scaled = _ScaledBase.apply(A, self.randlora_lambda, self.randlora_gamma).flatten(0, 1)
        B = B.flatten(1)  # (d_max, N·r), column i·r + k = column k of B_i
        return (scaled, B) if self.small_in else (B.T, scaled.T)

    def weight(self) -> torch.Tensor:
        down, up = self.factors()
        dw = (up @ down) * self.scaling
        return dw.T if self.transposed else dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.factors()
        x = x.to(down.dtype)
        x = self.drop(x) if self.drop is not None else x
        return F.linear(F.linear(x, down), up) * self.scaling
