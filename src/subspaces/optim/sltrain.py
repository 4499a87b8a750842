"""SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining (Han et al., NeurIPS 2024).

https://arxiv.org/abs/2406.02214 — official code https://github.com/andyjm3/SLTrain

Every targeted linear weight (out m, in n) is trained from scratch as ``W = s·B A + S_Ω``: ``B`` (m, r) from zeros,
``A`` (r, n) Kaiming-uniform, ``s = alpha / r`` (or ``tanh(θ)``, θ from 1.0), and a sparse ``S`` whose support Ω
(⌊δ·m·n⌋ flat indices drawn uniformly once) never changes; only its values (init U(−1/√n, 1/√n)) train. The bias is
U(−1/√m, 1/√m) as in the official code. Plain AdamW trains every trainable parameter of the model.

The layer is a custom autograd Function, as the official fused kernel: it saves only the input and the factors
(no dense W or S); backward rebuilds W = s·BA + scatter(S_Ω) once, transiently, for the input gradient, and forms
the dense weight gradient G = g_yᵀ x once, from which ∂B = s·G Aᵀ, ∂A = s·Bᵀ G and ∂S_Ω = G[Ω] (a gather).
Deviations: Ω is stored as int32 when m·n < 2³¹ (the paper's code always uses int64); initialization draws from a
seeded generator per layer (stable across processes and devices) instead of the global RNG; dropout is left out
(the official pretraining scripts use none).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._errors import SubspacesError
from .._registry import TRAIN
from ._projector import check_positive_int

DEFAULT_TARGETS = ("attn", "mlp", "attention")


def _dense(B: Tensor, A: Tensor, scale: float | Tensor, values: Tensor, index: Tensor) -> Tensor:
    """W = s·B A + scatter(S_Ω), (out, in)."""
    W = (B @ A) * scale
    W.view(-1).index_add_(0, index, values.to(W.dtype))
    return W


class _SparseLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, B, A, scale, values, index, bias):  # noqa: ANN001, ANN205
        tensors = (x, B, A, values, index) + ((scale,) if isinstance(scale, Tensor) else ())
        ctx.save_for_backward(*tensors)
        ctx.scale = None if isinstance(scale, Tensor) else scale
        return F.linear(x, _dense(B, A, scale, values, index), bias)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        x, B, A, values, index, *rest = ctx.saved_tensors
        scale = rest[0] if rest else ctx.scale
        need = ctx.needs_input_grad
        gx = gB = gA = gs = gv = gb = None
        if need[0]:
            gx = (gy @ _dense(B, A, scale, values, index).to(gy.dtype)).to(x.dtype)
        gy2 = gy.reshape(-1, gy.shape[-1])
        if any(need[1:5]):
            G = gy2.T @ x.reshape(-1, x.shape[-1]).to(gy.dtype)  # the dense weight gradient (out, in)
            if need[1]:
                gB = ((G @ A.to(G.dtype).T) * scale).to(B.dtype)
            if need[2] or need[3]:
                BtG = B.to(G.dtype).T @ G
                gA = (BtG * scale).to(A.dtype) if need[2] else None
                gs = (BtG * A.to(G.dtype)).sum().reshape(scale.shape).to(scale.dtype) if need[3] else None
            if need[4]:
                gv = G.reshape(-1)[index].to(values.dtype)
        if need[6]:
            gb = gy2.sum(0)
        return gx, gB, gA, gs, gv, None, gb


class SLLinear(nn.Module):
    """``y = x (s·B A + S_Ω)ᵀ + b`` with ``A`` (rank, in), ``B`` (out, rank), trainable ``values`` on the fixed
    support ``index`` (a buffer of sorted unique flat indices into the (out, in) weight)."""

    def __init__(self, in_features: int, out_features: int, rank: int, density: float, *, alpha: float = 32.0,
                 trainable_scaling: bool = False, bias: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_positive_int("SLLinear", "rank", rank)
        m, n = out_features, in_features
        nnz = int(density * m * n)  # the official code's ⌊δ·m·n⌋
        if not 0 < density < 1 or nnz < 1:
            raise SubspacesError(f"SLLinear density={density!r} for a ({m}, {n}) weight: need 0 < density < 1 and "
                                 "at least one sparse entry")
        self.in_features, self.out_features, self.rank, self.density = n, m, rank, density
        self.alpha, self.trainable_scaling = alpha, trainable_scaling
        g = generator if generator is not None else torch.Generator().manual_seed(0)

        def uniform(shape: tuple[int, ...], bound: float) -> Tensor:  # drawn on CPU in fp32: same on every device
            return torch.empty(shape).uniform_(-bound, bound, generator=g).to(device=device, dtype=dtype)

        self.A = nn.Parameter(uniform((rank, n), 1 / math.sqrt(n)))  # Kaiming-uniform(a=√5): bound 1/√fan_in
        self.B = nn.Parameter(torch.zeros(m, rank, device=device, dtype=dtype))
        self.scaling = nn.Parameter(torch.ones(1, device=device, dtype=dtype)) if trainable_scaling else None
        index_dtype = torch.int32 if m * n < 2**31 else torch.int64
        index = torch.randperm(m * n, generator=g)[:nnz].sort().values
        self.register_buffer("index", index.to(device=device, dtype=index_dtype))
        self.values = nn.Parameter(uniform((nnz,), 1 / math.sqrt(n)))
        self.bias = nn.Parameter(uniform((m,), 1 / math.sqrt(m))) if bias else None

    @property
    def scale(self) -> float | Tensor:
        """s = alpha / rank, or tanh(θ) with ``trainable_scaling``."""
        return self.scaling.tanh() if self.scaling is not None else self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        return _SparseLowRank.apply(x, self.B, self.A, self.scale, self.values, self.index, self.bias)

    @property
    def weight(self) -> Tensor:
        """The dense (out, in) weight ``s·B A + scatter(S_Ω)`` (computed, not stored)."""
        return _dense(self.B, self.A, self.scale, self.values, self.index)

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the same outputs (for inference or export)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.A.device, dtype=self.A.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"density={self.density}, nnz={self.values.numel()}, bias={self.bias is not None}")


def sltrain_(model: nn.Module, config: SLTrain) -> list[str]:
    """Replace, in place, every ``nn.Linear`` whose qualified name contains one of ``config.targets`` by a freshly
    initialized ``SLLinear`` (pretraining from scratch: the dense weight is dropped). Returns the replaced names."""
    from ..adapters._core import stable_seed

    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    chosen = [(name, mod) for name, mod in linears if any(t in name for t in config.targets)]
    if not chosen:
        shown = ", ".join(name for name, _ in linears[:12]) or "none"
        raise SubspacesError(f"{type(config).__name__} targets={config.targets!r} match no nn.Linear; the model's "
                             f"linear layers are: {shown}")
    for name, old in chosen:
        gen = torch.Generator().manual_seed(stable_seed("sltrain", config.seed, name))
        new = SLLinear(old.in_features, old.out_features, config.rank, config.density, alpha=config.alpha,
                       trainable_scaling=config.trainable_scaling, bias=old.bias is not None,
                       device=old.weight.device, dtype=old.weight.dtype, generator=gen)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return [name for name, _ in chosen]


# pretrain defaults: SLTrain's 60M script (lr 3e-3, δ = 0.03, α = 32).
@TRAIN.register("sltrain", paper="https://arxiv.org/abs/2406.02214",
                defaults={"pretrain": {"lr": 3e-3, "density": 0.03, "alpha": 32}}, status="partial",
                note="no fused C++ kernel, 8-bit quantization or per-layer updates of the 7B experiments")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SLTrain:
    """SLTrain. ``rank`` r, ``density`` δ of the fixed random support, ``alpha`` (s = alpha / r), ``targets``:
    name fragments of the ``nn.Linear`` modules to reparameterize, ``seed`` of the supports and initializations."""

    rank: int = 128
    density: float = 0.03
    alpha: float = 32.0
    trainable_scaling: bool = False
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))  # keep the config hashable
        check_positive_int("SLTrain", "rank", self.rank)
        check_sparse_lowrank_fields("SLTrain", self.density, self.alpha, self.targets, self.seed)
        if not isinstance(self.trainable_scaling, bool):
            raise SubspacesError(f"SLTrain trainable_scaling={self.trainable_scaling!r}: must be True or False")

    def num_trainable(self, m: int, n: int) -> int:
        """Trainable entries of one (m, n) layer: r(m + n) + ⌊δ·m·n⌋ (its bias and θ not counted)."""
        return self.rank * (m + n) + int(self.density * m * n)

    def setup(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """Reparameterize ``model`` in place (``sltrain_``) and return AdamW over all of its trainable parameters."""
        sltrain_(model, self)
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=weight_decay)


def check_sparse_lowrank_fields(method: str, density: object, alpha: object, targets: object, seed: object) -> None:
    """Shared validation of SLTrain's hyperparameters (also used by ``Restarts``)."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density < 1:
        raise SubspacesError(f"{method} density={density!r}: must be a number in (0, 1)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise SubspacesError(f"{method} alpha={alpha!r}: must be a number > 0")
    if isinstance(targets, str) or not isinstance(targets, (tuple, list)) or not targets \
            or not all(isinstance(t, str) and t for t in targets):
        raise SubspacesError(f"{method} targets={targets!r}: must be a non-empty tuple of module-name fragments "
                             "such as ('attn', 'mlp')")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SubspacesError(f"{method} seed={seed!r}: must be an integer")
