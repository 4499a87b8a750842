"""Scatterbrain: Chen, Dao, Winsor, Song, Rudra, Ré, "Scatterbrain: Unifying Sparse and Low-rank Attention
Approximation", NeurIPS 2021, https://arxiv.org/abs/2110.15343 (code: https://github.com/HazyResearch/fly,
``src/models/attention/sbsmyrf_attention.py``, ``feature_maps_sb.py``, ``hash_utils.py``).

Rule: exp(τQKᵀ) ≈ S + L with L = φ(Q)φ(K)ᵀ (Performer, ``_performer``) and S = exp(τqᵢ·kⱼ) − φ(qᵢ)ᵀφ(kⱼ) on the
pairs that share an LSH bucket (``_lsh``), so those entries are exact; O = (SV + LV)/(S1 + L1), in O(n) memory.

Implemented as in the official code: positive features in log scale (per-query and per-head key scales), XBOX+ LSH
sorted into equal buckets, duplicate pairs over hash rounds divided by their count, rounds combined in a common
log scale, denominator clamped at 1e-6 in that scale. Deliberate deviations: features are the plain FAVOR+ map of
the paper (the code's default doubles them with ±ω, the "cosh" variant); features and hashes are redrawn from
``generator`` at every call; the key scale and the XBOX+ norms ignore padded keys; a causal variant is added
(chunked prefix-sum linear attention + causal masks inside buckets) and queries may be fewer than keys (KV cache:
query i sits at position i + n_k − n_q); n_hashes = 0 gives plain Performer attention. The model drop-in
(``scatterbrain_``) is inference-only: attention dropout is not applied and no training recipe is given.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._errors import SubspacesError
from .._registry import COMPRESS
from . import _lsh
from ._performer import causal_linear_attention, key_features, linear_attention, orthogonal_gaussian, query_features


def _draw_directions(dim: int, n_hashes: int, generator: torch.Generator | None) -> Tensor:
    """One Gaussian projection direction per hash round: (dim, n_hashes), float64."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(dim, n_hashes, generator=generator, dtype=torch.float64, device=device)


@dataclasses.dataclass
class _Prep:
    """Everything both paths share: padded q, k, v (work dtype), scaled features and their per-query log scale
    ``prime`` (of φ(q)ᵀφ(k)), validity and positions (B, H, n), the hash orders (R, B, H, n) and bucket sizes."""

    q: Tensor
    k: Tensor
    v: Tensor
    phq: Tensor
    phk: Tensor
    prime: Tensor
    q_valid: Tensor
    k_valid: Tensor
    q_pos: Tensor
    k_pos: Tensor
    q_order: Tensor | None
    k_order: Tensor | None
    nb: int
    cq: int
    ck: int
    nq: int
    nk: int
    tau: float
    causal: bool


def _check(q: Tensor, k: Tensor, v: Tensor, nb_features: int, n_hashes: int, bucket_size: int, causal: bool,
           key_padding_mask: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] \
            or q.shape[-1] != k.shape[-1]:
        raise SubspacesError(f"scatterbrain_attention: q, k, v must be (batch, heads, n, d) with matching batch, heads "
                             f"and d, k/v of equal length; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    for name, val, low in (("nb_features", nb_features, 1), ("n_hashes", n_hashes, 0), ("bucket_size", bucket_size, 1)):
        if not isinstance(val, int) or isinstance(val, bool) or val < low:
            raise SubspacesError(f"scatterbrain: {name}={val!r}; allowed: an integer >= {low}")
    if causal and q.shape[-2] > k.shape[-2]:
        raise SubspacesError(f"scatterbrain_attention: causal needs n_q <= n_k, got {q.shape[-2]} > {k.shape[-2]}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[-2])):
        raise SubspacesError(f"key_padding_mask must be a bool (batch, n_k) = {(k.shape[0], k.shape[-2])} tensor "
                             f"(True: attend), got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def _prepare(q, k, v, nb_features, n_hashes, bucket_size, causal, key_padding_mask, scale, generator) -> _Prep:
    B, H, nq, d = q.shape
    nk = k.shape[-2]
    work = torch.promote_types(q.dtype, torch.float32)  # bf16/fp16 inputs are computed in float32
    tau = d ** -0.5 if scale is None else float(scale)
    omega = orthogonal_gaussian(nb_features, d, generator=generator).to(q.device, work)
    dirs = _draw_directions(d + 2, n_hashes, generator).to(q.device, work) if n_hashes else None
    nb = max(1, math.ceil(nk / bucket_size))
    cq, ck = math.ceil(nq / nb), math.ceil(nk / nb)  # key buckets hold at most bucket_size keys
    pq, pk = nb * cq - nq, nb * ck - nk
    qp, kp, vp = F.pad(q.to(work), (0, 0, 0, pq)), F.pad(k.to(work), (0, 0, 0, pk)), F.pad(v.to(work), (0, 0, 0, pk))
    dev = q.device
    k_valid = torch.arange(nk + pk, device=dev) < nk
    k_valid = k_valid.expand(B, H, -1)
    if key_padding_mask is not None:
        k_valid = k_valid & F.pad(key_padding_mask.to(dev), (0, pk))[:, None, :]
    q_valid = (torch.arange(nq + pq, device=dev) < nq).expand(B, H, -1)
    phq, sq = query_features(qp, omega, tau)
    phk, sk = key_features(kp, omega, tau, k_valid)
    q_order = k_order = None
    if n_hashes:
        qh, kh = _lsh.xbox_plus(qp, kp, q_valid, k_valid)
        q_order, k_order = _lsh.hash_order(qh, dirs, q_valid), _lsh.hash_order(kh, dirs, k_valid)
    q_pos = (torch.arange(nq + pq, device=dev) + (nk - nq)).expand(B, H, -1)
    k_pos = torch.arange(nk + pk, device=dev).expand(B, H, -1)
    return _Prep(qp, kp, vp, phq, phk, sq + sk, q_valid, k_valid, q_pos, k_pos, q_order, k_order,
                 nb, cq, ck, nq, nk, tau, causal)


def _attend(p: _Prep) -> Tensor:
    """O(n)-memory output (B, H, n_q, d_v): low-rank part, then one sparse correction per hash round."""
    if p.causal:
        num, den = causal_linear_attention(p.phq[..., :p.nq, :], p.phk[..., :p.nk, :], p.v[..., :p.nk, :])
        extra = p.q.shape[-2] - p.nq
        num, den = F.pad(num, (0, 0, 0, extra)), F.pad(den, (0, extra))
    else:
        num, den = linear_attention(p.phq, p.phk, p.v)
    scale = p.prime  # num, den are in units of exp(scale) per query
    if p.q_order is not None:
        rounds = p.q_order.shape[0]
        q_bucket = _lsh.inverse(p.q_order) // p.cq if rounds > 1 else None
        k_bucket = _lsh.inverse(p.k_order) // p.ck if rounds > 1 else None
        for r in range(rounds):
            qo, ko = p.q_order[r], p.k_order[r]

            def blk(x: Tensor, perm: Tensor, c: int) -> Tensor:
                return _lsh.take(x, perm).unflatten(-2, (p.nb, c))

            inner = blk(p.q, qo, p.cq) @ blk(p.k, ko, p.ck).transpose(-1, -2) * p.tau  # (B, H, nb, cq, ck)
            lin = blk(p.phq, qo, p.cq) @ blk(p.phk, ko, p.ck).transpose(-1, -2)
            prime = _lsh.take1(p.prime, qo).unflatten(-1, (p.nb, p.cq))
            valid = _lsh.take1(p.k_valid, ko).unflatten(-1, (p.nb, p.ck)).unsqueeze(-2)
            if p.causal:
                kpos = _lsh.take1(p.k_pos, ko).unflatten(-1, (p.nb, p.ck))
                qpos = _lsh.take1(p.q_pos, qo).unflatten(-1, (p.nb, p.cq))
                valid = valid & (kpos.unsqueeze(-2) <= qpos.unsqueeze(-1))
            inner = inner.masked_fill(~valid, -math.inf)
            top = torch.maximum(inner.amax(-1), prime)  # this round's log scale per query
            dots = torch.exp(inner - top.unsqueeze(-1)) - lin * torch.exp(prime - top).unsqueeze(-1)
            if rounds > 1:  # a pair met in c rounds is corrected 1/c in each of them
                dots = dots / _lsh.duplicates(q_bucket, k_bucket, qo, ko, p.cq, p.ck)
            dots = dots.masked_fill(~valid, 0.0)
            inv = _lsh.inverse(qo)
            o = _lsh.take((dots @ blk(p.v, ko, p.ck)).flatten(-3, -2), inv)
            s = _lsh.take1(dots.sum(-1).flatten(-2), inv)
            top = _lsh.take1(top.flatten(-2), inv)
            new = torch.maximum(scale, top)
            a, b = torch.exp(scale - new), torch.exp(top - new)
            num = num * a.unsqueeze(-1) + o * b.unsqueeze(-1)
            den = den * a + s * b
            scale = new
    return (num / den.clamp_min(1e-6).unsqueeze(-1))[..., :p.nq, :]


def _implied(p: _Prep) -> tuple[Tensor, Tensor, Tensor]:
    """The dense implied matrix for inspection: (A·e^{−N} (B, H, n_q, n_k), N (B, H, n_q), support), with
    A = S + L (exact exp(τq·k) on the support, φ(q)ᵀφ(k) elsewhere, 0 where masked) and N the row scale of
    ``_attend``. Builds n_q × n_k tensors: only for ``need_weights`` and tests."""
    nq, nk = p.nq, p.nk
    q, k = p.q[..., :nq, :], p.k[..., :nk, :]
    valid = p.k_valid[..., None, :nk].expand(-1, -1, nq, -1)
    if p.causal:
        valid = valid & (p.k_pos[..., None, :nk] <= p.q_pos[..., :nq, None])
    support = torch.zeros_like(valid)
    if p.q_order is not None:
        qb, kb = _lsh.inverse(p.q_order) // p.cq, _lsh.inverse(p.k_order) // p.ck
        support = (qb[..., :nq, None] == kb[..., None, :nk]).any(0) & valid
    inner = q @ k.transpose(-1, -2) * p.tau
    prime = p.prime[..., :nq]
    top = torch.maximum(inner.masked_fill(~support, -math.inf).amax(-1), prime)
    lin = (p.phq[..., :nq, :] @ p.phk[..., :nk, :].transpose(-1, -2)) * torch.exp(prime - top).unsqueeze(-1)
    a = torch.where(support, torch.exp(inner - top.unsqueeze(-1)), lin).masked_fill(~valid, 0.0)
    return a, top, support


def scatterbrain_attention(q: Tensor, k: Tensor, v: Tensor, *, nb_features: int, n_hashes: int, bucket_size: int,
                           causal: bool = False, key_padding_mask: Tensor | None = None, scale: float | None = None,
                           generator: torch.Generator | None = None,
                           need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
    """Scatterbrain attention of q (B, H, n_q, d), k (B, H, n_k, d), v (B, H, n_k, d_v) -> ((B, H, n_q, d_v), weights).

    Args:
        nb_features: m, the number of random features of the low-rank part.
        n_hashes: LSH rounds of the sparse part (0: Performer only).
        bucket_size: keys per bucket (at most); the sequence splits into ⌈n_k / bucket_size⌉ buckets.
        causal: query i attends to keys j ≤ i + n_k − n_q.
        key_padding_mask: bool (B, n_k), True where a key may be attended.
        scale: τ (default 1/√d).
        generator: the source of the random features and hash directions (drawn on its device; CPU without one).
        need_weights: also return the implied normalized attention matrix (B, H, n_q, n_k) (dense: O(n²) memory);
            otherwise ``None`` and nothing of size n_q × n_k is allocated.
    Returns the output in q's dtype and the weights (float32 or float64) or ``None``.
    """
    _check(q, k, v, nb_features, n_hashes, bucket_size, causal, key_padding_mask)
    p = _prepare(q, k, v, nb_features, n_hashes, bucket_size, causal, key_padding_mask, scale, generator)
    out = _attend(p).to(q.dtype)
    if not need_weights:
        return out, None
    a, _, _ = _implied(p)
    return out, a / a.sum(-1, keepdim=True).clamp_min(1e-6)


@COMPRESS.register("scatterbrain", paper="https://arxiv.org/abs/2110.15343", status="partial",
                   note="inference drop-in for LLaMA/BERT attention (plain causal/bidirectional masks with padding, "
                        "dynamic KV cache); no training recipe (attention dropout not applied), no fused CUDA kernel")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Scatterbrain:
    """Replace every attention layer's softmax attention by Scatterbrain (sparse LSH + low-rank Performer).

    nb_features: random features m (the paper: d·log d, e.g. 256); n_hashes: LSH rounds (1-4); bucket_size: keys
    per bucket (32-128); seed: seeds the generator from which features and hashes are redrawn at every forward.
    """

    nb_features: int = 256
    n_hashes: int = 2
    bucket_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("nb_features", 1), ("n_hashes", 0), ("bucket_size", 1), ("seed", 0)):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < low:
                raise SubspacesError(f"Scatterbrain {name}={val!r}; allowed: an integer >= {low}")

    def compress_model(self, model: Any, *, calibration: Any = None, ratio: Any = None, rank: Any = None,
                       energy: Any = None, targets: Any = "all-linear", exclude: Any = None,
                       allocation: str = "uniform", progress: bool = False, **kw: Any) -> dict:
        """Install Scatterbrain attention in ``model``; with ``calibration`` batches, report each attention layer's
        relative output error against exact attention and the end-to-end loss change (``attention_error``)."""
        given = {"ratio": ratio, "rank": rank, "energy": energy, "exclude": exclude}
        bad = [f"{n}={v!r}" for n, v in given.items() if v is not None]
        bad += [f"targets={targets!r}"] if targets != "all-linear" else []
        bad += [f"allocation={allocation!r}"] if allocation != "uniform" else []
        bad += [f"{n}={v!r}" for n, v in kw.items()]
        if bad:
            raise SubspacesError(f"scatterbrain replaces whole attention layers and takes no {', '.join(bad)}: "
                                 "give only nb_features, n_hashes, bucket_size, seed (and calibration)")
        scatterbrain_(model, nb_features=self.nb_features, n_hashes=self.n_hashes, bucket_size=self.bucket_size,
                      seed=self.seed)
        params = sum(p.numel() for p in model.parameters())
        report: dict[str, Any] = {"method": "scatterbrain", "allocation": None, "target_ratio": None,
                                  "params_before": params, "params_after": params, "ratio": 0.0,
                                  "config": dataclasses.asdict(self)}
        if calibration is None:
            report["layers"] = []
            report["note"] = "no calibration batches: attention error not measured"
            return report
        report.update(attention_error(model, calibration))
        return report


# The Hugging Face drop-in (scatterbrain_, attention_error) lives in _scatterbrain_hf; re-exported here.
from ._scatterbrain_hf import attention_error, attention_layers, scatterbrain_  # noqa: E402

__all__ = ["Scatterbrain", "attention_error", "attention_layers", "scatterbrain_", "scatterbrain_attention"]
