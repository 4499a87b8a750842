"""MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards (Wang et al., ICLR 2025).
https://arxiv.org/abs/2410.00938

Every layer of one module type τ (same last name component, e.g. ``q_proj``, and same (d_in, d_out)) builds its
LoRA factors from two trainable pools of vector *shards* shared by all L layers of τ:
P_A ∈ R^{(r_e·L·l) × (d_in/l)}, P_B ∈ R^{(r_e·L·l) × (d_out/l)}. Rows [0, (r_e−r_p)·L·l) are public; layer ℓ owns
the private rows public_end + [ℓ·r_p·l, (ℓ+1)·r_p·l). Layer ℓ keeps fixed index vectors (length r·l)
idx = concat(randperm(public)[:(r−r_p)·l], private_ℓ), drawn independently for A and B (pair dissociation), and
assembles A_ℓ = P_A[idx_A].view(r, d_in) (rank-vector j is the concatenation of shards j·l … j·l+l−1, vector
sharding), B_ℓᵀ = P_B[idx_B].view(r, d_out). Update: y = W0 x + b + (α/r) · B_ℓ A_ℓ dropout(x). Trainable
parameters per type: r_e·L·(d_in+d_out), the budget of a rank-r_e LoRA, while each layer has rank up to r.
Official code: https://github.com/Forence1999/MoS (``modules/Tied_LoRA.py``: ``share_lora_tiedly``,
``LoraLayer_reset_lora_parameters``, ``transform_chunks``). Init: P_A kaiming-uniform(a=√5) with fan-in d_in
(bound 1/√d_in, global RNG as the official code), P_B = 0, so ΔW = 0.

Hyperparameters (official run args): ``rank`` = ``lora_r``, ``equivalent_rank`` = ``valid_param_lora_r``,
``private_rank`` = ``valid_param_private_r``, ``shards_per_vector`` = ``num_chunk_per_vec``; α = 16 and dropout 0.1
as in every official script. The default ranks (6, 2, 1, l = 2) fit encoders from 6 layers up, such as the
6-layer MiniLM on W_q/W_v: each layer needs r − r_p = 5 public rank-vectors out of (r_e − r_p)·L = 6, the budget is
that of a rank-2 LoRA, and 384 is divisible by l. Deeper models can afford a larger ``rank`` (12 layers: up to 13).

Deviations from the official code:
- L and ℓ come from the layers adapted together (per type, in model order), not from ``num_hidden_layers`` and the
  module name, so adapting a subset of the layers gives a smaller pool instead of unused rows.
- The index vectors are drawn from a CPU generator seeded with ``stable_seed(seed, layer name)`` (reproducible,
  independent of the global RNG) instead of the global RNG; they are persistent int64 buffers, restored on load.
- The fixed ``lora_A_vec`` scaling (all ones, untrained in the released code) is omitted: it is the identity.
- Merging is supported (``fold_``): ΔW_ℓ = (α/r) B_ℓ A_ℓ; the released forward asserts "merged not supported".
Layers: nn.Linear and transformers' GPT-2 Conv1D (weight stored (d_in, d_out)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .._errors import SubspacesError
from .._registry import ADAPTERS
from ._core import (AdapterConfig, Delta, check_int, linear_dims, master_dtype, owner_of, set_owner, stable_seed,
                    validate_common)


@ADAPTERS.register("mos", paper="https://arxiv.org/abs/2410.00938")
@dataclass(frozen=True, kw_only=True)
class MoS(AdapterConfig):
    """MoS hyperparameters: per-layer rank r, equivalent rank r_e (the budget), private rank r_p, shards per
    rank-vector l, LoRA alpha (s = α/r), dropout, and the seed of the shard selections."""

    rank: int = 6
    equivalent_rank: int = 2
    private_rank: int = 1
    shards_per_vector: int = 2
    alpha: float = 16.0
    dropout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        validate_common(self)
        check_int("mos", "equivalent_rank", self.equivalent_rank, 1)
        check_int("mos", "private_rank", self.private_rank, 0)
        check_int("mos", "shards_per_vector", self.shards_per_vector, 1)
        check_int("mos", "seed", self.seed, 0)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise SubspacesError(f"mos alpha={self.alpha!r}: must be a positive number")
        if not self.rank >= self.equivalent_rank >= self.private_rank:
            raise SubspacesError(f"mos needs rank >= equivalent_rank >= private_rank, got {self.rank}, "
                                 f"{self.equivalent_rank}, {self.private_rank}")
        if self.private_rank == self.equivalent_rank and self.rank != self.equivalent_rank:
            raise SubspacesError(f"mos private_rank == equivalent_rank = {self.private_rank} leaves no public "
                                 f"shards for the other rank - private_rank = {self.rank - self.private_rank} "
                                 "rank-vectors; lower private_rank or set rank = equivalent_rank")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def num_trainable(self, layer: nn.Module) -> int:
        # each layer contributes its r_e·l rows to both pools of its type: r_e·(d_in + d_out)
        d_in, d_out, _ = linear_dims(layer, "mos")
        return self.equivalent_rank * (d_in + d_out)

    def build(self, layer: nn.Module, *, init: bool = True) -> MoSDelta:
        d_in, d_out, _ = linear_dims(layer, "mos")
        l = self.shards_per_vector
        if d_in % l or d_out % l:
            raise SubspacesError(f"mos shards_per_vector={l} must divide d_in = {d_in} and d_out = {d_out}")
        return MoSDelta(layer, self)

    def share(self, deltas: list[tuple[str, Delta]], *, init: bool) -> None:
        """Group layers by type, give the first of each type the two pools, draw every layer's indices."""
        types: dict[tuple, list[tuple[str, MoSDelta]]] = {}
        for name, delta in deltas:
            types.setdefault((name.rsplit(".", 1)[-1], delta.d_in, delta.d_out), []).append((name, delta))
        r, r_e, r_p, l = self.rank, self.equivalent_rank, self.private_rank, self.shards_per_vector
        for (kind, d_in, d_out), group in types.items():
            L = len(group)
            if r - r_p > (r_e - r_p) * L:
                raise SubspacesError(
                    f"mos: the {L} layer(s) of type {kind!r} ({d_in} -> {d_out}, first {group[0][0]}) share "
                    f"(equivalent_rank - private_rank)·L = {(r_e - r_p) * L} public rank-vectors, fewer than the "
                    f"rank - private_rank = {r - r_p} each layer draws; raise equivalent_rank or lower rank")
            owner = group[0][1]
            kw = dict(device=owner.idx_A.device, dtype=owner.pool_dtype)
            owner.pool_A = nn.Parameter(torch.empty(r_e * L * l, d_in // l, **kw))
            owner.pool_B = nn.Parameter(torch.empty(r_e * L * l, d_out // l, **kw))
            if init:
                with torch.no_grad():  # kaiming-uniform(a=√5) with the fan-in of a full A row: bound 1/√d_in
                    bound = 1 / math.sqrt(d_in)
                    owner.pool_A.uniform_(-bound, bound)
                    owner.pool_B.zero_()
            public = (r_e - r_p) * L * l
            for index, (name, delta) in enumerate(group):
                set_owner(delta, owner)
                if init:
                    g = torch.Generator().manual_seed(stable_seed(self.seed, name))
                    private = public + torch.arange(index * r_p * l, (index + 1) * r_p * l)
                    for buf in (delta.idx_A, delta.idx_B):  # independent draws for A and B
                        picks = torch.randperm(public, generator=g)[: (r - r_p) * l]
                        buf.copy_(torch.cat([picks, private]))


class MoSDelta(Delta):
    """One layer's view into its type's shard pools: fixed index buffers, no pools of its own unless owner."""

    def __init__(self, layer: nn.Module, config: MoS) -> None:
        super().__init__()
        self.d_in, self.d_out, self.transposed = linear_dims(layer, "mos")
        self.rank = config.rank
        self.scaling = config.scaling
        self.pool_dtype = master_dtype(layer.weight)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        n = config.rank * config.shards_per_vector
        self.register_buffer("idx_A", torch.zeros(n, dtype=torch.int64, device=layer.weight.device))
        self.register_buffer("idx_B", torch.zeros(n, dtype=torch.int64, device=layer.weight.device))

    def pools(self) -> tuple[torch.Tensor, torch.Tensor]:
        owner = owner_of(self)
        if "pool_A" not in owner._parameters:
            raise SubspacesError("mos: this layer has no shard pools; attach MoS with ss.adapt_ (pools are "
                                 "created for all layers of an adapt_ call together)")
        return owner.pool_A, owner.pool_B

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, d_in), Bᵀ (r, d_out)): rank-vector j concatenates the shards at idx[j·l : (j+1)·l]."""
        pool_A, pool_B = self.pools()
        return pool_A[self.idx_A].reshape(self.rank, -1), pool_B[self.idx_B].reshape(self.rank, -1)

    def weight(self) -> torch.Tensor:
        A, Bt = self.factors()
        dw = (Bt.T @ A) * self.scaling  # (d_out, d_in)
        return dw.T if self.transposed else dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, Bt = self.factors()
        x = x.to(A.dtype)
        x = self.drop(x) if self.drop is not None else x
        return (x @ A.T @ Bt) * self.scaling
