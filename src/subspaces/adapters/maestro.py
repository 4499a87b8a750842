"""Maestro: trainable low-rank decomposition with Low-rank Ordered Decomposition (Horváth, Laskaridis, Rajput, Wang,
ICML 2024). https://arxiv.org/abs/2308.14929

Not additive: a targeted layer computes ``y = U[:, :k'] V[:k'] x + b`` (Linear, GPT-2 Conv1D), or for Conv2d a
``conv_u`` (C_in→k, the layer's kernel/stride/padding/dilation) then a 1×1 ``conv_v`` (k→C_out); k = min(d_out, d_in)
(``rank`` caps it). ``init="svd"``: U = U_s√S, V = √S V_sᵀ of the layer's weight (exact at full k); ``"random"``:
nn.Linear/nn.Conv2d's default init of both factors. Schedule (``ss.adapters.penalty``/``step``, or the Trainer
callback ``AdapterSchedule``): the hierarchical group lasso ``gp_lambda · Σ_j (‖V_{j:}‖_F + ‖U_{:,j:}‖_F)``; after
each step the single-layer sampler picks one (layer, width j) pair of the shuffled enumeration for the next step
(ordered dropout in train mode: that layer keeps its first j surviving components, the others run at full width);
every ``shrink_every`` steps progressive shrinking masks (``low_rank``) the components whose importance
``‖V_{j:}‖_F · ‖U_{:,j:}‖_F`` is below ``threshold``. Deploy with ``ss.truncate_(model, rank=int | {layer: int})``
(slices U, V) and/or ``fold_`` (W ← U V).
Official code: https://github.com/SamuelHorvath/Maestro-LoD (``maestro/layers/{linear,conv,utils}.py``,
``samplers/single_layer.py``, ``cifar_mnist_main.py``): its ``out_network``/``conv_v`` is U here,
``in_network``/``conv_u`` is V.

An unmodified Trainer trains the sampled sub-model only (the official ``--no-full-pass``). The paper's default adds a
full-width pass; in a custom loop, as the official script (the sampled pass distils the full one)::

    with maestro.full_width(model):
        full = model(x)
    loss = ce(full, y) + ce(model(x), full.detach().softmax(-1)) + ss.adapters.penalty(model)

Deviations: the layer keeps its class and keys, so its dense matmul still runs in forward and its output is discarded
(one extra dense-layer cost per adapted layer; deploy via ``fold_`` or the factors); the layer bias and untargeted
parameters stay frozen (the paper trains all: use ``modules_to_save``); shrinking every ``shrink_every`` steps (the
code: per epoch); the sampler has its own seeded RNG and starts at the first ``step`` (step one is full width); the
lasso's √ is clamped at 0 (a zero tail gets gradient 0, not NaN); no automatic dense-vs-factorized choice per layer
(``model_to_full``). Conv2d: groups=1 and zero padding only (the code: groups=1).
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import SubspacesError
from .._registry import ADAPTERS
from ._core import DELTA, AdapterConfig, Delta, adapted_layers, linear_dims, master_dtype, resize_to, validate_common

_INITS = ("svd", "random")
_SAMPLERS = ("single_layer", "none")


def _dims(layer: nn.Module) -> tuple[int, int, str]:
    """(d_in, d_out, kind) of the layer as a (d_out, d_in) matrix; a conv's d_in is C_in·kh·kw."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise SubspacesError("maestro adapts nn.Conv2d with groups=1 and padding_mode='zeros' only")
        return layer.weight[0].numel(), layer.out_channels, "conv"
    d_in, d_out, transposed = linear_dims(layer, "maestro")
    return d_in, d_out, "conv1d" if transposed else "linear"


@ADAPTERS.register("maestro", paper="https://arxiv.org/abs/2308.14929", status="partial",
                   note="layer biases stay frozen (modules_to_save); no automatic dense-vs-factorized choice")
@dataclass(frozen=True, kw_only=True)
class Maestro(AdapterConfig):
    """Maestro hyperparameters: ``rank`` caps the inner width (None: full min(d_in, d_out)); ``gp_lambda`` the group
    lasso weight (official CLI default; its CIFAR/MNIST script uses 1e-6); ``shrink_every`` steps between
    progressive shrinkings (0: off); ``seed`` the sampler's RNG."""

    init: str = "svd"
    rank: int | None = None
    gp_lambda: float = 5e-3
    threshold: float = 1e-5
    shrink_every: int = 0
    sampler: str = "single_layer"
    seed: int = 0

    def __post_init__(self) -> None:
        validate_common(self)
        if self.init not in _INITS:
            raise SubspacesError(f"maestro init={self.init!r}: allowed {', '.join(_INITS)}")
        if self.sampler not in _SAMPLERS:
            raise SubspacesError(f"maestro sampler={self.sampler!r}: allowed {', '.join(_SAMPLERS)}")
        for name in ("gp_lambda", "threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise SubspacesError(f"maestro {name}={v!r}: must be a number >= 0")
        for name in ("shrink_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SubspacesError(f"maestro {name}={v!r}: must be an integer >= 0")

    def inner_dim(self, layer: nn.Module) -> int:
        d_in, d_out, _ = _dims(layer)
        return min(d_in, d_out, self.rank or d_in)

    def num_trainable(self, layer: nn.Module) -> int:
        d_in, d_out, _ = _dims(layer)
        return self.inner_dim(layer) * (d_in + d_out)

    def build(self, layer: nn.Module, *, init: bool = True) -> MaestroDelta:
        delta = MaestroDelta(layer, self.inner_dim(layer))
        if init:
            delta.reset(self.init)
        return delta

    @classmethod
    def penalty(cls, deltas: list[Delta]) -> torch.Tensor | None:
        terms = [d.config.gp_lambda * sum(d.tail_norms()).sum() for d in deltas if d.config.gp_lambda > 0]
        return sum(terms) if terms else None

    @classmethod
    def after_step(cls, deltas: list[Delta], *, lr: float | None, optimizer=None) -> None:
        state = deltas[0].__dict__.setdefault("_schedule", {"steps": 0, "order": [], "key": None,
                                                            "rng": random.Random(deltas[0].config.seed)})
        state["steps"] += 1
        for d in deltas:
            if d.config.shrink_every and state["steps"] % d.config.shrink_every == 0:
                d.shrink_(d.config.threshold)
        _sample_next(deltas, state)


def _sample_next(deltas: list[Delta], state: dict) -> None:
    """SingleLayerSampler: walk a shuffled list of all (layer i, width j ≤ k_i) pairs, reshuffled when exhausted and
    rebuilt when the surviving widths change (the code rebuilds it after each shrinking)."""
    for d in deltas:
        d.width = None
    pool = [d for d in deltas if d.config.sampler == "single_layer"]
    key = tuple((id(d), d.alive) for d in pool)
    if state["key"] != key:
        state["key"], state["order"] = key, []
    if not state["order"]:
        state["order"] = [(i, j) for i, d in enumerate(pool) for j in range(1, d.alive + 1)]
        state["rng"].shuffle(state["order"])
    if state["order"]:
        i, j = state["order"].pop()
        pool[i].width = j


class MaestroDelta(Delta):
    """Factors U (d_out, k[, 1, 1]) and V (k, d_in | C_in, kh, kw); ``low_rank`` marks surviving components (always a
    prefix: the hierarchical importance is non-increasing in j), ``alive`` is its count on the host (no device sync
    in forward), ``width`` the sampled ordered-dropout width of the next training step (None: all alive)."""

    def __init__(self, layer: nn.Module, k: int) -> None:
        super().__init__()
        _, d_out, self.kind = _dims(layer)
        self.__dict__["_layer"] = layer  # not a child (the layer owns this delta); deepcopy's memo maps it
        w = layer.weight
        kw = dict(device=w.device, dtype=master_dtype(w))
        conv = self.kind == "conv"
        self.U = nn.Parameter(torch.zeros(d_out, k, *((1, 1) if conv else ()), **kw))
        self.V = nn.Parameter(torch.zeros(k, *(w.shape[1:] if conv else (_dims(layer)[0],)), **kw))
        self.register_buffer("low_rank", torch.ones(k, dtype=torch.bool, device=w.device))
        self.alive, self.width = k, None

    @property
    def layer(self) -> nn.Module:
        return self.__dict__["_layer"]

    def matrix(self) -> torch.Tensor:
        """The layer's weight as a (d_out, d_in) matrix in the factors' dtype."""
        w = self.layer.weight.detach().to(self.U.dtype)
        return w.T if self.kind == "conv1d" else w.reshape(w.shape[0], -1)

    @torch.no_grad()
    def reset(self, init: str) -> None:
        if init == "random":  # nn.Linear / nn.Conv2d default init of both factor layers
            for p in (self.U, self.V):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            return
        from ..linalg import truncated_svd

        Us, S, Vh = truncated_svd(self.matrix(), self.U.shape[1])
        root = S.sqrt()
        self.U.copy_((Us * root).reshape(self.U.shape))
        self.V.copy_((root[:, None] * Vh).reshape(self.V.shape))

    def _factors(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if n == 0:  # nothing survives: the output is the bias (one zero component keeps the shapes)
            kw = dict(dtype=dtype, device=self.U.device)
            return torch.zeros(self.U.shape[0], 1, *self.U.shape[2:], **kw), torch.zeros(1, *self.V.shape[1:], **kw)
        return self.U[:, :n].to(dtype), self.V[:n].to(dtype)

    def _run(self, x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "conv":
            lay = self.layer
            return F.conv2d(F.conv2d(x, V, None, lay.stride, lay.padding, lay.dilation), U, bias)
        return F.linear(F.linear(x, V), U, bias)

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The factorized layer's output; the base ``output`` is discarded (its matmul already ran)."""
        dt = output.dtype
        n = self.alive if self.width is None or not self.training else min(self.width, self.alive)
        bias = self.layer.bias
        return self._run(x.to(dt), *self._factors(n, dt), None if bias is None else bias.to(dt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW·x = U V x − W x (the contract's branch; ``add_to`` is what the adapted layer computes)."""
        x = x.to(self.U.dtype)
        w = self.layer.weight.to(x.dtype) if self.kind == "conv" else self.matrix()
        base = F.conv2d(x, w, None, self.layer.stride, self.layer.padding, self.layer.dilation) \
            if self.kind == "conv" else F.linear(x, w)
        return self._run(x, *self._factors(self.alive, x.dtype), None) - base

    def weight(self) -> torch.Tensor:
        """U V − W in the layer's layout, so that ``fold_`` gives W ← U V (surviving components only)."""
        U, V = self._factors(self.alive, self.U.dtype)
        dense = U.reshape(U.shape[0], -1) @ V.reshape(V.shape[0], -1)
        w = self.layer.weight.detach().to(dense.dtype)
        return (dense.T if self.kind == "conv1d" else dense.reshape(w.shape)) - w

    def tail_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖V_{j:}‖_F, ‖U_{:,j:}‖_F) for every physical component j (masked ones too, as the official code)."""
        k = self.U.shape[1]
        tiny = torch.finfo(self.U.dtype).tiny

        def tail(sq: torch.Tensor) -> torch.Tensor:
            return sq.flip(0).cumsum(0).flip(0).clamp_min(tiny).sqrt()

        return tail(self.V.reshape(k, -1).pow(2).sum(1)), tail(self.U.reshape(-1, k).pow(2).sum(0))

    @torch.no_grad()
    def importance(self) -> torch.Tensor:
        v, u = self.tail_norms()
        return v * u

    @torch.no_grad()
    def shrink_(self, threshold: float) -> None:
        """Progressive shrinking: keep the components with importance ≥ threshold (a prefix; cumprod guards NaN)."""
        self.low_rank.copy_((self.importance() >= threshold).cumprod(0).bool())
        self._sync()

    @torch.no_grad()
    def truncate_(self, rank: int) -> None:
        """Keep the leading ``rank`` surviving components, physically (for deployment: an optimizer holding U, V
        is not resized)."""
        n = min(rank, self.alive)
        self.U.data = self.U.data[:, :n].clone(memory_format=torch.contiguous_format)
        self.V.data = self.V.data[:n].clone(memory_format=torch.contiguous_format)
        self.low_rank = torch.ones(n, dtype=torch.bool, device=self.low_rank.device)
        self._sync()

    def prepare_load(self, state: dict[str, torch.Tensor]) -> None:
        resize_to(self, state)  # a truncated checkpoint has smaller U, V, low_rank

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync()

    def _sync(self) -> None:
        self.alive, self.width = int(self.low_rank.sum()), None
        if not bool(self.low_rank[: self.alive].all()):
            raise SubspacesError("maestro: the low_rank mask must keep a leading block of components")


def _deltas(model: nn.Module) -> dict[str, MaestroDelta]:
    return {n: layer._modules[DELTA] for n, layer in adapted_layers(model)
            if isinstance(layer._modules[DELTA], MaestroDelta)}


def ranks(model: nn.Module) -> dict[str, int]:
    """Surviving components per Maestro layer (choose per-layer ranks for ``ss.truncate_`` from these)."""
    return {n: d.alive for n, d in _deltas(model).items()}


@contextmanager
def full_width(model: nn.Module):
    """Within the block every Maestro layer runs at full width even in train mode (the paper's full pass)."""
    deltas = list(_deltas(model).values())
    widths = [d.width for d in deltas]
    for d in deltas:
        d.width = None
    try:
        yield model
    finally:
        for d, w in zip(deltas, widths):
            d.width = w
