"""LoRA-LEGO: Zhao, Shen, Zhu, Li, Su, Wang, Kuang & Wu, "Merging LoRAs like Playing LEGO: Pushing the Modularity of
LoRA to Extremes Through Rank-Wise Clustering", ICLR 2025, https://arxiv.org/abs/2409.16167. No official code was
found; this follows the paper's description (spec: methods/merge-lora-lego.md).

Rule, per adapted module: pool the Minimal Semantic Units u = [a_j; b_j] (row j of A_i, column j of w_i s_i B_i) of all
N LoRAs, k-means them into k clusters, rescale each centroid to its members' mean norm (parameter reweighting, "norm
decay"), assemble A' (rows = a-parts), B' (columns = b-parts) and scale the output by ρ = √(r̄/k) (output reweighting,
"variance expansion"; r̄ = mean source rank): ΔW' = ρ B'A', written at scale 1.

Deviations and choices: (1) the library's recommendation, not in the paper (``balance``, ``canonical_sign``, both on by
default, off = the paper's raw units): each unit is balanced to ‖a‖ = ‖b‖ (b aᵀ unchanged) so the clustering does not
see only the larger factor, and (a, b) ≡ (−a, −b) is resolved by making the largest-|·| entry of a positive, so
equivalent units cluster instead of cancelling. (2) ρ = √(r̄/k) is derived under independent units (output variance
grows linearly with the number of rank-1 terms); not checked against the paper's equation. (3) k-means: Euclidean,
k-means++ seeding from ``seed``, one initialization, Lloyd iterations until the assignment is stable (≤ ``iters``);
empty clusters are dropped and k is at most the number of distinct units, so a module's merged rank can be below k
(reported). (4) ``weights`` (not in the paper) scale each LoRA's units before pooling; default 1.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._errors import SubspacesError
from .._registry import MERGE
from ..adapters._core import check_int
from ._lora import PeftLoRA, read_loras
from ._lora_method import LoRAMethod, check_out, check_weights, factors, finish, work_dtype


def canonical_units(A: Tensor, B: Tensor, *, balance: bool = True, canonical_sign: bool = True
                    ) -> tuple[Tensor, Tensor]:
    """Units (rows of A (M, n), columns of B (m, M)) with ‖a‖ = ‖b‖ and the largest-|·| entry of a positive;
    B A is unchanged (a unit with a zero half becomes all zero)."""
    if balance:
        na, nb = A.norm(dim=1), B.norm(dim=0)
        target = (na * nb).sqrt()  # a unit with a zero half is zero: both halves become 0
        A = A * torch.where(na > 0, target / torch.where(na > 0, na, 1), 0)[:, None]
        B = B * torch.where(nb > 0, target / torch.where(nb > 0, nb, 1), 0)
    if canonical_sign:
        top = A.gather(1, A.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        sign = torch.where(top < 0, -1.0, 1.0).to(A.dtype)
        A, B = A * sign[:, None], B * sign
    return A, B


def _means(X: Tensor, labels: Tensor, C: Tensor) -> Tensor:
    counts = torch.bincount(labels, minlength=C.shape[0])
    sums = torch.zeros_like(C).index_add_(0, labels, X)
    return torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].to(X.dtype), C)


def _assign(X: Tensor, C: Tensor) -> Tensor:
    return torch.cdist(X, C, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)


def kmeans(X: Tensor, k: int, *, seed: int = 0, iters: int = 100) -> tuple[Tensor, Tensor]:
    """(centroids (k', D), labels (M,)) of Euclidean k-means on the rows of X: k-means++ seeding (a CPU generator
    seeded with ``seed``), then Lloyd steps until the assignment repeats. Empty clusters are dropped: k' ≤ k."""
    g = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(X.shape[0], (1,), generator=g))]
    d2 = (X - X[chosen[0]]).square().sum(1)
    while len(chosen) < k:
        total = float(d2.sum())
        if not total > 0:  # every unit coincides with a chosen one: no more distinct centres
            break
        j = int(torch.multinomial((d2 / total).double().cpu(), 1, generator=g))
        chosen.append(j)
        d2 = torch.minimum(d2, (X - X[j]).square().sum(1))
    C = X[chosen].clone()
    labels = _assign(X, C)
    for _ in range(iters):
        C = _means(X, labels, C)
        new = _assign(X, C)
        if torch.equal(new, labels):
            break
        labels = new
    C = _means(X, labels, C)
    used = torch.bincount(labels, minlength=C.shape[0]) > 0
    remap = torch.cumsum(used.long(), 0) - 1
    return C[used], remap[labels]


def rescale(C: Tensor, X: Tensor, labels: Tensor) -> Tensor:
    """Parameter reweighting: each centroid scaled to the mean norm of its members (a zero centroid stays zero)."""
    counts = torch.bincount(labels, minlength=C.shape[0]).to(X.dtype)
    mean = torch.zeros(C.shape[0], dtype=X.dtype, device=X.device).index_add_(0, labels, X.norm(dim=1)) / counts
    norm = C.norm(dim=1)
    return C * torch.where(norm > 0, mean / torch.where(norm > 0, norm, 1), 0)[:, None]


def lego(As: list[Tensor], Bs: list[Tensor], k: int, *, seed: int = 0, iters: int = 100, reweight: bool = True,
         output_reweight: bool = True, balance: bool = True, canonical_sign: bool = True
         ) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """One module: LoRAs (A_i (r_i, n), B_i (m, r_i), scale already folded into B_i) → (A' (k', n), B' (m, k'),
    info) with ΔW' = B'A' (ρ folded into B')."""
    A, B = canonical_units(torch.cat(As), torch.cat(Bs, dim=1), balance=balance, canonical_sign=canonical_sign)
    n = A.shape[1]
    X = torch.cat([A, B.T], dim=1)  # (M, n + m): one MSU per row
    C, labels = kmeans(X, min(k, X.shape[0]), seed=seed, iters=iters)
    if reweight:
        C = rescale(C, X, labels)
    rho = math.sqrt(sum(a.shape[0] for a in As) / len(As) / C.shape[0]) if output_reweight else 1.0
    return C[:, :n], C[:, n:].T * rho, {"rank": C.shape[0], "rho": rho, "units": X.shape[0]}


def lora_lego(models: Any, *, rank: int, weights: Any = None, seed: int = 0, iters: int = 100, reweight: bool = True,
              output_reweight: bool = True, balance: bool = True, canonical_sign: bool = True, base: Any = None,
              out: Any = None) -> PeftLoRA:
    """Merge LoRA adapters into one LoRA of rank ``rank`` (k) by clustering their rank-1 units (LoRA-LEGO); with one
    adapter and k < r, prunes its rank. ``reweight`` / ``output_reweight``: the paper's dual reweighting (on);
    ``balance`` / ``canonical_sign``: unit normalization before clustering (module doc). Inputs and result as
    :func:`~subspaces.merge.lora_svd.lora_svd`; the report gives each module's rank, ρ and number of units."""
    check_int("lora_lego", "rank", rank, 1)
    check_int("lora_lego", "iters", iters, 1)
    check_int("lora_lego", "seed", seed, 0)
    flags = dict(reweight=reweight, output_reweight=output_reweight, balance=balance, canonical_sign=canonical_sign)
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise SubspacesError(f"lora_lego {key}={value!r}: must be true or false")
    check_out(out)
    sets = read_loras(models)
    w = check_weights(weights, len(sets), "lora_lego")
    work, dtype = work_dtype(sets)
    merged, report = {}, []
    for name in sets[0].modules:
        fs = factors(sets, name, w, work)
        A, B, info = lego([a for a, _ in fs], [b for _, b in fs], rank, seed=seed, iters=iters, **flags)
        merged[name] = (A, B)
        report.append({"name": name, **info})
    return finish("lora_lego", sets, merged, report, dtype=dtype, base=base, out=out, models=models,
                  hp={"rank": rank, "weights": w, "seed": seed, "iters": iters, **flags})


@MERGE.register("lora_lego", paper="https://arxiv.org/abs/2409.16167", status="partial",
                note="output-reweighting factor √(r̄/k) derived, not checked against the paper's equation; no official "
                     "code to compare")
class LoRALEGO(LoRAMethod):
    """``ss.merge("lora_lego", models=[lora, ...], rank=k, ...)``: see :func:`lora_lego`."""

    fn = staticmethod(lora_lego)
