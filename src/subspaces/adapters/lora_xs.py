"""LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (Bałazy, Banaei, Aberer, Tabor, 2024).
https://arxiv.org/abs/2405.17604

Update rule: y = W0 x + b + s · B R A dropout(x), with B = U_r (d_out, r) and A = Σ_r V_rᵀ (r, d_in) frozen from the
truncated SVD W0 ≈ U_r Σ_r V_rᵀ, only R (r, r) trained, R ~ N(0, σ²) with σ = 1e-5, s = α/r: r² parameters per layer.
Official code: https://github.com/MohammadrezaBanaei/LoRA-XS (``utils/initialization_utils.py``: a PEFT LoRA layer
whose forward is patched to ``lora_B(latent(lora_A(x)))``, ``latent`` an r×r ``nn.Linear``).

B and A are persistent buffers (derived from W0 at attach; saved so that a saved adapter reloads exactly).
``LatentDelta`` here is shared with LoRA-SB (``lora_sb.py``), which has the same architecture and another init.

Deviations from the paper: the SVD is exact (``subspaces.linalg.truncated_svd``, LAPACK) where the paper's code
used sklearn's randomized ``TruncatedSVD(n_iter=10)`` (the current official code also calls ``torch.linalg.svd``);
the factors agree up to the sign of each singular pair, which R's symmetric random init does not see. R is drawn
from torch's global RNG (seed it with ``torch.manual_seed``); ΔW is tiny but not zero at init, so the output is
close to, not equal to, the base (``identity_at_init = False``; ``init_std=0`` makes it exact). Layers: nn.Linear and transformers' GPT-2 Conv1D.
On bf16/fp16 bases B, R, A are kept in fp32 (as LoRA's adapters); the official code casts them to the base dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import SubspacesError
from .._registry import ADAPTERS
from ._core import AdapterConfig, Delta, linear_dims, master_dtype, validate_common


def check_common(config: AdapterConfig) -> None:
    """Validation shared by LoRA-XS and LoRA-SB configs: rank and dropout, and a positive alpha (or None)."""
    validate_common(config)
    alpha = config.alpha
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise SubspacesError(f"{config.registry_name} alpha={alpha!r}: must be a positive number")


def check_rank(method: str, rank: int, layer: nn.Module) -> tuple[int, int, bool]:
    d_in, d_out, transposed = linear_dims(layer, method)
    if rank > min(d_in, d_out):
        raise SubspacesError(f"{method} rank={rank} must be <= min(d_in, d_out) = {min(d_in, d_out)} "
                             f"for this {type(layer).__name__} ({d_in} -> {d_out})")
    return d_in, d_out, transposed


@ADAPTERS.register("lora_xs", paper="https://arxiv.org/abs/2405.17604")
@dataclass(frozen=True, kw_only=True)
class LoRAXS(AdapterConfig):
    """LoRA-XS hyperparameters. Defaults: the paper's GLUE setting (α = 16); its LLM runs use α = rank."""

    #: R ~ N(0, 1e-10) makes ΔW tiny but not zero (output ≈ base to ~s·1e-5·‖Σ_r‖); ``init_std=0`` gives ΔW = 0.
    identity_at_init: ClassVar[bool] = False

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init_std: float = 1e-5  # σ of R's Gaussian init (official code: 1e-5); 0 gives ΔW = 0 exactly

    def __post_init__(self) -> None:
        check_common(self)
        if not isinstance(self.init_std, (int, float)) or self.init_std < 0:
            raise SubspacesError(f"lora_xs init_std={self.init_std!r}: must be a number >= 0")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def num_trainable(self, layer: nn.Module) -> int:
        return self.rank * self.rank

    def build(self, layer: nn.Module, *, init: bool = True) -> LatentDelta:
        check_rank("lora_xs", self.rank, layer)
        delta = LatentDelta(layer, self.rank, self.scaling, self.dropout)
        if init:
            delta.reset(layer, self.init_std)
        return delta


class LatentDelta(Delta):
    """ΔW = s · B R A: frozen buffers B (d_out, r) and A (r, d_in), trainable R (r, r), in the layer's layout."""

    def __init__(self, layer: nn.Module, rank: int, scaling: float, dropout: float) -> None:
        super().__init__()
        d_in, d_out, self.transposed = linear_dims(layer, "latent")
        w = layer.weight
        dtype = master_dtype(w)
        kw = dict(device=w.device, dtype=dtype)
        self.scaling = scaling
        self.drop = nn.Dropout(dropout) if dropout > 0 else None
        self.register_buffer("A", torch.zeros(rank, d_in, **kw))  # persistent: saved with the adapter
        self.register_buffer("B", torch.zeros(d_out, rank, **kw))
        self.R = nn.Parameter(torch.zeros(rank, rank, **kw))

    def matrix(self, layer: nn.Module) -> torch.Tensor:
        """The layer's weight as a (d_out, d_in) matrix in the factors' dtype (fp32 for half bases)."""
        w = layer.weight.detach().to(self.R.dtype)
        return w.T if self.transposed else w

    @torch.no_grad()
    def reset(self, layer: nn.Module, init_std: float) -> None:
        """LoRA-XS init: B = U_r, A = Σ_r V_rᵀ from the SVD of W0, R ~ N(0, init_std²)."""
        from ..linalg import truncated_svd

        U, S, Vh = truncated_svd(self.matrix(layer), self.R.shape[0])
        self.B.copy_(U)
        self.A.copy_(S[:, None] * Vh)
        if init_std > 0:
            nn.init.normal_(self.R, std=init_std)
        else:
            self.R.zero_()

    def weight(self) -> torch.Tensor:
        dw = (self.B @ self.R @ self.A) * self.scaling  # (d_out, d_in)
        return dw.T if self.transposed else dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.R.dtype)
        x = self.drop(x) if self.drop is not None else x
        return F.linear(F.linear(F.linear(x, self.A), self.R), self.B) * self.scaling

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # The branch runs in the activations' dtype (the fp32 factors are cast, not the layer input), as LoRA's.
        dt = output.dtype
        A, R, B = (t if t.dtype == dt else t.to(dt) for t in (self.A, self.R, self.B))
        x = x if x.dtype == dt else x.to(dt)
        h = F.linear(F.linear(x if self.drop is None else self.drop(x), A), R)
        if output.is_contiguous():
            out2 = torch.addmm(output.reshape(-1, output.shape[-1]), h.reshape(-1, h.shape[-1]), B.T,
                               alpha=self.scaling)
            return out2.view(output.shape)
        return output + F.linear(h, B) * self.scaling
