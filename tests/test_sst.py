"""SST (Sparse Spectral Training): the spec's faithful tests plus training, bf16 and bit-exact resume."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import subspaces as ss
from subspaces._errors import SubspacesError
from subspaces.models import tiny_llama
from subspaces.optim import SST, SSTLinear
from subspaces.optim.sst import sampling_probabilities, sst_


class Net(nn.Module):
    """Two targeted linears (under "mlp") and one that stays dense."""

    def __init__(self, bias: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.mlp = nn.Sequential(nn.Linear(16, 24, bias=bias), nn.Tanh(), nn.Linear(24, 12, bias=bias))
        self.head = nn.Linear(12, 3, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(x))


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 16, generator=g), torch.randn(32, 3, generator=g)


def train(model, opt, steps: int, start: int = 0) -> list[float]:
    losses = []
    for s in range(start, start + steps):
        x, y = batch(s)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def layers(model) -> list[SSTLinear]:
    return [m for m in model.modules() if isinstance(m, SSTLinear)]


def assert_orthonormal(Q: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1], dtype=Q.dtype), atol=atol, rtol=0)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_exact_init_and_orthonormal_after_resvd(shape):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0])
    layer = SSTLinear(lin, 5)
    U, S, V = layer.factors()
    torch.testing.assert_close((U * S) @ V.T, lin.weight.detach(), atol=1e-5, rtol=0)
    assert U.shape == (shape[0], 12) and V.shape == (shape[1], 12) and (S[:-1] >= S[1:]).all()
    assert_orthonormal(U), assert_orthonormal(V)
    with torch.no_grad():  # move the active columns off the orthonormal frame, as training does
        layer.U_active.add_(0.3 * torch.randn_like(layer.U_active))
        layer.V_active.add_(0.3 * torch.randn_like(layer.V_active))
        layer.renormalize_()
    U, S, V = layer.factors()
    W = (U * S) @ V.T
    assert (U.T @ U - torch.eye(12)).abs().max() > 1e-2
    layer.resvd_()
    U2, S2, V2 = layer.factors()
    torch.testing.assert_close((U2 * S2) @ V2.T, W, atol=1e-5, rtol=0)
    assert_orthonormal(U2), assert_orthonormal(V2)
    assert (S2 >= 0).all() and (S2[:-1] >= S2[1:]).all()


def test_resvd_in_training_keeps_orthonormality():
    model = Net()
    opt = SST(rank=3, steps_per_iteration=2, iterations_per_round=2).setup(model, lr=1e-2)
    train(model, opt, 4)  # the round boundary at step 4 re-SVDs every layer
    for layer in layers(model):
        U, _, V = layer.factors()
        assert_orthonormal(U), assert_orthonormal(V)


def test_spectral_gradient_identities():
    torch.manual_seed(0)
    layer = SSTLinear(nn.Linear(12, 20).double(), 5)
    with torch.no_grad():  # a non-trivial σ so that "true / σ_i" differs from the true gradient
        layer.sigma.mul_(torch.linspace(0.5, 3, 12, dtype=torch.float64))
    x = torch.randn(3, 4, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 20, dtype=torch.float64)
    (layer(x) * w).sum().backward()

    U, S, V = (t.clone().requires_grad_() for t in layer.factors())
    W = (U * S) @ V.T
    W.retain_grad()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ W.T + layer.bias
    (y_ref * w).sum().backward()
    G, idx = W.grad, layer.index

    torch.testing.assert_close(layer(x), y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.sigma.grad, torch.diagonal(U.T @ G @ V))
    torch.testing.assert_close(layer.sigma.grad, S.grad)
    torch.testing.assert_close(layer.U_active.grad, G @ V[:, idx])  # ∇̃U_i = G V_i
    torch.testing.assert_close(layer.V_active.grad, G.T @ U[:, idx])  # ∇̃V_i = Gᵀ U_i
    torch.testing.assert_close(layer.U_active.grad, U.grad[:, idx] / S[idx])
    torch.testing.assert_close(layer.V_active.grad, V.grad[:, idx] / S[idx])
    assert (U.grad[:, idx] - layer.U_active.grad).abs().max() > 1e-3  # the σ_i factor is really gone


def test_sparsity_of_updates():
    model = Net()
    opt = SST(rank=3, steps_per_iteration=100).setup(model, lr=1e-2)
    before = [(layer.factors(), layer.U.clone(), layer.V.clone()) for layer in layers(model)]
    train(model, opt, 1)
    for layer, ((U0, S0, V0), Ub, Vb) in zip(layers(model), before):
        U1, S1, V1 = layer.factors()
        idx = layer.index
        frozen = torch.ones(len(S0), dtype=torch.bool)
        frozen[idx] = False
        for A0, A1 in ((U0, U1), (V0, V1)):
            assert torch.equal(A0[:, frozen], A1[:, frozen])
            assert ((A0[:, idx] - A1[:, idx]).abs().amax(0) > 0).all()
        assert ((S1 != S0) | (S1 == 0)).all() and (S1 >= 0).all()
        for P in (layer.U_active, layer.V_active):
            torch.testing.assert_close(P.norm(dim=0), torch.ones(3))
        assert torch.equal(layer.U, Ub) and torch.equal(layer.V, Vb)  # buffers change only at resampling


def test_resample_swaps_columns_and_resets_moments():
    model = Net()
    opt = SST(rank=3, steps_per_iteration=2).setup(model, lr=1e-2)
    first = [layer.index.clone() for layer in layers(model)]
    params = [p for layer in layers(model) for p in (layer.U_active, layer.V_active)]
    train(model, opt, 2)
    assert any(not torch.equal(a, layer.index) for a, layer in zip(first, layers(model)))
    assert [p for layer in layers(model) for p in (layer.U_active, layer.V_active)] == params  # same objects
    for layer in layers(model):
        assert torch.equal(layer.U_active, layer.U[:, layer.index])
        assert torch.equal(layer.V_active, layer.V[:, layer.index])
        assert layer.U_active not in opt.state and layer.V_active not in opt.state
        assert layer.sigma in opt.state


def test_optimizer_state_count():
    model = Net(bias=False)
    model.head.weight.requires_grad_(False)  # only SST parameters train: the count is the formula's alone
    r = 3
    opt = SST(rank=r, steps_per_iteration=2).setup(model, lr=1e-2)
    expected = sum(2 * (r * (m + n) + min(m, n)) for m, n in ((24, 16), (12, 24))) * 4
    for steps in (1, 2):  # step 3 follows a resampling: other columns, same count
        train(model, opt, steps)
        assert ss.optim.state_bytes(opt) == ss.optim.expected_state_bytes(opt) == expected


def test_sampling_frequency_monotone_and_mixture_floor():
    sigma = torch.tensor([0.0, 0.5, 1, 2, 4, 8, 16, 32])
    k = len(sigma)
    p = sampling_probabilities(sigma, "mixture")
    assert p.min() >= 1 / (2 * k) and torch.isclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(sampling_probabilities(sigma, "sigma")[1:], (sigma / sigma.sum())[1:].double())
    layer = SSTLinear(nn.Linear(8, 8), 3)
    g = torch.Generator().manual_seed(0)
    for mode in ("sigma", "mixture"):
        layer.sampling = mode
        with torch.no_grad():
            layer.sigma.copy_(sigma)
        counts = torch.zeros(k)
        for _ in range(2000):
            layer.resample_(g)
            counts[layer.index] += 1
        freq = counts / 2000
        assert (freq[1:] >= freq[:-1] - 0.03).all() and freq[-1] > freq[0] + 0.5  # monotone up to noise
        if mode == "mixture":
            assert freq.min() >= 1 / (2 * k)  # per draw ≥ 1/(2k), so per set of r draws at least that
        else:
            assert freq[0] < 1e-3


def test_merge_to_linear_identical_outputs():
    model = Net()
    opt = SST(rank=3, steps_per_iteration=2).setup(model, lr=1e-2)
    train(model, opt, 3)
    x = batch(9)[0]
    for layer in layers(model):
        h = torch.randn(5, layer.in_features)
        torch.testing.assert_close(layer.to_linear()(h), layer(h), atol=1e-6, rtol=1e-5)
    ref = model(x)
    model.mlp[0], model.mlp[2] = model.mlp[0].to_linear(), model.mlp[2].to_linear()
    torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-5)


def _lm_batch(step: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(step))


def test_setup_trains_tiny_llama():
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    opt = ss.optim.setup_(model, "sst", lr=1e-3, rank=8, steps_per_iteration=3)
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups is opt.inner.param_groups
    assert len(layers(model)) == 2 * 7 and not isinstance(model.lm_head, SSTLinear)
    ids = _lm_batch(0)
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)  # schedulers drive the inner AdamW
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(5e-4) and sched.get_last_lr()[0] == pytest.approx(5e-4)


def test_bf16_cpu_forward_backward_and_autocast():
    model = tiny_llama(hidden_size=64, intermediate_size=128).to(torch.bfloat16)
    opt = ss.optim.setup_(model, "sst", lr=1e-3, rank=8, steps_per_iteration=1)
    ids = _lm_batch(0)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for layer in layers(model):
        for p in (layer.U_active, layer.V_active, layer.sigma):
            assert p.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    opt.step()
    assert all(layer.U.dtype == torch.bfloat16 and (layer.sigma >= 0).all() for layer in layers(model))
    model32 = tiny_llama(hidden_size=64, intermediate_size=128)
    sst_(model32, SST(rank=8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model32(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(layer.sigma.grad.dtype == torch.float32 and torch.isfinite(layer.sigma.grad).all()
               for layer in layers(model32))


def test_resume_is_bit_exact():
    def build():
        model = tiny_llama(hidden_size=32, intermediate_size=64, vocab_size=64)
        opt = ss.optim.setup_(model, "sst", lr=1e-2, rank=4, steps_per_iteration=2, iterations_per_round=2)
        return model, opt

    def run(model, opt, start, stop):
        for s in range(start, stop):
            ids = _lm_batch(s, 64)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()

    model, opt = build()
    run(model, opt, 0, 9)  # resamples at 2, 4, 6, 8 and re-SVDs at 4, 8
    ref = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt = build()
    run(model, opt, 0, 5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model, opt = build()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    assert opt.steps == 5 and opt.state is opt.inner.state
    run(model, opt, 5, 9)
    out = model.state_dict()
    assert out.keys() == ref.keys() and all(torch.equal(out[k], ref[k]) for k in ref)


def test_errors_are_clear():
    with pytest.raises(SubspacesError, match="targets"):
        sst_(Net(), SST(rank=2, targets=("nothing",)))
    with pytest.raises(SubspacesError, match=r"mlp\.2"):
        sst_(Net(), SST(rank=13))
    with pytest.raises(SubspacesError, match="sampling"):
        SST(sampling="uniform")
    with pytest.raises(SubspacesError, match="steps_per_iteration"):
        SST(steps_per_iteration=0)
    with pytest.raises(SubspacesError, match="rank"):
        SSTLinear(nn.Linear(4, 6), 5)
