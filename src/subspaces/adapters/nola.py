"""NOLA: Compressing LoRA using Linear Combination of Random Basis (Koohpayegani et al., ICLR 2024).
https://arxiv.org/abs/2310.02556

Update rule: y = W0 x + b + (α/r) · B A x with A = A0 + Σ_i a_i A_i, B = Σ_j b_j B_j; the bases A_i ∈ R^{r×d_in},
B_j ∈ R^{d_out×r} are frozen random matrices regenerated from a seed, only a ∈ R^{k_a}, b ∈ R^{k_b} train.
Official code: https://github.com/UCDvision/NOLA (``gpt/src/model_nola.py``: ``GenerateParams``, ``NOLALinear``,
``LoRA``; ``vit/NOLA.py``: ``NOLA2``).

``init="lora"`` (default, the GPT/LLaMA code): bases U(-1, 1)/√k, coefficients 0, A0 kaiming-uniform(a=√5), B0 = 0,
so ΔW = 0 at init. ``init="uniform_coef"`` (the ViT code): kaiming-uniform bases, coefficients 1/k, no A0, so
ΔW ≠ 0 at init (``identity_at_init`` describes the default). ``cache_bases=False`` is the paper's memory trick: the
bases are never kept, a custom autograd function regenerates them chunk by chunk in forward and again in backward.

Seeds and deviations from the official code:
- The official code draws one random seed per module and stores it; here ``build(layer)`` does not see the module
  name, so the per-layer seed is a hash of (``seed``, d_out, d_in, rank, init). Layers of equal shape therefore
  share their random bases (as the ViT code does, which seeds every layer with 0) while their coefficients stay
  independent; checkpoints hold only the coefficients (the seed lives in the JSON config). ``NOLA.share`` registers
  the bases of each shape once, on the first layer of that shape (the others reach them through ``owner_of``), so
  ``model.to()`` converts one tensor per shape and a deepcopy keeps the sharing.
- Bases come from a local CPU ``torch.Generator`` (one per basis index, so cached and regenerated bases are
  bit-identical and CPU/CUDA agree), never the global RNG; A0 is regenerated from the seed instead of stored.
- Dropout (as in the LLaMA PEFT fork) is an addition; the GPT code has none.
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

_INITS = ("lora", "uniform_coef")
_CHUNK = 64  # bases regenerated at a time when cache_bases=False


def _bases(seed: int, tag: str, lo: int, hi: int, shape: tuple[int, int], bound: float,
           device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Bases lo..hi-1 of one factor, (hi-lo, *shape), each U(-bound, bound) from its own CPU generator."""
    out = torch.empty(hi - lo, *shape)
    for i in range(lo, hi):
        g = torch.Generator().manual_seed(stable_seed(seed, tag, i))
        out[i - lo] = (torch.rand(shape, generator=g) * 2 - 1) * bound
    return out.to(device=device, dtype=dtype)


class _Mix(torch.autograd.Function):
    """Σ_i c_i W_i with the W_i regenerated from the seed in forward and again in backward (never stored)."""

    @staticmethod
    def forward(ctx, coef: torch.Tensor, spec: tuple) -> torch.Tensor:
        ctx.spec = spec
        seed, tag, shape, bound = spec
        out = coef.new_zeros(shape)
        for lo in range(0, coef.numel(), _CHUNK):
            hi = min(lo + _CHUNK, coef.numel())
            out += torch.einsum("k,kij->ij", coef[lo:hi], _bases(seed, tag, lo, hi, shape, bound, coef.device,
                                                                  coef.dtype))
        ctx.k = coef.numel()
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        seed, tag, shape, bound = ctx.spec
        parts = [torch.einsum("ij,kij->k", grad, _bases(seed, tag, lo, min(lo + _CHUNK, ctx.k), shape, bound,
                                                         grad.device, grad.dtype))
                 for lo in range(0, ctx.k, _CHUNK)]
        return torch.cat(parts), None


@ADAPTERS.register("nola", paper="https://arxiv.org/abs/2310.02556")
@dataclass(frozen=True, kw_only=True)
class NOLA(AdapterConfig):
    """NOLA hyperparameters (defaults: the official GPT-2 E2E script, rank 8, k_a = k_b = 512, alpha 8)."""

    rank: int = 8
    alpha: float = 8.0
    k_a: int = 512
    k_b: int = 512
    dropout: float = 0.0
    seed: int = 0
    init: str = "lora"
    cache_bases: bool = True

    def __post_init__(self) -> None:
        validate_common(self)
        for f in ("k_a", "k_b"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SubspacesError(f"nola {f}={v!r}: must be a positive integer")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise SubspacesError(f"nola seed={self.seed!r}: must be a non-negative integer")
        if self.init not in _INITS:
            raise SubspacesError(f"nola init={self.init!r}: allowed {', '.join(_INITS)}")

    def num_trainable(self, layer: nn.Module) -> int:
        linear_dims(layer, "nola")
        return self.k_a + self.k_b

    def build(self, layer: nn.Module, *, init: bool = True) -> NOLADelta:
        return NOLADelta(layer, self)

    def share(self, deltas: list[tuple[str, Delta]], *, init: bool) -> None:
        """Draw the bases once per seed (i.e. per layer shape), device and dtype, as non-persistent buffers of the
        first such layer; runs at load too, since the bases are regenerated, never saved."""
        owners: dict[tuple, NOLADelta] = {}
        for _, delta in deltas:
            p = delta.nola_alpha
            owner = owners.setdefault((delta.seed, p.device, p.dtype), delta)
            if owner is delta:
                delta.draw_bases()
            else:
                set_owner(delta, owner)


class NOLADelta(Delta):
    def __init__(self, layer: nn.Module, config: NOLA) -> None:
        super().__init__()
        d_in, d_out, self.transposed = linear_dims(layer, "nola")
        w = layer.weight
        dtype = master_dtype(w)
        r, ka, kb = config.rank, config.k_a, config.k_b
        self.scaling = config.alpha / r
        self.seed = stable_seed(config.seed, "nola", d_out, d_in, r, config.init)
        if config.init == "lora":
            self.bounds = {"A": 1 / math.sqrt(ka), "B": 1 / math.sqrt(kb)}
        else:  # kaiming-uniform(a=√5) of the ViT code's (k, d_in, r) and (k, r, d_out) basis stacks
            self.bounds = {"A": 1 / math.sqrt(d_in * r), "B": 1 / math.sqrt(r * d_out)}
        self.shapes = {"A": (r, d_in), "B": (d_out, r)}
        c = (1 / ka, 1 / kb) if config.init == "uniform_coef" else (0.0, 0.0)
        self.nola_alpha = nn.Parameter(torch.full((ka,), c[0], device=w.device, dtype=dtype))
        self.nola_beta = nn.Parameter(torch.full((kb,), c[1], device=w.device, dtype=dtype))
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.cached = config.cache_bases
        self.k = {"A": ka, "B": kb}
        self.has_A0 = config.init == "lora"
        self.A0_bound = 1 / math.sqrt(d_in)  # A0: nn.Linear's default init, U(-1/√d_in, 1/√d_in), from the seed

    def draw_bases(self) -> None:
        """Register this layer's frozen bases (``NOLA.share`` calls it on one layer per seed)."""
        p = self.nola_alpha
        if self.has_A0:
            a0 = _bases(self.seed, "A0", 0, 1, self.shapes["A"], self.A0_bound, p.device, p.dtype)[0]
            self.register_buffer("A0", a0, persistent=False)
        if self.cached:
            for tag in ("A", "B"):
                t = _bases(self.seed, tag, 0, self.k[tag], self.shapes[tag], self.bounds[tag], p.device, p.dtype)
                self.register_buffer(f"bases_{tag}", t, persistent=False)

    def shared(self, name: str) -> torch.Tensor | None:
        """The frozen tensor ``name`` ("A0", "bases_A", "bases_B") held by this layer's group owner; None where the
        config has none (A0 under init="uniform_coef", the bases under cache_bases=False)."""
        if not (self.has_A0 if name == "A0" else self.cached):
            return None
        t = owner_of(self)._buffers.get(name)
        if t is None:
            raise SubspacesError("nola: the random bases are drawn by NOLA.share once every layer is attached; "
                                 "attach deltas with ss.adapt_")
        return t

    def _factor(self, tag: str, coef: torch.Tensor) -> torch.Tensor:
        if self.cached:
            return torch.einsum("k,kij->ij", coef, self.shared(f"bases_{tag}"))
        return _Mix.apply(coef, (self.seed, tag, self.shapes[tag], self.bounds[tag]))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, d_in), B (d_out, r))."""
        A = self._factor("A", self.nola_alpha)
        if self.has_A0:
            A = A + self.shared("A0")
        return A, self._factor("B", self.nola_beta)

    def weight(self) -> torch.Tensor:
        A, B = self.factors()
        dw = (B @ A) * self.scaling
        return dw.T if self.transposed else dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.factors()
        x = x.to(A.dtype)
        x = self.drop(x) if self.drop is not None else x
        return F.linear(F.linear(x, A), B) * self.scaling
