"""The MatryoshkaKV attention patch: per (layer, KV head) orthogonal projections of post-RoPE keys and of values,
with a truncated (compressed) KV cache. The method (PCA init, training, rate search) is in ``matryoshka_kv.py``.

Per KV head, with P_K = U_K[:, :r_k], P_V = U_V[:, :r_v] (U = Cayley(X) ∈ SO(d_h)):
``q' = q P_K, k' = (k − μ_K) P_K, o = softmax(q'k'ᵀ/√d_h + mask) v' P_Vᵀ + μ_V with v' = (v − μ_V) P_V``.

Mechanism (no copy of the model's attention code): each attention module gets a child ``matryoshka_kv``
(``KVProjection``: X_K, X_V, μ_K, μ_V and the ranks r_k, r_v as plain integer buffers), a forward pre-hook that
hands its forward a proxy of the cache, and a private shallow copy of its config whose attention implementation
is ``"matryoshka_kv"`` (registered in transformers' ``AttentionInterface``). The forward applies RoPE and calls
``cache.update(k, v)``; the proxy projects there — so the real cache (``DynamicCache``) stores per layer one tensor
(batch, 1, tokens, Σ_heads r) of the heads' truncated coordinates, concatenated — and our attention function
projects the query, zero-pads every head to the layer's largest rank (zeros change neither scores nor outputs),
calls the model's original attention function (sdpa, eager, ...) and maps the output back with P_Vᵀ and μ_V.
Works for attention modules that apply RoPE before ``cache.update`` (LLaMA, Mistral, Qwen2/3); needs a cache
that concatenates along the token axis (the default ``DynamicCache``; not ``StaticCache``).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._errors import SubspacesError

NAME = "matryoshka_kv"


def cayley(X: Tensor) -> Tensor:
    """U = (I − A/2)⁻¹(I + A/2), A = X − Xᵀ: orthogonal with det +1 for any square X (batched over leading dims)."""
    A = (X - X.transpose(-1, -2)) / 2
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device).expand_as(A)
    return torch.linalg.solve(eye - A, eye + A)


def inverse_cayley(U: Tensor) -> Tensor:
    """The skew X = A/2 with cayley(X) = U, from A/2 = (U − I)(U + I)⁻¹; U ∈ SO(d) without eigenvalue −1."""
    eye = torch.eye(U.shape[-1], dtype=U.dtype, device=U.device).expand_as(U)
    return torch.linalg.solve((U + eye).transpose(-1, -2), (U - eye).transpose(-1, -2)).transpose(-1, -2)


def pca_basis(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors (columns, descending eigenvalues) of a symmetric (…, d, d) matrix as a rotation (det +1), and
    the eigenvalues. Column signs are free in PCA: we make the diagonal non-negative (U near I, so U + I is well
    conditioned for the inverse Cayley map) and flip the column with the smallest |U_ii| if det = −1."""
    lam, U = torch.linalg.eigh(cov)
    lam, U = lam.flip(-1), U.flip(-1)
    diag = U.diagonal(dim1=-2, dim2=-1)
    U = U * torch.where(diag < 0, -1.0, 1.0).to(U.dtype).unsqueeze(-2)
    neg = torch.linalg.det(U) < 0
    if neg.any():
        col = U.diagonal(dim1=-2, dim2=-1).abs().argmin(-1)
        sign = torch.ones_like(lam)
        sign[neg, col[neg]] = -1.0
        U = U * sign.unsqueeze(-2)
    return U, lam.clamp_min(0)


class KVProjection(nn.Module):
    """The projections of one attention layer: ``xk``, ``xv`` (H, d, d) Cayley parameters, ``mu_k``, ``mu_v``
    (H, d) means, ``r_k``, ``r_v`` (H,) integer ranks (buffers). At init U = I, μ = 0, r = d: the identity."""

    def __init__(self, heads: int, head_dim: int, groups: int, base_impl: str | None, device=None) -> None:
        super().__init__()
        self.heads, self.head_dim, self.groups, self.base_impl = heads, head_dim, groups, base_impl
        zeros = dict(dtype=torch.float32, device=device)
        self.xk = nn.Parameter(torch.zeros(heads, head_dim, head_dim, **zeros))
        self.xv = nn.Parameter(torch.zeros(heads, head_dim, head_dim, **zeros))
        self.mu_k = nn.Parameter(torch.zeros(heads, head_dim, **zeros))
        self.mu_v = nn.Parameter(torch.zeros(heads, head_dim, **zeros))
        self.register_buffer("r_k", torch.full((heads,), head_dim, dtype=torch.long, device=device))
        self.register_buffer("r_v", torch.full((heads,), head_dim, dtype=torch.long, device=device))
        self.enabled, self.recording, self.packed = True, False, False
        self.stats: dict[str, Tensor] = {}

    def _proj(self, X: Tensor, r: Tensor, dtype: torch.dtype) -> tuple[Tensor, list[int]]:
        """U[:, :R] with the columns ≥ r of each head zeroed (H, d, R), R = max r; and the ranks as ints."""
        ranks = r.tolist()
        U = cayley(X.float())[..., : max(ranks)]
        keep = torch.arange(U.shape[-1], device=U.device) < r.to(U.device).unsqueeze(-1)
        return (U * keep.unsqueeze(-2)).to(dtype), ranks

    def pack(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H, T, d) keys and values → the cached (B, 1, T, Σ r) truncated coordinates."""
        out = []
        for x, X, mu, r in ((k, self.xk, self.mu_k, self.r_k), (v, self.xv, self.mu_v, self.r_v)):
            P, ranks = self._proj(X, r, x.dtype)
            y = torch.einsum("bhtd,hdr->bhtr", x - mu.to(x.dtype)[:, None], P)
            out.append(torch.cat([y[:, h, :, :n] for h, n in enumerate(ranks)], -1).unsqueeze(1))
        return out[0], out[1]

    def unpack(self, packed: Tensor, r: Tensor) -> Tensor:
        """(B, 1, T, Σ r) → (B, H, T, R) with every head zero-padded to R = max r."""
        ranks = r.tolist()
        parts = packed.squeeze(1).split(ranks, -1)
        return torch.stack([F.pad(p, (0, max(ranks) - n)) for p, n in zip(parts, ranks)], 1)

    def query(self, q: Tensor) -> Tensor:
        """(B, H·g, T, d) post-RoPE queries → (B, H·g, T, R_k); query head j uses KV head j // g."""
        P, _ = self._proj(self.xk, self.r_k, q.dtype)
        return torch.einsum("bhtd,hdr->bhtr", q, P.repeat_interleave(self.groups, 0))

    def output(self, o: Tensor) -> Tensor:
        """(B, T, H·g, R_v) attention output in value coordinates → (B, T, H·g, d), + μ_V (rows of softmax sum to 1)."""
        P, _ = self._proj(self.xv, self.r_v, o.dtype)
        mu = self.mu_v.to(o.dtype).repeat_interleave(self.groups, 0)
        return torch.einsum("bthr,hdr->bthd", o, P.repeat_interleave(self.groups, 0)) + mu

    @torch.no_grad()
    def observe(self, k: Tensor, v: Tensor) -> None:
        """Accumulate per-head float64 sums of post-RoPE keys and of values: count, Σx, Σxxᵀ."""
        s = self.stats
        s["n"] = s.get("n", 0) + k.shape[0] * k.shape[2]
        for name, x in (("k", k), ("v", v)):
            x = x.detach().to(torch.float64)
            s[f"sum_{name}"] = s.get(f"sum_{name}", 0) + x.sum((0, 2))
            s[f"mom_{name}"] = s.get(f"mom_{name}", 0) + torch.einsum("bhtd,bhte->hde", x, x)

    def moments(self, name: str) -> tuple[Tensor, Tensor]:
        """Mean (H, d) and covariance (H, d, d) of the observed keys (``"k"``) or values (``"v"``), float64."""
        if not self.stats:
            raise SubspacesError("no keys/values were observed: run calibration batches through the model first")
        n = self.stats["n"]
        mu = self.stats[f"sum_{name}"] / n
        return mu, self.stats[f"mom_{name}"] / n - mu.unsqueeze(-1) * mu.unsqueeze(-2)


class _Projecting:
    """Stands in for the attention forward's cache: ``update`` projects the post-RoPE keys and the values first."""

    def __init__(self, cache: Any, state: KVProjection) -> None:
        self._cache, self._state = cache, state

    def update(self, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        s = self._state
        if s.recording:
            s.observe(key, value)
        if s.enabled:
            key, value = s.pack(key, value)
            s.packed = True
        return (key, value) if self._cache is None else self._cache.update(key, value, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # everything else is the real cache's
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._cache, name)


def _cache_arg(module: nn.Module) -> str:
    params = inspect.signature(type(module).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    state: KVProjection = module._modules[NAME]
    state.packed = False
    if not (state.enabled or state.recording):
        return None
    key = next((k for k in ("cache", "past_key_values") if k in kwargs), None) or _cache_arg(module)
    return args, {**kwargs, key: _Projecting(kwargs.get(key), state)}


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
               *args: Any, **kwargs: Any) -> tuple[Tensor, Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    state: KVProjection = module._modules[NAME]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    base = ALL_ATTENTION_FUNCTIONS.get_interface(state.base_impl or "eager", eager)
    if not state.packed:  # compression off for this call (teacher pass)
        return base(module, query, key, value, attention_mask, *args, **kwargs)
    state.packed = False
    q, k, v = state.query(query), state.unpack(key, state.r_k), state.unpack(value, state.r_v)
    out, weights = base(module, q, k, v, attention_mask, *args, **kwargs)
    return state.output(out), weights


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Self-attention modules with q/k/v/o projections and a ``head_dim`` (LLaMA family), by name."""
    return {n: m for n, m in model.named_modules()
            if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "config"))}


def attach(modules: dict[str, nn.Module]) -> list[KVProjection]:
    """Give every module its identity ``KVProjection`` (already attached ones are kept) and return them."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, _attention)
    states = []
    for module in modules.values():
        if NAME not in module._modules:
            d = module.head_dim
            heads = module.k_proj.out_features // d
            impl = module.config._attn_implementation
            module.add_module(NAME, KVProjection(heads, d, module.num_key_value_groups, impl,
                                                 device=module.k_proj.weight.device))
            module.config = copy.copy(module.config)  # private: only this module dispatches to ``_attention``
            module.config._attn_implementation_internal = NAME
            module.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        states.append(module._modules[NAME])
    return states


def states(model: nn.Module) -> list[KVProjection]:
    return [m for m in model.modules() if isinstance(m, KVProjection)]


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the model without the projections (the teacher / the uncompressed reference)."""
    found = states(model)
    flags = [s.enabled for s in found]
    for s in found:
        s.enabled = False
    try:
        yield
    finally:
        for s, f in zip(found, flags):
            s.enabled = f
