"""NOLA faithful tests (methods/adapter-nola.md): count, identity at init, seeded bases that are never saved,
the regenerate-in-backward autograd function, fold equivalence."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_stored_once, ids, llama_causal, logits, randomize_adapters
from safetensors.torch import load_file
from torch import nn

import subspaces as ss
from subspaces.adapters import NOLA
from subspaces.adapters import nola as nola_mod
from subspaces.adapters._core import adapted_layers


def one_layer(layer: nn.Module, **kw) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.layer = layer
    ss.adapt_(m, "nola", targets=["layer"], **kw)
    return m


def stored(model: nn.Module) -> tuple[int, set[int]]:
    """(buffer registrations, distinct buffer storages) over every adapter of ``model``."""
    bufs = [b for n, b in model.named_buffers(remove_duplicate=False) if ".delta." in n]
    return len(bufs), {b.data_ptr() for b in bufs}


def resolved(model: nn.Module, names=("A0", "bases_A", "bases_B")) -> list[torch.Tensor]:
    """The frozen tensors every layer actually computes with."""
    return [t for _, layer in adapted_layers(model) for n in names if (t := layer.delta.shared(n)) is not None]


# 1. trainable count k_a + k_b, independent of r, d_in, d_out ----------------------------------------------------

@pytest.mark.parametrize("d_in,d_out,rank", [(20, 12, 2), (64, 48, 8), (7, 90, 3)])
def test_count_is_ka_plus_kb(d_in, d_out, rank):
    m = one_layer(nn.Linear(d_in, d_out), rank=rank, k_a=24, k_b=40)
    d = m.layer.delta
    assert sum(p.numel() for p in ss.adapter_parameters(m)) == 64 == NOLA(k_a=24, k_b=40).num_trainable(m.layer)
    assert {n for n, _ in d.named_parameters()} == {"nola_alpha", "nola_beta"}
    assert d.bases_A.shape == (24, rank, d_in) and d.bases_B.shape == (40, d_out, rank)
    assert set(d.state_dict()) == {"nola_alpha", "nola_beta"}  # bases and A0 are non-persistent buffers


# 2. ΔW = 0 at init (LLM variant) -----------------------------------------------------------------------------------

def test_identity_at_init_and_live_branch():
    base = llama_causal()
    x = ids()
    m = copy.deepcopy(base)
    ss.adapt_(m, "nola", rank=2, k_a=8, k_b=8, targets="all-linear")
    assert torch.equal(logits(m, x), logits(base, x))
    d = m.model.layers[0].self_attn.q_proj.delta
    assert torch.equal(d.nola_alpha, torch.zeros(8)) and d.shared("A0").abs().max() > 0  # A = A0 random, B = 0
    randomize_adapters(m)
    assert not torch.allclose(logits(m, x), logits(base, x))


def test_uniform_coef_variant_starts_nonzero():
    m = one_layer(nn.Linear(16, 12), rank=2, k_a=8, k_b=8, init="uniform_coef")
    d = m.layer.delta
    assert torch.allclose(d.nola_alpha, torch.full((8,), 1 / 8)) and d.shared("A0") is None
    assert d.weight().abs().max() > 0
    assert d.bases_A.abs().max() <= 1 / (16 * 2) ** 0.5  # kaiming-uniform(a=√5) of a (k, d_in, r) stack


# 3. determinism: seeded bases, only coefficients saved, global RNG untouched ---------------------------------------

def test_bases_regenerate_bit_identically_and_depend_on_seed():
    a = one_layer(nn.Linear(16, 12), rank=2, k_a=8, k_b=8).layer.delta
    b = one_layer(nn.Linear(16, 12), rank=2, k_a=8, k_b=8).layer.delta
    assert b.bases_A is not a.bases_A
    for name in ("A0", "bases_A", "bases_B"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    c = one_layer(nn.Linear(16, 12), rank=2, k_a=8, k_b=8, seed=1).layer.delta
    assert not torch.equal(a.bases_A, c.bases_A)
    assert a.bases_A.abs().max() <= 1 / 8 ** 0.5  # U(-1, 1) / √k


def test_saved_file_holds_only_coefficients_and_reload_regenerates(tmp_path):
    base = llama_causal()
    m = copy.deepcopy(base)
    ss.adapt_(m, "nola", rank=2, k_a=8, k_b=8, targets="all-linear")
    randomize_adapters(m)
    x = ids()
    ref = logits(m, x)
    ss.save_adapter(m, tmp_path)
    saved = load_file(tmp_path / "subspaces_adapter.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"nola_alpha", "nola_beta"}
    assert sum(v.numel() for v in saved.values()) == 16 * len(adapted_layers(m))
    loaded = ss.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(loaded, x), ref)
    assert stored(loaded) == (12, set(map(torch.Tensor.data_ptr, resolved(loaded))))  # shared again after load
    for a, b in zip(resolved(m), resolved(loaded)):
        assert a is not b and torch.equal(a, b)


@pytest.mark.parametrize("cache", [True, False])
def test_global_rng_untouched(cache):
    m = one_layer(nn.Linear(16, 12), rank=2, k_a=8, k_b=8, cache_bases=cache)
    randomize_adapters(m)
    state = torch.get_rng_state()
    m.layer(torch.ones(3, 16)).sum().backward()
    assert torch.equal(torch.get_rng_state(), state)


# 4. the memory trick: regenerating bases in forward and backward equals autograd through stored bases -----------

def test_regenerating_function_gradcheck():
    spec = (1234, "A", (3, 5), 0.3)
    coef = torch.randn(70, dtype=torch.float64, requires_grad=True)  # > one chunk of 64
    assert torch.autograd.gradcheck(lambda c: nola_mod._Mix.apply(c, spec), (coef,))
    stored = nola_mod._bases(1234, "A", 0, 70, (3, 5), 0.3, "cpu", torch.float64)
    g = torch.randn(3, 5, dtype=torch.float64)
    (ours,) = torch.autograd.grad(nola_mod._Mix.apply(coef, spec), coef, g)
    (ref,) = torch.autograd.grad(torch.einsum("k,kij->ij", coef, stored), coef, g)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_uncached_equals_cached_layer():
    kw = dict(rank=3, k_a=70, k_b=20)
    layer = nn.Linear(10, 6).double()
    a = one_layer(copy.deepcopy(layer), **kw)
    b = one_layer(copy.deepcopy(layer), cache_bases=False, **kw)
    assert not hasattr(b.layer.delta, "bases_A")
    randomize_adapters(a)
    randomize_adapters(b)
    x = torch.randn(4, 10, dtype=torch.float64)
    ya, yb = a.layer(x), b.layer(x)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    ya.pow(2).sum().backward()
    yb.pow(2).sum().backward()
    for pa, pb in zip(a.layer.delta.parameters(), b.layer.delta.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-10, atol=1e-12)


# 5. fold equivalence (Linear and GPT-2 Conv1D) ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fold_reproduces_outputs(kind):
    from transformers.pytorch_utils import Conv1D

    layer = nn.Linear(16, 12) if kind == "linear" else Conv1D(12, 16)  # Conv1D(nf=d_out, nx=d_in)
    m = one_layer(layer, rank=4, k_a=16, k_b=16, alpha=2.0)
    randomize_adapters(m, std=0.5)
    d = m.layer.delta
    A, B = d.factors()
    torch.testing.assert_close(d.weight(), (0.5 * B @ A).T if kind == "conv1d" else 0.5 * B @ A)
    x = torch.randn(5, 16)
    with torch.no_grad():
        adapted = m.layer(x)
        ss.fold_(m)
        torch.testing.assert_close(m.layer(x), adapted, atol=1e-5, rtol=0)


def test_config_validation():
    for kw in ({"rank": 0}, {"k_a": -1}, {"init": "zeros"}, {"dropout": 1.0}, {"seed": -3}):
        with pytest.raises(ss.SubspacesError, match=next(iter(kw))):
            NOLA(**kw)
    with pytest.raises(ss.SubspacesError, match="Linear"):
        one_layer(nn.Conv1d(3, 4, 2))


# 6. memory: one basis tensor per layer shape, kept through .to() and deepcopy; outputs as before the sharing ------

# logits[0, -1, :6] and the first entries of the 64 -> 32 layer's frozen tensors, recorded from the implementation
# before NOLA.share (a module-level cache shared one tensor per shape until .to() split it): same seeds, same bases.
RECORDED = {
    "lora": ([-0.017988204956054688, -0.027331314980983734, -0.003059535752981901, 0.02519688569009304,
              0.007387160323560238, -0.03443007916212082],
             {"A0": [-0.10724405944347382, -0.08063453435897827, 0.05209560692310333],
              "bases_A": [-0.26279982924461365, 0.25979265570640564, -0.1903459131717682],
              "bases_B": [0.03242011368274689, -0.30334046483039856, -0.2867187261581421]}),
    "uniform_coef": ([-0.07100304961204529, -0.049652229994535446, -0.01582740806043148, 0.11025194823741913,
                      0.05951811745762825, -0.09606614708900452],
                     {"bases_A": [0.07804205268621445, 0.03423692658543587, 0.07833745330572128],
                      "bases_B": [0.037713050842285156, 0.0776095986366272, -0.03464120626449585]}),
}


@pytest.mark.parametrize("init,cache", [("lora", True), ("uniform_coef", True), ("lora", False)])
def test_outputs_and_bases_as_recorded(init, cache):
    m = llama_causal()
    ss.adapt_(m, "nola", rank=2, k_a=8, k_b=8, init=init, cache_bases=cache, targets="all-linear")
    randomize_adapters(m)
    out, firsts = RECORDED[init]
    torch.testing.assert_close(logits(m, ids())[0, -1, :6], torch.tensor(out), atol=1e-6, rtol=0)
    d = m.model.layers[1].mlp.down_proj.delta  # not the owner of its shape: layer 0's down_proj is
    for name, values in firsts.items():
        if cache or name == "A0":
            assert torch.equal(d.shared(name).flatten()[:3], torch.tensor(values))


@pytest.mark.parametrize("cache", [True, False])
def test_bases_stored_once_per_shape_through_to_and_deepcopy(cache):
    m = llama_causal()
    ss.adapt_(m, "nola", rank=2, k_a=8, k_b=8, cache_bases=cache, targets="all-linear")
    randomize_adapters(m)
    shapes = {(layer.in_features, layer.out_features) for _, layer in adapted_layers(m)}
    assert len(adapted_layers(m)) == 14 and len(shapes) == 4
    per_shape = 3 if cache else 1  # A0, bases_A, bases_B; A0 only when bases are regenerated on the fly
    assert_stored_once(m, resolved, per_shape * len(shapes))


def test_delta_before_share_raises_clearly():
    d = NOLA(rank=2, k_a=8, k_b=8).build(nn.Linear(16, 12))
    with pytest.raises(ss.SubspacesError, match="NOLA.share"):
        d(torch.ones(2, 16))
