"""Maestro faithful tests (../shared/methods/adapter-maestro.md): decomposition, ordered dropout, hierarchical group
lasso, progressive shrinking, SVD recovery on a linear map; truncation, save/load and the Trainer callback."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import bert_seqcls, ids, logits, with_spectrum
from torch import nn

import subspaces as ss
from subspaces.adapters import maestro
from subspaces.adapters._core import DELTA, adapted_layers
from subspaces.adapters.maestro import Maestro


def wrap(layer: nn.Module, **kw) -> tuple[nn.Module, nn.Module]:
    """(base, adapted) copies of nn.Sequential(layer), the layer adapted by Maestro."""
    base = nn.Sequential(layer).eval()
    m = copy.deepcopy(base)
    ss.adapt_(m, "maestro", targets=["0"], **kw)
    return base, m


def delta(m: nn.Module):
    return adapted_layers(m)[0][1]._modules[DELTA]


def deltas(m: nn.Module):
    return [layer._modules[DELTA] for _, layer in adapted_layers(m)]


def conv1d(nx: int, nf: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    return layer


def layers() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return {
        "linear_wide": (nn.Linear(12, 7), torch.randn(3, 12, generator=g)),
        "linear_tall": (nn.Linear(7, 12), torch.randn(2, 4, 7, generator=g)),
        "conv1d": (conv1d(5, 9), torch.randn(3, 5, generator=g)),
        "conv_s2_p1": (nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.randn(2, 3, 9, 9, generator=g)),
        "conv_tall": (nn.Conv2d(2, 30, 2, dilation=2, bias=False), torch.randn(2, 2, 7, 7, generator=g)),
    }


@pytest.mark.parametrize("name", list(layers()))
def test_decompose_reproduces_outputs_at_full_rank(name):
    layer, x = layers()[name]
    base, m = wrap(layer)
    d = delta(m)
    w = layer.weight
    k = min(w.shape[0], w[0].numel()) if isinstance(layer, nn.Conv2d) else min(w.shape)
    assert d.U.shape[1] == d.V.shape[0] == k and d.alive == k
    if isinstance(layer, nn.Conv2d):  # conv_u keeps the kernel, conv_v is 1x1
        assert d.V.shape[1:] == w.shape[1:] and d.U.shape[2:] == (1, 1)
    torch.testing.assert_close(m(x), base(x), atol=1e-5, rtol=0)
    assert type(m[0]) is type(layer)
    with torch.no_grad():  # the Delta contract: forward(x) = ΔW x, ΔW = U V − W in the layer's layout
        d.U.add_(0.1)
        dw = d.weight()
        expected = (F.conv2d(x, dw, None, layer.stride, layer.padding, layer.dilation) if dw.dim() == 4
                    else x @ dw if name == "conv1d" else F.linear(x, dw))
        torch.testing.assert_close(d(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(m(x), base(x) + expected, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in ss.adapter_parameters(m)) == Maestro().num_trainable(layer)


def test_ordered_dropout_equals_dense_leading_components():
    base, m = wrap(nn.Linear(10, 8), init="random")
    d = delta(m)
    x = torch.randn(4, 10)
    m.train()
    for p in (0.1, 0.25, 0.5, 0.9, 1.0):
        j = math.ceil(p * d.alive)
        d.width = j
        dense = F.linear(x, d.U[:, :j] @ d.V[:j], m[0].bias)
        torch.testing.assert_close(m(x), dense, atol=1e-6, rtol=0)
        with maestro.full_width(m):  # the paper's full pass
            torch.testing.assert_close(m(x), F.linear(x, d.U @ d.V, m[0].bias), atol=1e-6, rtol=0)
        assert d.width == j
    m.eval()  # inference always runs at full width
    torch.testing.assert_close(m(x), F.linear(x, d.U @ d.V, m[0].bias), atol=1e-6, rtol=0)


def test_ordered_dropout_on_a_conv():
    layer, x = layers()["conv_s2_p1"]
    _, m = wrap(layer, init="random")
    d = delta(m)
    m.train()
    d.width = 3
    dense = (d.U[:, :3, 0, 0] @ d.V[:3].reshape(3, -1)).reshape(layer.weight.shape)
    torch.testing.assert_close(m(x), F.conv2d(x, dense, layer.bias, 2, 1), atol=1e-5, rtol=0)


def test_single_layer_sampler_enumerates_every_layer_width_pair():
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 4))
    ss.adapt_(model, "maestro", targets=["0", "1"], seed=3)
    ds = deltas(model)
    assert all(d.width is None for d in ds)  # step one runs at full width
    seen = []
    for _ in range(3 + 4):  # one cycle: every (layer i, width j <= k_i) pair exactly once
        ss.adapters.step(model)
        narrowed = [(i, d.width) for i, d in enumerate(ds) if d.width is not None]
        assert len(narrowed) == 1  # one layer at a time, the others at full width
        seen += narrowed
    assert sorted(seen) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (1, 4)]
    off = nn.Sequential(nn.Linear(3, 3))
    ss.adapt_(off, "maestro", targets=["0"], sampler="none")
    ss.adapters.step(off)
    assert delta(off).width is None


def hand_lasso(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    k = V.shape[0]
    U, V = U.reshape(U.shape[0], k), V.reshape(k, -1)  # a conv: 1x1 conv_v and the kernel of conv_u
    return sum(torch.linalg.norm(V[j:]) + torch.linalg.norm(U[:, j:]) for j in range(k))


def test_hierarchical_group_lasso_is_the_tail_norm_formula():
    model = nn.Sequential(nn.Linear(6, 4), nn.Conv2d(2, 5, 3))
    ss.adapt_(model, "maestro", targets=["0", "1"], gp_lambda=0.3, init="random")
    expected = 0.3 * sum(hand_lasso(d.U, d.V) for d in deltas(model))
    torch.testing.assert_close(ss.adapters.penalty(model), expected)
    _, none = wrap(nn.Linear(3, 3), gp_lambda=0.0)
    assert ss.adapters.penalty(none) == 0.0


def test_group_lasso_gradient_grows_for_trailing_components():
    _, m = wrap(with_spectrum([1.0] * 6, d_out=6, d_in=9))  # equal singular values: equal component norms
    d = delta(m)
    ss.adapters.penalty(m).backward()
    gv, gu = d.V.grad.norm(dim=1), d.U.grad.norm(dim=0)
    assert (gv.diff() > 0).all() and (gu.diff() > 0).all()


def test_zero_tail_gives_a_finite_lasso_gradient():
    _, m = wrap(nn.Linear(5, 4))
    d = delta(m)
    with torch.no_grad():
        d.U[:, 2:] = 0
        d.V[2:] = 0
    ss.adapters.penalty(m).backward()
    assert torch.isfinite(d.U.grad).all() and torch.isfinite(d.V.grad).all()


def test_progressive_shrinking_removes_exactly_the_unimportant_components():
    S = [3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.02]
    base, m = wrap(with_spectrum(S, d_out=8, d_in=10), threshold=0.1, shrink_every=2)
    d = delta(m)
    imp = d.importance()  # balanced SVD factors: importance_j = Σ_{i>=j} σ_i
    torch.testing.assert_close(imp, torch.tensor(S).flip(0).cumsum(0).flip(0), rtol=1e-5, atol=1e-6)
    ss.adapters.step(m)
    assert d.alive == 8  # shrinking every 2nd step
    ss.adapters.step(m)
    assert torch.equal(d.low_rank, imp >= 0.1) and d.alive == 6  # 0.07 and 0.02 fall below 0.1
    assert ss.adapters.penalty(m) is not None and maestro.ranks(m) == {"0": 6}
    # components that are already zero: removed by shrinking, outputs unchanged
    _, z = wrap(with_spectrum(S, d_out=8, d_in=10), shrink_every=1)
    dz = delta(z)
    with torch.no_grad():
        dz.U[:, 5:] = 0
        dz.V[5:] = 0
    x = torch.randn(3, 10)
    before = z(x)
    ss.adapters.step(z)
    assert dz.low_rank.tolist() == [True] * 5 + [False] * 3
    torch.testing.assert_close(z(x), before, atol=1e-6, rtol=0)


def test_linear_sanity_recovers_the_svd_in_order():
    """LoD on y = M x with whitened x: U V ≈ M and U[:, :j] V[:j] ≈ the best rank-j approximation, for every j."""
    S = [3.0, 2.0, 1.2, 0.7, 0.3]
    M = with_spectrum(S, d_out=5, d_in=8).weight.detach()
    n = 64
    X = torch.linalg.qr(torch.randn(n, 8, generator=torch.Generator().manual_seed(1))).Q * n ** 0.5  # XᵀX/n = I
    Y = X @ M.T

    def fit(sampler: str, steps: int):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 5, bias=False))
        ss.adapt_(model, "maestro", targets=["0"], init="random", gp_lambda=0.0, sampler=sampler)
        opt = torch.optim.Adam(ss.adapter_parameters(model), lr=0.05)
        model.train()
        for _ in range(steps):  # the paper's step: full pass + sampled sub-model
            with maestro.full_width(model):
                loss = (model(X) - Y).pow(2).sum(1).mean()
            loss = loss + (model(X) - Y).pow(2).sum(1).mean()
            loss.backward()
            opt.step()
            ss.adapters.step(model)
            opt.zero_grad()
        d = delta(model)
        return d.U.detach(), d.V.detach()

    U, V = fit("single_layer", 600)
    assert torch.linalg.norm(U @ V - M) < 0.01 * torch.linalg.norm(M)
    norms = U.norm(dim=0) * V.norm(dim=1)
    assert (norms.diff() < 0).all()
    torch.testing.assert_close(norms, torch.tensor(S), rtol=0.02, atol=0)
    Us, Ss, Vh = torch.linalg.svd(M)
    for j in range(1, 5):
        Mj = (Us[:, :j] * Ss[:j]) @ Vh[:j]
        assert torch.linalg.norm(U[:, :j] @ V[:j] - Mj) < 0.03 * torch.linalg.norm(Mj)
    U, V = fit("none", 200)  # without ordered dropout the fit is exact but the components come in no order
    M1 = (Us[:, :1] * Ss[:1]) @ Vh[:1]
    assert torch.linalg.norm(U[:, :1] @ V[:1] - M1) > 0.2 * torch.linalg.norm(M1)


def test_truncate_after_svd_init_is_the_rank_k_svd():
    layer = with_spectrum([4.0, 3.0, 2.0, 1.0, 0.5, 0.25], d_out=6, d_in=9)
    _, m = wrap(layer)
    x = torch.randn(3, 9)
    ss.truncate_(m, rank=2)
    U, S, Vh = torch.linalg.svd(layer.weight.detach())
    w2 = (U[:, :2] * S[:2]) @ Vh[:2]
    torch.testing.assert_close(m(x), F.linear(x, w2, layer.bias), atol=1e-5, rtol=0)
    d = delta(m)
    assert d.U.shape == (6, 2) and d.V.shape == (2, 9) and d.low_rank.shape == (2,)
    ss.fold_(m)
    torch.testing.assert_close(m[0].weight, w2, atol=1e-5, rtol=0)
    assert list(m.state_dict()) == ["0.weight", "0.bias"]


def test_truncate_then_save_load_reproduces_outputs(tmp_path):
    base = bert_seqcls()
    m = copy.deepcopy(base)
    ss.adapt_(m, "maestro", targets=["query", "value"], shrink_every=1, threshold=0.02)
    ss.adapters.step(m)  # shrinking leaves a masked tail
    names = [n for n, _ in adapted_layers(m)]
    assert any(k < 32 for k in maestro.ranks(m).values())
    ss.truncate_(m, rank={names[0]: 3, names[1]: 5})
    x = ids()
    out = logits(m, x)
    assert maestro.ranks(m)[names[0]] == 3 and delta(m).U.shape == (32, 3)
    ss.save_adapter(m, tmp_path / "maestro")
    loaded = ss.load_adapter(copy.deepcopy(base), tmp_path / "maestro")
    torch.testing.assert_close(logits(loaded, x), out, atol=1e-6, rtol=0)
    assert maestro.ranks(loaded) == maestro.ranks(m)
    n_params = sum(p.numel() for p in ss.adapter_parameters(loaded))
    assert n_params == sum(p.numel() for p in ss.adapter_parameters(m)) < 4 * 32 * 64


def test_deepcopy_follows_the_copied_layer_and_bf16_bases():
    _, m = wrap(nn.Linear(6, 4))
    c = copy.deepcopy(m)
    assert delta(c).layer is c[0] and delta(m).layer is m[0]
    x = torch.randn(2, 6)
    torch.testing.assert_close(c(x), m(x))
    base, h = wrap(nn.Linear(6, 4).to(torch.bfloat16))
    assert delta(h).U.dtype == torch.float32  # master copy for half-precision bases
    y = h(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, base(x.to(torch.bfloat16)), atol=0.05, rtol=0.02)


def test_bad_hyperparameters_are_refused():
    for kw in ({"init": "pca"}, {"sampler": "per_layer"}, {"gp_lambda": -1.0}, {"threshold": "x"},
               {"shrink_every": -1}, {"rank": 0}, {"seed": 1.5}):
        with pytest.raises(ss.SubspacesError):
            Maestro(**kw)
    with pytest.raises(ss.SubspacesError, match="groups=1"):
        wrap(nn.Conv2d(4, 4, 3, groups=2))


def test_runs_in_an_unmodified_trainer_with_sampling_and_shrinking(tmp_path):
    from transformers import Trainer, TrainingArguments

    from subspaces.integrations.hf_trainer import AdapterSchedule

    base = bert_seqcls()
    m = copy.deepcopy(base)
    ss.adapt_(m, "maestro", targets=["query", "value"], shrink_every=2, threshold=0.02)
    before = [d.U.detach().clone() for d in deltas(m)]
    data = [{"input_ids": ids(1, 6, seed=i)[0], "labels": torch.tensor(i % 3)} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2,
                             learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_strategy="no")
    Trainer(model=m, args=args, train_dataset=data, callbacks=[AdapterSchedule()]).train()
    ds = deltas(m)
    assert all(not torch.equal(d.U, b) for d, b in zip(ds, before))
    assert sum(d.width is not None for d in ds) == 1  # the next step's sampled (layer, width)
    assert any(d.alive < 32 for d in ds)  # shrinking ran (steps 2 and 4, the last one)
    for d in ds:
        assert torch.equal(d.low_rank, d.importance() >= 0.02)
    m.eval()
    x = ids()
    out = logits(m, x)
    ss.fold_(m)
    torch.testing.assert_close(logits(m, x), out, atol=1e-5, rtol=0)
