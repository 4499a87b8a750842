"""MoS faithful tests (methods/adapter-mos.md): per-type count, ΔW = 0 at init, private/public shard selection,
assembly and gradient accumulation in shared shards, pair dissociation, PEFT export; plus sharing that survives
save/load, dtype/device moves and deepcopy."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import ids, llama_causal, logits
from safetensors.torch import load_file
from torch import nn

import subspaces as ss
from subspaces.adapters import MoS
from subspaces.adapters._core import adapted_layers, owner_of

KW = dict(rank=3, equivalent_rank=2, private_rank=1, shards_per_vector=2, dropout=0.0)


class Stack(nn.Module):
    """L blocks with a square ``q`` (d -> d) and a non-square ``v`` (d -> d_v): two module types."""

    def __init__(self, L: int = 4, d: int = 12, d_v: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList()
        for _ in range(L):
            blk = nn.Module()
            blk.q, blk.v = nn.Linear(d, d), nn.Linear(d, d_v)
            self.layers.append(blk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for blk in self.layers:
            x = torch.tanh(blk.q(x))
            outs.append(blk.v(x))
        return torch.cat(outs, -1)


def adapted(L: int = 4, **kw) -> Stack:
    m = Stack(L)
    ss.adapt_(m, "mos", targets=["q", "v"], **{**KW, **kw})
    return m


def deltas(m: nn.Module, kind: str | None = None) -> list:
    return [layer.delta for n, layer in adapted_layers(m) if kind is None or n.endswith("." + kind)]


def randomize(m: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ss.adapter_parameters(m):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def assembled(pool: torch.Tensor, idx: torch.Tensor, r: int, l: int) -> torch.Tensor:
    """By hand: rank-vector j = concat(pool[idx[j·l + t]] for t < l)."""
    return torch.stack([torch.cat([pool[idx[j * l + t]] for t in range(l)]) for j in range(r)])


# 1. trainable count per type r_e·L·(d_in + d_out) for any r >= r_e; indices are buffers ----------------------------

@pytest.mark.parametrize("rank", [2, 3, 5, 7])
def test_count_per_type_is_independent_of_rank(rank):
    L = 6
    m = adapted(L, rank=rank)
    per_type = {"q": 2 * L * (12 + 12), "v": 2 * L * (12 + 8)}
    for kind, count in per_type.items():
        owner = deltas(m, kind)[0]
        assert {n for n, _ in owner.named_parameters()} == {"pool_A", "pool_B"}
        assert sum(p.numel() for p in owner.parameters()) == count
        for d in deltas(m, kind)[1:]:
            assert not list(d.parameters()) and owner_of(d) is owner
        for d in deltas(m, kind):
            assert d.idx_A.dtype == d.idx_B.dtype == torch.int64 and d.idx_A.numel() == rank * 2
    total = sum(per_type.values())
    assert sum(p.numel() for p in ss.adapter_parameters(m)) == total
    config = deltas(m)[0].config
    assert config.num_trainable_total([layer for _, layer in adapted_layers(m)]) == total


# 2. ΔW = 0 at init -------------------------------------------------------------------------------------------------

def test_delta_is_zero_at_init():
    m, base = adapted(), Stack()
    x = torch.randn(3, 12)
    for d in deltas(m):
        assert torch.equal(d.weight(), torch.zeros_like(d.weight()))
        assert d.pools()[0].abs().max() > 0  # P_A random, P_B = 0
        assert d.pools()[0].abs().max() <= 1 / 12 ** 0.5
    torch.testing.assert_close(m(x), base(x), atol=0, rtol=0)


# 3. private shards are exclusive; public picks within a layer are distinct ----------------------------------------

@pytest.mark.parametrize("kw", [dict(rank=4, equivalent_rank=3, private_rank=1),
                                dict(rank=5, equivalent_rank=2, private_rank=0, shards_per_vector=4),
                                dict(rank=2, equivalent_rank=2, private_rank=2)])
def test_private_blocks_are_exclusive_and_public_picks_distinct(kw):
    L = 5
    m = adapted(L, **kw)
    c = deltas(m)[0].config
    r, r_e, r_p, l = c.rank, c.equivalent_rank, c.private_rank, c.shards_per_vector
    public = (r_e - r_p) * L * l
    for kind in ("q", "v"):
        group = deltas(m, kind)
        assert group[0].pools()[0].shape[0] == r_e * L * l
        for i, d in enumerate(group):
            block = set(range(public + i * r_p * l, public + (i + 1) * r_p * l))
            for idx in (d.idx_A, d.idx_B):
                picks = idx[: (r - r_p) * l].tolist()
                assert len(set(picks)) == len(picks) and all(0 <= p < public for p in picks)
                assert idx[(r - r_p) * l:].tolist() == sorted(block)
            others = {p for o in group if o is not d for t in (o.idx_A, o.idx_B) for p in t.tolist()}
            assert not block & others


# 4. assembly formula; a shard's gradient sums every (layer, position) that uses it --------------------------------

def test_assembly_matches_hand_formula():
    m = adapted(shards_per_vector=4, rank=3)
    randomize(m)
    for d in deltas(m):
        P_A, P_B = d.pools()
        A, Bt = assembled(P_A, d.idx_A, 3, 4), assembled(P_B, d.idx_B, 3, 4)
        torch.testing.assert_close(d.factors()[0], A, atol=0, rtol=0)
        torch.testing.assert_close(d.weight(), d.scaling * Bt.T @ A)
        x = torch.randn(5, d.d_in)
        torch.testing.assert_close(d(x), d.scaling * x @ A.T @ Bt)


def test_gradient_accumulates_in_shared_shards():
    m = adapted(L=6, rank=5).double()  # 4 public picks per layer out of 6: shards are reused across layers
    randomize(m)
    group = deltas(m, "q")
    P_A, P_B = group[0].pools()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 12, generator=g, dtype=torch.float64) for _ in group]
    sum(d(x).pow(2).sum() for d, x in zip(group, xs)).backward()
    expect_A, expect_B = torch.zeros_like(P_A), torch.zeros_like(P_B)
    l, w_a, w_b = 2, 12 // 2, 12 // 2
    for d, x in zip(group, xs):  # d(loss)/dA_ℓ and d(loss)/dBᵀ_ℓ by autograd on hand-assembled leaves
        A = assembled(P_A, d.idx_A, 5, l).detach().requires_grad_()
        Bt = assembled(P_B, d.idx_B, 5, l).detach().requires_grad_()
        (d.scaling * x @ A.T @ Bt).pow(2).sum().backward()
        for j in range(5):
            for t in range(l):
                expect_A[d.idx_A[j * l + t]] += A.grad[j, t * w_a:(t + 1) * w_a]
                expect_B[d.idx_B[j * l + t]] += Bt.grad[j, t * w_b:(t + 1) * w_b]
    used = torch.cat([d.idx_A[: 4 * l] for d in group])
    assert used.unique().numel() < used.numel()  # the test does exercise shared shards
    torch.testing.assert_close(P_A.grad, expect_A)
    torch.testing.assert_close(P_B.grad, expect_B)


# 5. pair dissociation; seeded, reproducible draws; export to PEFT reproduces outputs ------------------------------

def test_pair_dissociation_and_seeded_indices():
    a, b, c = adapted(), adapted(), adapted(seed=1)
    torch.manual_seed(123)  # the global RNG does not decide the draws
    assert any(not torch.equal(d.idx_A, d.idx_B) for d in deltas(a))
    for da, db in zip(deltas(a), deltas(b)):
        assert torch.equal(da.idx_A, db.idx_A) and torch.equal(da.idx_B, db.idx_B)
    assert any(not torch.equal(da.idx_A, dc.idx_A) for da, dc in zip(deltas(a), deltas(c)))


def test_export_to_peft_reproduces_outputs(tmp_path):
    base = llama_causal()
    m = copy.deepcopy(base)
    ss.adapt_(m, "mos", targets="all-linear", **KW)
    randomize(m)
    x = ids()
    report = ss.export_lora(m, tmp_path)
    assert max(r["relative_error"] for r in report) < 1e-5 and all(r["rank"] <= 3 for r in report)
    loaded = ss.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded, x), logits(m, x), atol=1e-5, rtol=0)


# sharing survives save/load, dtype/device moves and deepcopy -------------------------------------------------------

def sgd_step(m: nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.SGD(ss.adapter_parameters(m), lr=0.1)
    m(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def assert_shared(m: nn.Module) -> None:
    for kind in ("q", "v"):
        group = deltas(m, kind)
        owner = group[0]
        assert all(owner_of(d) is owner for d in group)
        assert all(d.pools()[0] is owner.pool_A and d.pools()[1] is owner.pool_B for d in group)
        for d in group:
            P_A, P_B = owner.pool_A, owner.pool_B
            hand = d.scaling * assembled(P_B, d.idx_B, d.rank, 2).T @ assembled(P_A, d.idx_A, d.rank, 2)
            torch.testing.assert_close(d.weight(), hand.to(d.weight().dtype))


def test_save_load_keeps_sharing_and_saves_each_pool_once(tmp_path):
    m = adapted()
    randomize(m)
    ss.save_adapter(m, tmp_path)
    keys = list(load_file(tmp_path / "subspaces_adapter.safetensors"))
    assert sorted(k for k in keys if "pool" in k) == ["layers.0.q.delta.pool_A", "layers.0.q.delta.pool_B",
                                                     "layers.0.v.delta.pool_A", "layers.0.v.delta.pool_B"]
    assert sum(k.endswith(("idx_A", "idx_B")) for k in keys) == 2 * 8
    loaded = ss.load_adapter(Stack(), tmp_path)
    assert_shared(loaded)
    for da, db in zip(deltas(m), deltas(loaded)):
        assert torch.equal(da.idx_A, db.idx_A) and torch.equal(da.idx_B, db.idx_B)
    x = torch.randn(3, 12)
    sgd_step(m, x)
    sgd_step(loaded, x)  # one step on the loaded model moves every layer exactly as on the original
    assert_shared(loaded)
    for da, db in zip(deltas(m), deltas(loaded)):
        torch.testing.assert_close(db.weight(), da.weight(), atol=1e-6, rtol=0)


def test_dtype_and_device_moves_keep_sharing():
    m = adapted()
    randomize(m)
    x = torch.randn(3, 12)
    before = m(x)
    m.to(torch.float64)
    assert deltas(m)[0].pool_A.dtype == torch.float64 and deltas(m)[0].idx_A.dtype == torch.int64
    assert_shared(m)
    torch.testing.assert_close(m(x.double()), before.double(), atol=1e-5, rtol=0)
    sgd_step(m, x.double())
    assert_shared(m)
    device = "cuda" if torch.cuda.is_available() else "meta"
    m.to(device)
    for d in deltas(m):
        assert d.pools()[0].device.type == device and d.idx_A.device.type == device
    if device == "cuda":
        assert_shared(m)


def test_deepcopy_keeps_sharing_inside_the_copy():
    m = adapted()
    randomize(m)
    c = copy.deepcopy(m)
    assert_shared(c)
    assert all(owner_of(d) is not owner_of(e) for d, e in zip(deltas(c), deltas(m)))
    before = [d.weight().clone() for d in deltas(m)]
    with torch.no_grad():
        deltas(c, "q")[0].pool_B.mul_(2)
    for d, e, w in zip(deltas(c), deltas(m), before):
        assert torch.equal(e.weight(), w)
        if d.d_out == 12:  # every q layer of the copy moved with its pool
            torch.testing.assert_close(d.weight(), 2 * w)


# layers and errors -------------------------------------------------------------------------------------------------

def test_gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    m = nn.Module()
    m.layers = nn.ModuleList([nn.Module() for _ in range(2)])
    for blk in m.layers:
        blk.c_attn = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs: weight (8, 12)
    ss.adapt_(m, "mos", targets=["c_attn"], **KW)
    randomize(m)
    x = torch.randn(3, 8)
    for blk in m.layers:
        dw = blk.c_attn.delta.weight()
        assert dw.shape == (8, 12)
        torch.testing.assert_close(blk.c_attn(x), x @ (blk.c_attn.weight + dw) + blk.c_attn.bias)


@pytest.mark.parametrize("kw,match", [
    (dict(rank=1, equivalent_rank=2), "rank >= equivalent_rank >= private_rank"),
    (dict(equivalent_rank=1, private_rank=2), "rank >= equivalent_rank"),
    (dict(rank=3, equivalent_rank=2, private_rank=2), "no public"),
    (dict(shards_per_vector=0), "shards_per_vector"),
    (dict(private_rank=-1), "private_rank"),
    (dict(alpha=0), "alpha"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ss.SubspacesError, match=match):
        MoS(**{**KW, **kw})


def test_errors_name_the_layer():
    with pytest.raises(ss.SubspacesError, match=r"layers\.0\.v.*shards_per_vector=3"):
        adapted(shards_per_vector=3, rank=2, equivalent_rank=1, private_rank=0)
    with pytest.raises(ss.SubspacesError, match=r"'q'.*first layers\.0\.q.*public"):
        adapted(L=2, rank=4)  # needs 3 public rank-vectors, (2 - 1)·2 = 2 exist
    m = Stack(2)
    with pytest.raises(ss.SubspacesError):
        ss.adapt_(m, "mos", targets=["q"], rank=4, **{k: v for k, v in KW.items() if k != "rank"})
    assert not adapted_layers(m)  # a failed adapt_ leaves the model as it was


def test_half_precision_base_keeps_fp32_pools():
    m = Stack().to(torch.bfloat16)
    ss.adapt_(m, "mos", targets=["q", "v"], **KW)
    assert {p.dtype for p in ss.adapter_parameters(m)} == {torch.float32}
    assert m(torch.randn(2, 12, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_defaults_fit_a_six_layer_encoder():
    """The embedded default (MiniLM-L6) adapts W_q/W_v of 6 layers: the default ranks must fit L = 6."""
    blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"query": torch.nn.Linear(8, 8)}) for _ in range(6))
    ss.adapt_(blocks, "mos", targets=["query"])
    assert len(adapted_layers(blocks)) == 6
