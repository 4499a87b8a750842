"""ℓp sensitivity / leverage / root-leverage row sampling, and leverage-sampled calibration statistics.

Woodruff & Yasuda, "Sharper Bounds for ℓp Sensitivity Sampling", ICML 2023, https://arxiv.org/abs/2306.00732
(theory paper, no official code). Rule: keep row i of X (N, d) with p_i = min(1, m q_i / Σ_j q_j) and scale it by
p_i^{-1/p}, so E‖X̃ a‖_p^p = ‖X a‖_p^p; q_i = τ_i = x_iᵀ(XᵀX)⁺x_i (leverage, p = 2), τ_i^{p/2} (root leverage,
1 ≤ p < 2), or the ℓ1 sensitivity s_i = 1 / min{‖X a‖_1 : x_iᵀa = 1} (a small LP, scipy). With m = O(d log d / ε²)
leverage-sampled rows, (1−ε) XᵀX ⪯ X̃ᵀX̃ ⪯ (1+ε) XᵀX w.h.p.

``RowSampler`` gives ``_calibrate.run_sequential`` (and ``compress_(..., sampler=...)``) input statistics from such a
subset of token rows, streaming: pass 1 collects C = Σ x xᵀ over all rows; pass 2 replays the batches, scores each
row by τ_i = ‖L⁻¹x_i‖² with L Lᵀ = C + δI, δ = delta·tr(C)/d, and keeps it with p_i = min(1, m τ_i / tr((C+δI)⁻¹C)).
``LayerStats`` then holds C̃ = Σ_kept x xᵀ / p_i and the unbiased sum Σ_kept x / p_i over the full token count.

Deviations: only leverage and uniform scores stream (root leverage / sensitivities need Σ q before sampling, which
pass 1 does not give, and C is an ℓ2 statistic anyway); no sketched (approximate) leverage scores and no dedupe of
repeated rows (copies share their leverage, τ/k each, which Bernoulli sampling handles); with m ≥ N the streaming
sampler keeps every row (the statistics are then exact); output statistics ("outputs") stay unsampled.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import SubspacesError
from . import _calibrate
from ._calibrate import LayerStats

KINDS = ("leverage", "root_leverage", "l1_sensitivity", "uniform")
STREAM_KINDS = ("leverage", "uniform")
MAX_LP_ROWS = 2000


def _check(field: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise SubspacesError(f"{field}={value!r}; allowed: {', '.join(allowed)}")


def _whitener(C: Tensor, delta: float) -> Tensor:
    """L⁻¹ with L Lᵀ = C + δI, δ = delta·tr(C)/d (jitter grows if C is numerically indefinite)."""
    d = C.shape[0]
    eye = torch.eye(d, dtype=C.dtype, device=C.device)
    reg = max(delta * float(C.diagonal().sum()) / d, torch.finfo(C.dtype).tiny)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(C + reg * eye)
        if int(info) == 0:
            return torch.linalg.solve_triangular(L, eye, upper=False)
        reg = max(reg * 100, 1e-12 * float(C.diagonal().abs().max().clamp_min(1.0)))
    raise SubspacesError("the input second moment is not positive semidefinite (non-finite activations?)")


def leverage(X: Tensor, delta: float = 0.0) -> Tensor:
    """τ_i = x_iᵀ (XᵀX)⁺ x_i from a thin SVD (``delta=0``), or x_iᵀ (XᵀX + δI)⁻¹ x_i by Cholesky, float64."""
    X = X.detach().to(torch.float64)
    if delta > 0:
        return (X @ _whitener(X.T @ X, delta).T).square().sum(1)
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    keep = S > S.max().clamp_min(1e-300) * max(X.shape) * torch.finfo(torch.float64).eps
    return U[:, keep].square().sum(1)


def l1_sensitivity(X: Tensor) -> Tensor:
    """Exact ℓ1 sensitivities s_i = sup_a |x_iᵀa| / ‖Xa‖_1, one LP per row (scipy HiGHS); small N only."""
    try:
        from scipy.optimize import linprog
    except ImportError:
        raise SubspacesError("kind='l1_sensitivity' needs scipy: pip install scipy") from None
    A = X.detach().to(torch.float64).cpu().numpy()
    n, d = A.shape
    if n > MAX_LP_ROWS:
        raise SubspacesError(f"kind='l1_sensitivity' solves one LP per row; N={n} > {MAX_LP_ROWS}: use 'root_leverage'")
    import numpy as np

    # variables (a ∈ R^d, t ∈ R^n_+): min Σt  s.t.  ±Xa ≤ t,  x_iᵀa = 1
    cost = np.concatenate([np.zeros(d), np.ones(n)])
    ub = np.block([[A, -np.eye(n)], [-A, -np.eye(n)]])
    bounds = [(None, None)] * d + [(0, None)] * n
    out = np.zeros(n)
    for i in range(n):
        if not np.any(A[i]):
            continue
        eq = np.concatenate([A[i], np.zeros(n)])[None]
        res = linprog(cost, A_ub=ub, b_ub=np.zeros(2 * n), A_eq=eq, b_eq=[1.0], bounds=bounds, method="highs")
        if res.status != 0:
            raise SubspacesError(f"the ℓ1 sensitivity LP of row {i} failed: {res.message}")
        out[i] = 1.0 / res.fun
    return torch.from_numpy(out).to(X.device)


def row_scores(X: Tensor, kind: str = "leverage", *, p: float = 2, delta: float = 0.0) -> Tensor:
    """Importance q (N,) of the rows of X (N, d), float64: ``"leverage"`` τ_i, ``"root_leverage"`` τ_i^{p/2}
    (give p < 2, e.g. 1), ``"l1_sensitivity"`` exact ℓ1 sensitivities (LP, N ≤ 2000), ``"uniform"`` ones.
    ``delta > 0`` scores against XᵀX + δI (δ = delta·tr(XᵀX)/d) by Cholesky, as the streaming sampler does."""
    _check("kind", kind, KINDS)
    if X.ndim != 2:
        raise SubspacesError(f"X must be a matrix (N, d), got shape {tuple(X.shape)}")
    if kind == "uniform":
        return torch.ones(X.shape[0], dtype=torch.float64, device=X.device)
    if kind == "l1_sensitivity":
        return l1_sensitivity(X)
    tau = leverage(X, delta)
    return tau if kind == "leverage" else tau.clamp_min(0) ** (p / 2)


def sample_rows(X: Tensor, m: int, scores: Tensor, *, seed: int = 0, p: float = 2,
                fixed_size: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Reweighted row sample of X (N, d) → (X̃, indices, probabilities), X̃_j = X[idx_j] · prob_j^{-1/p}.

    Bernoulli (default): row i kept with p_i = min(1, m q_i/Σq), E[#rows] ≤ m. ``fixed_size``: m rows drawn i.i.d.
    ∝ q (indices may repeat), probabilities m q_i/Σq. Either way E‖X̃a‖_p^p = ‖Xa‖_p^p."""
    if m < 1:
        raise SubspacesError(f"m={m!r}; allowed: a positive number of rows")
    q = scores.detach().to(torch.float64).cpu()
    if q.shape != (X.shape[0],) or not torch.isfinite(q).all() or (q < 0).any() or q.sum() <= 0:
        raise SubspacesError("scores must be finite, non-negative, one per row of X, and not all zero")
    g = torch.Generator().manual_seed(seed)
    if fixed_size:
        idx = torch.multinomial(q, m, replacement=True, generator=g)
        prob = m * q[idx] / q.sum()
    else:
        pi = (m * q / q.sum()).clamp(max=1.0)
        idx = torch.nonzero(torch.rand(len(q), generator=g, dtype=torch.float64) < pi).squeeze(1)
        prob = pi[idx]
    idx, prob = idx.to(X.device), prob.to(X.device)
    return X[idx] * prob.pow(-1.0 / p).to(X.dtype)[:, None], idx, prob


class RowSampler:
    """Input statistics from a leverage- (or uniformly) sampled subset of about ``m`` token rows per layer.

    Pass to ``compress_(..., sampler=RowSampler(m=4096))`` or ``_calibrate.run_sequential(..., sampler=...)``.
    ``keep_full=True`` also leaves the all-rows Σ x xᵀ in ``stats.extra["xxt_full"]`` (for measurements).
    After a run, ``report[layer]`` gives tokens, kept rows and the expected sample size."""

    def __init__(self, m: int, kind: str = "leverage", seed: int = 0, *, delta: float = 1e-6,
                 keep_full: bool = False) -> None:
        if not isinstance(m, int) or m < 1:
            raise SubspacesError(f"RowSampler m={m!r}; allowed: a positive int (rows to keep per layer)")
        _check("RowSampler kind", kind, STREAM_KINDS)
        if not delta > 0:
            raise SubspacesError(f"RowSampler delta={delta!r}; allowed: a positive float (relative ridge)")
        self.m, self.kind, self.seed, self.delta, self.keep_full = m, kind, seed, delta, keep_full
        self.report: dict[str, dict[str, Any]] = {}

    def collect(self, layers: Mapping[str, nn.Module], stats: dict[str, LayerStats], kinds: set[str],
                replay: Callable[[], None]) -> None:
        """Fill ``stats`` for ``layers``; ``replay()`` runs the batches through them (called once or twice)."""
        with _calibrate._hooks(layers, stats, kinds):
            replay()  # pass 1: everything, exactly as without a sampler
        todo = {n: _Pass2(self, n, s) for n, s in stats.items() if s.xxt is not None and s.tokens > self.m}
        for n, s in stats.items():
            if s.xxt is not None and self.keep_full:
                s.extra["xxt_full"] = s.xxt  # pass 2 accumulates into new tensors
            if s.xxt is not None and n not in todo:
                self.report[n] = {"tokens": s.tokens, "kept": s.tokens, "expected": float(s.tokens)}
        if not todo:
            return
        with _calibrate._hooks({n: layers[n] for n in todo}, todo, {"inputs"}):
            replay()  # pass 2: score and sample
        for n, job in todo.items():
            s = stats[n]
            s.xxt, s.x_sum = job.xxt, job.x_sum
            s.extra["sampling"] = self.report[n] = {"tokens": s.tokens, "kept": job.kept, "expected": job.expected}


class _Pass2:
    """Per-layer state of pass 2, fed by the ``_calibrate`` hooks through ``add_inputs``."""

    def __init__(self, owner: RowSampler, name: str, stats: LayerStats) -> None:
        C = stats.xxt
        if owner.kind == "leverage":
            self.W = _whitener(C, owner.delta)
            self.scale = owner.m / float(((self.W @ C) * self.W).sum())  # m / Σ_all τ_i
        else:
            self.W, self.scale = None, owner.m / stats.tokens
        self.g = torch.Generator().manual_seed(owner.seed * 1_000_003 + zlib.crc32(name.encode()))
        self.xxt, self.x_sum = torch.zeros_like(C), torch.zeros_like(stats.x_sum)
        self.kept, self.expected = 0, 0.0

    def add_inputs(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        q = (x @ self.W.T).square().sum(1) if self.W is not None else torch.ones_like(x[:, 0])
        pi = (self.scale * q).clamp(max=1.0)
        u = torch.rand(x.shape[0], generator=self.g, dtype=torch.float64).to(x.device)
        keep = u < pi
        xs, w = x[keep], pi[keep].reciprocal()
        self.xxt.addmm_(xs.T * w, xs)
        self.x_sum += w @ xs
        self.kept += int(keep.sum())
        self.expected += float(pi.sum())


def sampling_error(model: nn.Module, layers: Any, batches: Sequence[Any], m: int,
                   kinds: Sequence[str] = STREAM_KINDS, *, seed: int = 0) -> list[dict[str, Any]]:
    """Per layer and sampling kind, how far the sampled C̃ is from C = Σ x xᵀ over all calibration rows:
    ``spectral_error`` = max_i |λ_i(C^{-1/2} C̃ C^{-1/2}) − 1| on the range of C, and ``frobenius_error`` =
    ‖C̃ − C‖_F / ‖C‖_F. ``layers``: ``{name: Linear}`` or a target selector (``"all-linear"``). Model unchanged."""
    from ._core import target_linears

    for k in kinds:
        _check("kind", k, STREAM_KINDS)
    layers = dict(layers) if isinstance(layers, Mapping) else target_linears(model, layers, None)
    batches = _calibrate.check_batches(batches)
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        sampler = RowSampler(m, kind, seed, keep_full=True)

        def measure(name: str, layer: nn.Module, stats: LayerStats, kind: str = kind) -> None:
            C, Ct = stats.extra["xxt_full"], stats.xxt
            lam, V = torch.linalg.eigh(C)
            on = lam > lam.max().clamp_min(1e-300) * C.shape[0] * torch.finfo(C.dtype).eps
            W = V[:, on] * lam[on].rsqrt()
            ev = torch.linalg.eigvalsh(W.T @ Ct @ W)
            rows.append({"name": name, "kind": kind, "m": m, **sampler.report[name],
                         "spectral_error": float((ev - 1).abs().max()),
                         "frobenius_error": float((Ct - C).norm() / C.norm().clamp_min(1e-300))})

        _calibrate.run_sequential(model, dict(layers), batches, {"inputs"}, measure, sampler=sampler)
    return rows
