"""SST: Sparse Spectral Training and Inference on Euclidean and Hyperbolic Neural Networks (Zhao et al., ICML 2025).

https://arxiv.org/abs/2405.15481 — official code https://github.com/biomedical-cybernetics/sparse-spectral-training
(not in our search index: this follows the paper and our spec, not the code).

Each targeted W (out, in) becomes ``y = ((x V) ⊙ σ) Uᵀ + b`` with ``[U, σ, Vᵀ] = SVD(W)`` (k = min(out, in)); W is
never formed. Every step σ trains with its true gradient ``U_iᵀ G V_i`` and r sampled pairs i ∈ S with the
"enhanced" gradient ``∇̃U_i = G V_i, ∇̃V_i = Gᵀ U_i`` (G = ∂L/∂W; the true gradients carry a factor σ_i); after the
update the active columns are renormalized and σ ← max(σ, 0). Every T3 steps S is redrawn (p_i ∝ σ_i, or the
mixture ½(1/k + σ_i/Σσ)) and the moments of the active columns reset; each round (⌈k/r⌉ iterations) starts with a
re-SVD ``[U, σ, Vᵀ] ← SVD(U diag(σ) Vᵀ)``. Only the active columns are optimizer-visible: 2·(r(out+in)+k) moments.

Deviations: no short LR warmup after each resampling (the fresh Adam moments restart their bias correction); σ's
moments are reset at each re-SVD, whose singular vectors may be reordered or sign-flipped; the re-SVD takes QR of
U and V and the SVD of the k×k core, exact in exact arithmetic and without forming W; σ's sampling probabilities get
a 1e-12 floor so fewer than r positive σ still give a valid draw.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import SubspacesError
from .._registry import TRAIN
from ._projector import check_positive_int
from ._scheduled import Scheduled

SAMPLING = ("mixture", "sigma")


def sampling_probabilities(sigma: Tensor, mode: str = "mixture") -> Tensor:
    """Per-draw probabilities (float64, CPU) over the k spectral pairs: ``σ/Σσ`` or ``½(1/k + σ/Σσ)``."""
    s = sigma.detach().double().cpu().clamp_min(0)
    p = s / s.sum() if s.sum() > 0 else torch.full_like(s, 1 / len(s))
    return (0.5 * (p + 1 / len(s)) if mode == "mixture" else p).clamp_min(1e-12)


def _forward(x, U, V, idx, Ua, Va, sigma):  # x (N, in) -> (y, h): h = x V_eff, y = (h ⊙ σ) U_effᵀ
    h = (x @ V).index_copy_(-1, idx, x @ Va)
    s = h * sigma
    return s.index_fill(-1, idx, 0) @ U.T + s[:, idx] @ Ua.T, h  # stale buffer columns excluded


class _Spectral(torch.autograd.Function):
    """The factored product with SST's gradients: true for x and σ, without the σ_i factor for the active columns."""

    @staticmethod
    def forward(ctx, x, U, V, idx, Ua, Va, sigma):
        y, h = _forward(x, U, V, idx, Ua, Va, sigma)
        ctx.save_for_backward(x, h, U, V, idx, Ua, Va, sigma)
        return y

    @staticmethod
    def backward(ctx, g):
        x, h, U, V, idx, Ua, Va, sigma = ctx.saved_tensors
        t = (g @ U).index_copy_(-1, idx, g @ Ua)  # g U_eff: t_i = g·U_i
        dx = d_sigma = dUa = dVa = None
        if ctx.needs_input_grad[0]:
            ts = t * sigma
            dx = ts.index_fill(-1, idx, 0) @ V.T + ts[:, idx] @ Va.T
        if ctx.needs_input_grad[6]:
            d_sigma = (t * h).sum(0)  # U_iᵀ G V_i
        if ctx.needs_input_grad[4]:
            dUa = g.T @ h[:, idx]  # G V_i
        if ctx.needs_input_grad[5]:
            dVa = x.T @ t[:, idx]  # Gᵀ U_i
        return dx, None, None, None, dUa, dVa, d_sigma


class SSTLinear(nn.Module):
    """An ``nn.Linear`` (out, in) in spectral form. Buffers ``U`` (out, k), ``V`` (in, k) hold every singular vector
    (the active columns are written back at each resampling), ``index`` (r,) the active set; parameters ``sigma``
    (k,), ``U_active`` (out, r), ``V_active`` (in, r) and ``bias``."""

    def __init__(self, linear: nn.Linear, rank: int, *, sampling: str = "mixture",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        W = linear.weight.detach()
        self.out_features, self.in_features = W.shape
        k = min(W.shape)
        if not 1 <= rank <= k:
            raise SubspacesError(f"SST rank={rank} for a {tuple(W.shape)} weight: use 1..{k}")
        self.rank, self.sampling = rank, sampling
        U, S, Vh = torch.linalg.svd(W.to(torch.promote_types(W.dtype, torch.float32)), full_matrices=False)
        self.register_buffer("U", U.to(W.dtype).contiguous())
        self.register_buffer("V", Vh.T.to(W.dtype).contiguous())
        self.register_buffer("index", torch.arange(rank, device=W.device))
        self.sigma = nn.Parameter(S.to(W.dtype))
        self.U_active = nn.Parameter(self.U[:, :rank].clone())
        self.V_active = nn.Parameter(self.V[:, :rank].clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.resample_(generator)

    def forward(self, x: Tensor) -> Tensor:
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.sigma.dtype
        args = [t.to(dt) for t in (self.U, self.V)] + [self.index] + [
            t.to(dt) for t in (self.U_active, self.V_active, self.sigma)]
        flat = x.reshape(-1, self.in_features).to(dt)
        with torch.autocast(dev, enabled=False):
            if torch.is_grad_enabled():
                y = _Spectral.apply(flat, *args)
            else:
                y = _forward(flat, *args)[0]
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(dt)

    @torch.no_grad()
    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """The current ``(U (out, k), σ (k,), V (in, k))`` with the active columns in place (copies)."""
        return (self.U.index_copy(1, self.index, self.U_active), self.sigma.detach().clone(),
                self.V.index_copy(1, self.index, self.V_active))

    @torch.no_grad()
    def resample_(self, generator: torch.Generator | None = None) -> None:
        """Write the active columns back, draw r new indices without replacement, load them into the parameters."""
        self.U.index_copy_(1, self.index, self.U_active)
        self.V.index_copy_(1, self.index, self.V_active)
        p = sampling_probabilities(self.sigma, self.sampling)
        idx = torch.multinomial(p, self.rank, replacement=False, generator=generator).sort().values
        self.index.copy_(idx)
        self.U_active.copy_(self.U[:, self.index])
        self.V_active.copy_(self.V[:, self.index])

    @torch.no_grad()
    def resvd_(self) -> None:
        """``[U, σ, Vᵀ] ← SVD(U diag(σ) Vᵀ)`` via QR of U, V and the SVD of the k×k core; keeps the active set."""
        U, S, V = self.factors()
        dt = torch.promote_types(S.dtype, torch.float32)
        Qu, Ru = torch.linalg.qr(U.to(dt))
        Qv, Rv = torch.linalg.qr(V.to(dt))
        A, S, Bh = torch.linalg.svd((Ru * S.to(dt)) @ Rv.T)
        self.U.copy_(Qu @ A)
        self.V.copy_(Qv @ Bh.T)
        self.sigma.copy_(S)
        self.U_active.copy_(self.U[:, self.index])
        self.V_active.copy_(self.V[:, self.index])

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Unit ℓ2 norm for the active columns (magnitude lives in σ); σ ≥ 0."""
        for P in (self.U_active, self.V_active):
            P.div_(P.float().norm(dim=0).clamp_min(1e-12).to(P.dtype))
        self.sigma.clamp_(min=0)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The dense ``nn.Linear`` with weight ``U diag(σ) Vᵀ`` (computed in float32 at least)."""
        U, S, V = self.factors()
        dt = torch.promote_types(S.dtype, torch.float32)
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=S.device, dtype=S.dtype)
        layer.weight.copy_((U.to(dt) * S.to(dt)) @ V.to(dt).T)
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def sst_(model: nn.Module, config: SST | None = None, *, generator: torch.Generator | None = None,
         **hyperparameters: Any) -> list[tuple[str, SSTLinear]]:
    """Replace, in place, every ``nn.Linear`` whose qualified name contains one of ``config.targets`` by an
    ``SSTLinear``; returns the new layers by name. The initial active sets are drawn from ``generator``
    (default: seeded with ``config.seed``)."""
    config = config if config is not None else SST(**hyperparameters)
    chosen = [(n, m) for n, m in model.named_modules()
              if type(m) is nn.Linear and any(t in n for t in config.targets)]
    if not chosen:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise SubspacesError(f"SST targets={config.targets!r} match no nn.Linear; some of the model's: {linears}")
    for name, m in chosen:
        if config.rank > min(m.weight.shape):
            raise SubspacesError(f"SST rank={config.rank} exceeds min(out, in)={min(m.weight.shape)} of {name} "
                                 f"{tuple(m.weight.shape)}: lower rank or narrow targets")
    gen = generator if generator is not None else torch.Generator().manual_seed(config.seed)
    out = []
    for name, m in chosen:
        parent_name, _, child = name.rpartition(".")
        layer = SSTLinear(m, config.rank, sampling=config.sampling, generator=gen)
        setattr(model.get_submodule(parent_name), child, layer)
        out.append((name, layer))
    return out


class SSTOptimizer(Scheduled):
    """AdamW over the trainable parameters plus SST's schedule after each step; the generator state is saved with
    the step count so a resumed run draws the same columns."""

    def __init__(self, params, layers: list[SSTLinear], config: SST, generator: torch.Generator, *, lr: float,
                 weight_decay: float = 0.0) -> None:
        super().__init__(torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
        self.layers, self.config, self.generator = layers, config, generator

    def after_step(self) -> None:
        for layer in self.layers:
            layer.renormalize_()
        T3 = self.config.steps_per_iteration
        if self.steps % T3 == 0:
            iteration = self.steps // T3
            for layer in self.layers:
                per_round = self.config.iterations_per_round or math.ceil(len(layer.sigma) / layer.rank)
                if iteration % per_round == 0:  # a new round: re-align U, V with the current weight
                    layer.resvd_()
                    self.inner.state.pop(layer.sigma, None)
                layer.resample_(self.generator)
                for p in (layer.U_active, layer.V_active):  # fresh moments for the new columns
                    self.inner.state.pop(p, None)

    def schedule_state(self) -> dict[str, Tensor]:
        return {**super().schedule_state(), "generator": self.generator.get_state()}

    def load_schedule_state(self, state: dict[str, Tensor]) -> None:
        super().load_schedule_state(state)
        self.generator.set_state(state["generator"].cpu().to(torch.uint8))


@TRAIN.register("sst", paper="https://arxiv.org/abs/2405.15481",
                defaults={"pretrain": {"lr": 3e-3}}, status="partial",
                note="no LR warmup after resampling; not checked against the official code")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SST:
    """Sparse Spectral Training: ``rank`` active singular pairs per layer, redrawn every ``steps_per_iteration``
    (T3) steps; a round of ``iterations_per_round`` iterations (None: ⌈k/r⌉, one pass over the spectrum) starts
    with a re-SVD. ``sampling``: "mixture" (½(1/k + σ_i/Σσ)) or "sigma" (∝ σ_i). ``targets``: name fragments of
    the replaced ``nn.Linear`` modules (embeddings and the head stay dense)."""

    rank: int = 64
    steps_per_iteration: int = 200
    iterations_per_round: int | None = None
    sampling: str = "mixture"
    targets: tuple[str, ...] = ("attn", "mlp", "attention")
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("SST", "rank", self.rank)
        check_positive_int("SST", "steps_per_iteration", self.steps_per_iteration)
        if self.iterations_per_round is not None:
            check_positive_int("SST", "iterations_per_round", self.iterations_per_round)
        if self.sampling not in SAMPLING:
            raise SubspacesError(f"SST sampling={self.sampling!r}: allowed {SAMPLING}")
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise SubspacesError(f"SST targets={self.targets!r}: a non-empty list of module-name fragments")
        object.__setattr__(self, "targets", tuple(targets))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SubspacesError(f"SST seed={self.seed!r}: must be an integer")

    def setup(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0) -> SSTOptimizer:
        """Reparameterize ``model`` (``sst_``) and return the optimizer whose ``step()`` runs SST's schedule."""
        generator = torch.Generator().manual_seed(self.seed)
        layers = [layer for _, layer in sst_(model, self, generator=generator)]
        params = [p for p in model.parameters() if p.requires_grad]
        return SSTOptimizer(params, layers, self, generator, lr=lr, weight_decay=weight_decay)
