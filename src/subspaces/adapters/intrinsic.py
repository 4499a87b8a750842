"""Intrinsic dimension: training in a random subspace, θ = θ0 + P θ_d (Li, Farkhoor, Liu & Yosinski, ICLR 2018).
https://arxiv.org/abs/1804.08838

Only θ_d ∈ R^d trains (init 0, so the model starts exactly at θ0); P ∈ R^{D×d} is frozen, random and regenerated
from ``seed``, never saved: a checkpoint is d floats plus the JSON config. The smallest d reaching 90% of full
fine-tuning is the task's intrinsic dimension d_int90 (``ss.measure.intrinsic_dimension`` sweeps d).
Reference code: https://github.com/uber-research/intrinsic-dimension (dense/sparse blocks in
``keras_ext/rproj_layers_util.py``, their global column normalization in ``intrinsic_dim/train.py`` step 3.5) and
Aghajanyan et al.'s PyTorch ``IntrinsicDimensionLight`` (https://arxiv.org/abs/2012.13255; ``fastfood_vars``,
``fastfood_torched``), whose per-tensor projection (DID) this follows: layer ℓ gets its own block P_ℓ, seeded
with ``stable_seed(seed, layer name)``, and ΔW_ℓ = reshape(P_ℓ θ_d) in the layout of the layer's weight.

``projection``:
- ``"fastfood"`` (default): ``ss.linalg.Fastfood`` per tensor, P_ℓ θ = (H G Π H B pad(θ))[:D_ℓ] / (√(L·ΣG²)·√(D_ℓ/L)),
  O(D log D), nothing of size D×d stored. Quirk reproduced: a tensor with L_ℓ = 2^⌈log2 D_ℓ⌉ < d uses only θ[:L_ℓ]
  (the reference's ``F.pad`` with a negative width).
- ``"dense"``: N(0, 1) entries, each of the d basis vectors scaled to unit norm over all adapted layers together
  (so PᵀP ≈ I). Stores D·d floats: refused above 2e8.
- ``"sparse"``: very sparse random projection (sklearn ``SparseRandomProjection`` per block: entries ±1 with
  density 1/√D_ℓ), then the same global normalization. Stores ≈ 3·d·Σ√D_ℓ numbers: refused above 2e8.

Deviations:
- θ covers the weights of the adapted layers (nn.Linear, transformers Conv1D) only; biases, LayerNorms and
  embeddings stay frozen (the fold adds ΔW to the weight only), whereas the papers project every parameter. Train
  a fresh head through ``modules_to_save`` (the harness does).
- Li et al.'s Fastfood is one transform over the whole D-vector; here, as in Aghajanyan et al.'s code, one per
  tensor, each normalized on its own (a column of the concatenated P has norm ≈ √m over m tensors).
- Sparse: a basis vector without non-zeros (negligible odds) stays zero instead of being divided by 0.
- One random P per ``seed``; Li et al. average a few draws per d.
Training: the papers use high learning rates (SAID port: 3e-2, Adam); the harness default is lower, so pass it
in a compare spec, e.g. ``"intrinsic:dim=1000,lr=3e-2"``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import SubspacesError
from .._registry import ADAPTERS
from ..linalg import Fastfood
from ._core import AdapterConfig, Delta, linear_dims, master_dtype, owner_of, set_owner, stable_seed, validate_common

PROJECTIONS = ("fastfood", "dense", "sparse")
MAX_STORED = 2e8  # numbers a dense/sparse projection may store (0.8 GB in fp32)


def sparse_block(n: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(basis index, parameter index, sign) of the non-zeros of an (n, size) block where every entry is non-zero
    independently with probability 1/√size (sklearn's per-row binomial counts and uniform positions, drawn as one
    binomial total and a uniform subset of that size)."""
    total = n * size
    count = int(torch.binomial(torch.tensor(float(total), dtype=torch.float64),
                               torch.tensor(1 / math.sqrt(size), dtype=torch.float64), generator=g))
    flat = torch.randint(total, (count,), generator=g).unique()
    while flat.numel() < count:  # top up the duplicates: still a uniform subset
        flat = torch.cat([flat, torch.randint(total, (count - flat.numel(),), generator=g)]).unique()
    signs = torch.randint(0, 2, (count,), generator=g) * 2 - 1
    return flat // size, flat % size, signs


@ADAPTERS.register("intrinsic", paper="https://arxiv.org/abs/1804.08838", status="partial",
                   note="weights of adapted layers only (biases/LayerNorms frozen); Fastfood per tensor as in "
                        "Aghajanyan et al.'s code; the papers train with high lr (pass lr=3e-2)")
@dataclass(frozen=True, kw_only=True)
class Intrinsic(AdapterConfig):
    """Random-subspace (DID) hyperparameters: subspace dimension ``dim`` (d trainable parameters in total, over
    all adapted layers), ``projection`` (fastfood, dense or sparse) and the ``seed`` of P."""

    dim: int = 1000
    projection: str = "fastfood"
    seed: int = 0

    def __post_init__(self) -> None:
        validate_common(self)
        name = self.registry_name
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise SubspacesError(f"{name} dim={self.dim!r}: must be a positive integer")
        if self.projection not in PROJECTIONS:
            raise SubspacesError(f"{name} projection={self.projection!r}: allowed {', '.join(PROJECTIONS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SubspacesError(f"{name} seed={self.seed!r}: must be a non-negative integer")

    def theta_size(self, m: int) -> int:
        """Length of θ_d for m adapted tensors."""
        return self.dim

    def add_shared(self, owner: IntrinsicDelta, m: int) -> None:
        """Shared tensors besides θ_d (SAID's λ)."""

    def num_trainable(self, layer: nn.Module) -> int:
        linear_dims(layer, self.registry_name)
        return self.dim

    def num_trainable_total(self, layers: list[nn.Module]) -> int:
        return self.dim  # θ_d (and SAID's λ) are shared by every layer

    def build(self, layer: nn.Module, *, init: bool = True) -> IntrinsicDelta:
        return IntrinsicDelta(layer, self)

    def share(self, deltas: list[tuple[str, Delta]], *, init: bool) -> None:
        """Draw every layer's projection block (normalizing dense/sparse over all of them) and give the first
        layer θ_d; runs at load too, since projections are regenerated, never saved."""
        name, m = self.registry_name, len(deltas)
        n = self.theta_size(m)
        sizes = [delta.size for _, delta in deltas]
        if n > sum(sizes):
            raise SubspacesError(f"{name} dim={self.dim} exceeds the D = {sum(sizes)} adapted weights")
        stored = {"dense": n * sum(sizes), "sparse": 3 * n * sum(math.sqrt(s) for s in sizes)}.get(self.projection, 0)
        if stored > MAX_STORED:
            raise SubspacesError(f"{name} projection={self.projection!r} with d = {n} over D = {sum(sizes)} adapted "
                                 f"weights would store ≈{stored:.3g} numbers (limit {MAX_STORED:.0e}); use "
                                 "projection='fastfood' (implicit, O(D log D))")
        seeds = [stable_seed(self.seed, layer) for layer, _ in deltas]  # one P_ℓ per tensor (Aghajanyan et al.)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        if self.projection == "fastfood":
            for (_, delta), seed in zip(deltas, seeds):
                delta.ff = Fastfood(delta.size, seed=seed, device=delta.device, dtype=delta.dtype)
        elif self.projection == "dense":
            blocks = [torch.randn(n, delta.size, generator=g) for (_, delta), g in zip(deltas, gens)]
            norm = sum(b.square().sum(1, dtype=torch.float64) for b in blocks).sqrt()  # over the whole network
            for (_, delta), b in zip(deltas, blocks):
                b = b.to(delta.dtype).div_(norm[:, None].to(delta.dtype))
                delta.register_buffer("proj", b.to(delta.device), persistent=False)
        else:
            blocks = [sparse_block(n, delta.size, g) for (_, delta), g in zip(deltas, gens)]
            # squared norm of a ±1 basis vector = its non-zero count; an empty one (negligible odds) stays 0, not 0/0
            norm = sum(torch.bincount(rows, minlength=n) for rows, _, _ in blocks).clamp(min=1).double().sqrt()
            for (_, delta), (rows, cols, signs) in zip(deltas, blocks):
                dev = delta.device
                delta.register_buffer("rows", rows.to(dev), persistent=False)
                delta.register_buffer("cols", cols.to(dev), persistent=False)
                delta.register_buffer("vals", (signs / norm[rows]).to(dev, delta.dtype), persistent=False)
        owner = deltas[0][1]
        owner.theta_d = nn.Parameter(torch.zeros(n, device=owner.device, dtype=owner.dtype))
        self.add_shared(owner, m)
        for index, (_, delta) in enumerate(deltas):
            delta.index = index
            set_owner(delta, owner)


class IntrinsicDelta(Delta):
    """One layer's slice of P θ_d; θ_d lives on the group's first delta."""

    def __init__(self, layer: nn.Module, config: Intrinsic) -> None:
        super().__init__()
        _, _, self.transposed = linear_dims(layer, config.registry_name)
        w = layer.weight
        self.shape, self.size = tuple(w.shape), w.numel()
        self.device, self.dtype = w.device, master_dtype(w)  # where share() puts the projection and θ_d
        self.projection = config.projection
        self.index = 0

    def flat(self) -> torch.Tensor:
        """P_ℓ θ_d (times λ_ℓ for SAID), flat in the weight's layout."""
        owner = owner_of(self)
        theta = owner._parameters.get("theta_d")
        if theta is None:
            raise SubspacesError(f"{self.config.registry_name}: this layer has no subspace; attach it with "
                                 "ss.adapt_ (θ_d is created for all layers of an adapt_ call together)")
        if self.projection == "fastfood":
            v = self.ff(theta.to(self.ff.G.device))
        elif self.projection == "dense":
            v = theta.to(self.proj.device) @ self.proj
        else:
            src = theta.to(self.vals.device)[self.rows] * self.vals
            v = torch.zeros(self.size, device=src.device, dtype=src.dtype).index_add(0, self.cols, src)
        lam = owner._parameters.get("said_lambda")
        return v if lam is None else v * lam[self.index].to(v.device)

    def weight(self) -> torch.Tensor:
        return self.flat().view(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        return F.linear(x.to(w.dtype), w.T if self.transposed else w)
