"""RandLoRA faithful tests (methods/adapter-randlora.md): identity at init, full rank, count, the custom gradient,
shared reproducible bases that are never saved, fold equivalence with the transposed orientation."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import ids, llama_causal, logits, randomize_adapters
from safetensors.torch import load_file
from torch import nn

import subspaces as ss
from subspaces.adapters import RandLoRA
from subspaces.adapters import randlora as rl
from subspaces.adapters._core import adapted_layers


def one_layer(layer: nn.Module, **kw) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.layer = layer
    ss.adapt_(m, "randlora", targets=["layer"], **kw)
    return m


def stored(model: nn.Module) -> tuple[int, set[int]]:
    """(buffer registrations, distinct buffer storages) over every adapter of ``model``."""
    bufs = [b for n, b in model.named_buffers(remove_duplicate=False) if ".delta." in n]
    return len(bufs), {b.data_ptr() for b in bufs}


def resolved(model: nn.Module) -> list[torch.Tensor]:
    """The frozen bases every layer actually computes with."""
    return [t for _, layer in adapted_layers(model) for t in layer.delta.bases()]


def explicit_dw(d) -> torch.Tensor:
    """s · Σ_i B_i Λ_i A Γ_i (paper form), transposed when d_out < d_in."""
    lam, gam, (A, B) = d.randlora_lambda, d.randlora_gamma, d.bases()
    dw = sum(B[:, i, :] @ torch.diag(lam[:, i]) @ A @ torch.diag(gam[i]) for i in range(lam.shape[1]))
    dw = dw * d.scaling
    return dw if d.small_in else dw.T


# 1. ΔW = 0 at init ---------------------------------------------------------------------------------------------

def test_identity_at_init_and_init_values():
    base = llama_causal()
    x = ids()
    m = copy.deepcopy(base)
    ss.adapt_(m, "randlora", rank=4, alpha=8.0, targets="all-linear")
    assert torch.equal(logits(m, x), logits(base, x))
    d = m.model.layers[0].mlp.down_proj.delta  # 64 -> 32: N = 8, d_min = 32
    assert torch.equal(d.randlora_lambda, torch.zeros(4, 8))
    assert torch.equal(d.randlora_gamma, torch.full((8, 32), 1 / 32))
    randomize_adapters(m)
    assert not torch.allclose(logits(m, x), logits(base, x))


# 2. full rank whenever N·r ≥ d_min ------------------------------------------------------------------------------

@pytest.mark.parametrize("d_in,d_out", [(64, 48), (48, 64)])
def test_update_is_full_rank(d_in, d_out):
    m = one_layer(nn.Linear(d_in, d_out).double(), rank=8, alpha=16.0)
    randomize_adapters(m, std=1.0)
    dw = m.layer.delta.weight()
    assert dw.shape == (d_out, d_in)
    assert torch.linalg.matrix_rank(dw).item() == 48
    single = one_layer(nn.Linear(d_in, d_out).double(), rank=48, alpha=16.0)  # N = 1 term: rank r only
    randomize_adapters(single, std=1.0)
    assert single.layer.delta.randlora_lambda.shape == (48, 1)


# 3. count N·r + N·d_min; bases are buffers, never saved ---------------------------------------------------------

@pytest.mark.parametrize("d_in,d_out,rank", [(64, 48, 8), (30, 100, 7), (100, 30, 32)])
def test_count(d_in, d_out, rank):
    m = one_layer(nn.Linear(d_in, d_out), rank=rank)
    n, d_min = math.ceil(min(d_in, d_out) / rank), min(d_in, d_out)
    expected = n * rank + n * d_min
    assert sum(p.numel() for p in ss.adapter_parameters(m)) == expected == RandLoRA(rank=rank).num_trainable(m.layer)
    d = m.layer.delta
    assert {n for n, _ in d.named_parameters()} == {"randlora_lambda", "randlora_gamma"}
    assert d.randlora_A.shape == (rank, d_min) and d.randlora_B.shape == (max(d_in, d_out), n, rank)
    assert set(d.state_dict()) == {"randlora_lambda", "randlora_gamma"}  # the bases are non-persistent buffers


def test_saved_file_holds_only_scalings_and_reload_regenerates(tmp_path):
    base = llama_causal()
    m = copy.deepcopy(base)
    ss.adapt_(m, "randlora", rank=4, alpha=8.0, targets="all-linear")
    randomize_adapters(m)
    x = ids()
    ref = logits(m, x)
    ss.save_adapter(m, tmp_path)
    saved = load_file(tmp_path / "subspaces_adapter.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"randlora_lambda", "randlora_gamma"}
    loaded = ss.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(loaded, x), ref)
    assert stored(loaded) == (6, set(map(torch.Tensor.data_ptr, resolved(loaded))))  # shared again after load
    for a, b in zip(resolved(m), resolved(loaded)):
        assert a is not b and torch.equal(a, b)


# 4. the custom gradient equals plain autograd ---------------------------------------------------------------------

def test_scaled_base_gradcheck():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 7, generator=g, dtype=torch.float64)
    lam = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    gam = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rl._ScaledBase.apply(A, a, b), (lam, gam))
    out = torch.randn(4, 3, 7, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(rl._ScaledBase.apply(A, lam, gam), (lam, gam), out)
    plain = torch.autograd.grad(lam.T[:, :, None] * A[None] * gam[:, None, :], (lam, gam), out)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# 5. shared bases, reproducible from the seed ------------------------------------------------------------------------

def test_bases_shared_sliced_and_seeded():
    m = nn.Module()
    m.a, m.b, m.big = nn.Linear(48, 64), nn.Linear(48, 64), nn.Linear(300, 400)
    ss.adapt_(m, "randlora", rank=8, seed=3, targets=["a", "b", "big"])
    a, b, big = m.a.delta, m.b.delta, m.big.delta
    assert all(s is t for s, t in zip(a.bases(), b.bases()))  # one tensor for equal shapes
    assert torch.equal(a.randlora_A, big.randlora_A[:, :48])  # smaller layers see slices of the larger bases
    assert torch.equal(a.randlora_B, big.randlora_B[:64, :6])
    A, B = rl.random_bases(3, 8, 300, 400)
    assert torch.equal(A, big.randlora_A) and torch.equal(B, big.randlora_B)
    assert not torch.equal(rl.random_bases(4, 8, 300, 400)[0], A)
    assert abs(B.std().item() - 1) < 0.02 and abs(B.mean().item()) < 0.02  # kaiming-uniform / std


@pytest.mark.parametrize("bases,p_zero", [("sparse", 2 / 3), ("very_sparse", 1 - 1 / math.sqrt(300))])
def test_sparse_bases_are_ternary(bases, p_zero):
    A, B = rl.random_bases(0, 8, 300, 400, bases=bases)
    s = 3.0 if bases == "sparse" else math.sqrt(300)
    torch.testing.assert_close(B.unique(), torch.tensor([-math.sqrt(s), 0.0, math.sqrt(s)]))
    assert abs((B == 0).float().mean().item() - p_zero) < 0.01
    assert abs(B.std().item() - 1) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bases_equal_cpu_bases():
    cpu = one_layer(nn.Linear(48, 64), rank=8).layer.delta
    gpu = one_layer(nn.Linear(48, 64).cuda(), rank=8).layer.delta
    assert gpu.bases()[1].is_cuda and torch.equal(gpu.bases()[1].cpu(), cpu.bases()[1])


# 6. fold equivalence and the transposed orientation ----------------------------------------------------------------

@pytest.mark.parametrize("kind,d_in,d_out", [("linear", 64, 48), ("linear", 40, 56), ("conv1d", 64, 48)])
def test_fold_and_transpose(kind, d_in, d_out):
    from transformers.pytorch_utils import Conv1D

    layer = nn.Linear(d_in, d_out) if kind == "linear" else Conv1D(d_out, d_in)
    m = one_layer(layer.double(), rank=8, alpha=16.0)
    randomize_adapters(m)
    d = m.layer.delta
    assert d.small_in == (d_in <= d_out) and d.randlora_gamma.shape[1] == min(d_in, d_out)
    dw = explicit_dw(d)
    assert dw.shape == (d_out, d_in)
    torch.testing.assert_close(d.weight(), dw.T if kind == "conv1d" else dw)
    x = torch.randn(5, d_in, dtype=torch.float64)
    with torch.no_grad():
        adapted = m.layer(x)
        torch.testing.assert_close(adapted - layer.__class__.forward(m.layer, x), x @ dw.T)
        ss.fold_(m)
        torch.testing.assert_close(m.layer(x), adapted)


def test_scaling_conventions():
    peft = RandLoRA(rank=8, alpha=16.0).build(nn.Linear(64, 48))
    loralib = RandLoRA(rank=8, alpha=16.0, scaling="loralib").build(nn.Linear(64, 48))
    assert peft.scaling == 2.0 and loralib.scaling == pytest.approx(2.0 / math.sqrt(6))
    for kw in ({"rank": 0}, {"bases": "dense2"}, {"scaling": "vera"}, {"dropout": -0.1}, {"seed": -1}):
        with pytest.raises(ss.SubspacesError, match=next(iter(kw))):
            RandLoRA(**kw)


# 7. memory: one basis pair per (d_min, d_max), kept through .to() and deepcopy; outputs as before the sharing ------

# logits[0, -1, :6] and the first entries of the 64 -> 32 layer's bases, recorded from the implementation before
# RandLoRA.share (a module-level cache shared one tensor per shape until .to() split it): same seeds, same bases.
RECORDED = {
    "dense": ([0.1378939002752304, -0.03300781548023224, -0.0515286810696125, -0.007073577027767897,
               -0.2845856547355652, 0.07289820909500122],
              [-0.3504699766635895, -1.703077793121338, -0.2089410424232483],
              [0.9860219359397888, -0.28437477350234985, 0.27212265133857727], -28.47335705840669),
    "sparse": ([-0.031901612877845764, 0.1481255441904068, -0.19170401990413666, -0.0805167406797409,
                -0.010621643625199795, -0.007681793533265591],
               [0.0, -1.7320507764816284, 0.0], [0.0, 0.0, 0.0], 6.928203105926514),
}


@pytest.mark.parametrize("bases", list(RECORDED))
def test_outputs_and_bases_as_recorded(bases):
    m = llama_causal()
    ss.adapt_(m, "randlora", rank=4, alpha=8.0, bases=bases, targets="all-linear")
    randomize_adapters(m)
    out, a3, b3, b_sum = RECORDED[bases]
    torch.testing.assert_close(logits(m, ids())[0, -1, :6], torch.tensor(out), atol=1e-6, rtol=0)
    A, B = m.model.layers[1].mlp.down_proj.delta.bases()  # not the owner of its shape: layer 0's down_proj is
    assert torch.equal(A.flatten()[:3], torch.tensor(a3)) and torch.equal(B.flatten()[:3], torch.tensor(b3))
    assert B.double().sum().item() == pytest.approx(b_sum, rel=1e-9)


def test_bases_stored_once_per_shape_through_to_and_deepcopy():
    m = llama_causal()
    ss.adapt_(m, "randlora", rank=4, alpha=8.0, targets="all-linear")
    randomize_adapters(m)
    x = ids()
    ref = logits(m, x)
    keys = {(min(layer.weight.shape), max(layer.weight.shape)) for _, layer in adapted_layers(m)}
    assert len(adapted_layers(m)) == 14 and len(keys) == 3

    def check(model, dtype):
        count, ptrs = stored(model)
        assert count == len(ptrs) == 2 * len(keys)  # A and B registered once per shape, not once per layer
        tensors = resolved(model)
        assert {t.data_ptr() for t in tensors} == ptrs and all(t.dtype == dtype for t in tensors)
        return ptrs

    before = check(m, torch.float32)
    twin = copy.deepcopy(m)
    assert check(twin, torch.float32).isdisjoint(before)  # the copy shares its own bases
    assert torch.equal(logits(twin, x), ref)
    m.to(torch.float64)
    check(m, torch.float64)
    torch.testing.assert_close(logits(m, x).float(), ref, atol=1e-6, rtol=0)


def test_delta_before_share_raises_clearly():
    d = RandLoRA(rank=8).build(nn.Linear(64, 48))
    with pytest.raises(ss.SubspacesError, match="RandLoRA.share"):
        d.weight()
