"""Per-layer ranks under a budget.

A rank-r factorization of an (m, n) weight costs r(m + n) parameters instead of mn, so it saves only for
r < mn/(m + n) (``useful_rank``). With ``ratio`` (the fraction of the targeted weights' parameters to remove):

- ``uniform``: every layer loses the same fraction, r = ⌊(1 − ratio)·mn/(m + n)⌋.
- ``energy``: one global greedy knapsack over singular directions — take directions in order of normalized energy
  σ_i²/Σσ² per parameter they cost (m + n) until the budget (1 − ratio)·Σ mn is spent.
- ``welore``: WeLore's rule (arXiv 2407.11239): one global threshold τ on min–max-normalized singular values, a layer
  keeping #{σ̂ ≥ τ} directions; τ is the smallest threshold that meets the budget.
``energy=e`` instead gives each layer the smallest rank keeping a fraction e of Σσ²; ``rank`` fixes the ranks.
Ranks are at least 1 and, under a ratio, at most ``useful_rank``. ``None`` means "keep the layer dense".
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .._errors import SubspacesError

ALLOCATIONS = ("uniform", "energy", "welore")
Shape = tuple[int, int]


def useful_rank(shape: Shape) -> int:
    """The largest rank whose factors hold fewer parameters than the dense (m, n) weight (0 if none)."""
    m, n = shape
    return (m * n - 1) // (m + n)


def _check_fraction(name: str, value: object, *, closed: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0.0 < value < 1.0 or (closed and value == 1.0)):
        raise SubspacesError(f"{name}={value!r}: must be a number in (0, 1{']' if closed else ')'}")
    return float(value)


def allocate(
    shapes: Mapping[str, Shape],
    spectra: Mapping[str, Tensor] | None = None,
    *,
    ratio: float | None = None,
    rank: int | Mapping[str, int] | None = None,
    energy: float | None = None,
    allocation: str = "uniform",
) -> dict[str, int | None]:
    """Rank per layer name (``None``: left dense). ``spectra`` (singular values) are needed for the energy-based
    choices; exactly one of ``ratio``, ``rank``, ``energy`` is given."""
    given = [k for k, v in (("ratio", ratio), ("rank", rank), ("energy", energy)) if v is not None]
    if len(given) != 1:
        raise SubspacesError(f"give exactly one of ratio=, rank=, energy= (got {given or 'none'})")
    if allocation not in ALLOCATIONS:
        raise SubspacesError(f"allocation={allocation!r}; allowed: {', '.join(ALLOCATIONS)}")
    if rank is not None:
        return _fixed(shapes, rank)
    if energy is not None:
        e = _check_fraction("energy", energy, closed=True)
        return {n: _keep(shapes[n], _energy_rank(_spectrum(spectra, n), e)) for n in shapes}
    r = _check_fraction("ratio", ratio, closed=False)
    budget = (1.0 - r) * sum(m * n for m, n in shapes.values())
    if allocation == "uniform":
        return {n: max(1, min(useful_rank(s), int((1.0 - r) * s[0] * s[1] / (s[0] + s[1])))) for n, s in shapes.items()}
    spectra = {n: _spectrum(spectra, n) for n in shapes}
    ranks = _greedy(shapes, spectra, budget) if allocation == "energy" else _welore(shapes, spectra, budget)
    return {n: max(1, k) for n, k in ranks.items()}


def _spectrum(spectra: Mapping[str, Tensor] | None, name: str) -> Tensor:
    if spectra is None or name not in spectra:
        raise SubspacesError(f"no singular values for layer {name!r}: energy-based allocation needs them")
    return spectra[name].detach().to(torch.float64).cpu()


def _keep(shape: Shape, k: int) -> int | None:
    return k if k <= useful_rank(shape) else None


def _fixed(shapes: Mapping[str, Shape], rank: int | Mapping[str, int]) -> dict[str, int | None]:
    per = dict(rank) if isinstance(rank, Mapping) else {n: rank for n in shapes}
    unknown = sorted(set(per) - set(shapes))
    if unknown:
        raise SubspacesError(f"rank= names layers that are not targeted: {unknown[:5]}; targeted: {sorted(shapes)[:5]}")
    out: dict[str, int | None] = {n: None for n in shapes}
    for n, k in per.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise SubspacesError(f"rank={k!r} for layer {n!r}: must be an integer >= 1")
        out[n] = min(k, min(shapes[n]))
    return out


def _energy_rank(S: Tensor, fraction: float) -> int:
    e = S.square()
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor([fraction - 1e-12], dtype=cum.dtype))[0]) + 1


def _greedy(shapes: Mapping[str, Shape], spectra: Mapping[str, Tensor], budget: float) -> dict[str, int]:
    ranks = {n: 1 for n in shapes}
    spent = sum(m + n for m, n in shapes.values())
    cands = []  # (energy per parameter, layer, index): the first direction of every layer is always kept
    for name, S in spectra.items():
        e = S.square() / max(float(S.square().sum()), 1e-300)
        cost = sum(shapes[name])
        cands += [(float(e[i]) / cost, name, i) for i in range(1, min(len(S), useful_rank(shapes[name])))]
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    for _, name, _i in cands:  # within a layer energies are sorted, so directions are taken in order
        cost = sum(shapes[name])
        if spent + cost <= budget:
            ranks[name] += 1
            spent += cost
    return ranks


def _welore(shapes: Mapping[str, Shape], spectra: Mapping[str, Tensor], budget: float) -> dict[str, int]:
    from ..optim.welore import _normalized

    normed = {n: _normalized(S) for n, S in spectra.items()}

    def ranks_at(tau: float) -> dict[str, int]:
        return {n: max(1, min(int((v >= tau).sum()), useful_rank(shapes[n]))) for n, v in normed.items()}

    def cost(r: dict[str, int]) -> float:
        return sum(k * sum(shapes[n]) for n, k in r.items())

    taus = torch.unique(torch.cat(list(normed.values()))).tolist()  # ascending; rank counts fall as τ grows
    lo, hi = 0, len(taus) - 1
    while lo < hi:  # the smallest τ whose ranks fit the budget
        mid = (lo + hi) // 2
        if cost(ranks_at(taus[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return ranks_at(taus[lo])
