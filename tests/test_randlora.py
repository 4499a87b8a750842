"""RandLoRA faithful tests (methods/adapter-randlora.md): identity at init, full rank, count, the custom gradient,
shared reproducible bases that are never saved, fold equivalence with the transposed orientation."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_stored_once, ids, llama_causal, logits, randomize_adapters
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
    keys = {(min(layer.weight.shape), max(layer.weight.shape)) for _, layer in adapted_layers(m)}
    assert len(adapted_layers(m)) == 14 and len(keys) == 3
    assert_stored_once(m, resolved, 2 * len(keys))  # A and B once per shape


def test_delta_before_share_raises_clearly():
    d = RandLoRA(rank=8).build(nn.Linear(64, 48))
    with pytest.raises(ss.SubspacesError, match="RandLoRA.share"):
        d.weight()
