"""Random projector (APOLLO's seeded Gaussian projection as a ``Projected`` projector): determinism from the seed,
unbiasedness E[P Pᵀ] = I, zero stored state, resume, and a tiny-LLaMA run."""
from __future__ import annotations

import io
import math

import pytest
import torch

import subspaces as ss
import subspaces.optim  # noqa: F401
from subspaces.optim.random import RandomProjector


def drawn(proj: RandomProjector, shape, seed: int, refreshes: int = 1) -> torch.Tensor:
    W = torch.zeros(shape)
    state = proj.init_state(W, seed)
    for _ in range(refreshes):
        proj.refresh(state, W)
    return proj.basis(state, W.shape, W)


def test_same_seed_same_matrix_and_each_refresh_draws_a_new_one():
    proj = RandomProjector(rank=4)
    P = drawn(proj, (20, 12), seed=3)
    assert P.shape == (12, 4)
    assert torch.equal(P, drawn(proj, (20, 12), seed=3))
    assert torch.equal(P, drawn(RandomProjector(rank=4), (30, 12), seed=3))  # depends on (seed, draw, s, r) only
    assert not torch.equal(P, drawn(proj, (20, 12), seed=4))
    assert not torch.equal(P, drawn(proj, (20, 12), seed=3, refreshes=2))
    assert drawn(proj, (12, 20), seed=3).shape == (12, 4)  # wide: projected on the left, s = m
    # bf16 is the float32 draw rounded
    W = torch.zeros(20, 12, dtype=torch.bfloat16)
    state = proj.init_state(W, 3)
    proj.refresh(state, W)
    assert torch.equal(proj.basis(state, W.shape, W), P.to(torch.bfloat16))


def test_no_matrix_before_the_first_refresh():
    proj = RandomProjector(rank=4)
    W = torch.zeros(8, 6)
    with pytest.raises(ss.SubspacesError, match="refresh"):
        proj.basis(proj.init_state(W, 0), W.shape, W)


def test_projection_is_unbiased():
    s, r, n = 10, 3, 3000
    proj = RandomProjector(rank=r)
    acc = torch.zeros(s, s, dtype=torch.float64)
    G = torch.randn(15, s, generator=torch.Generator().manual_seed(0))
    back = torch.zeros_like(G, dtype=torch.float64)
    for seed in range(n):
        W = torch.zeros(15, s)
        state = proj.init_state(W, seed)
        proj.refresh(state, W)
        P = proj.basis(state, W.shape, W).double()
        acc += P @ P.T
        back += proj.up(state, proj.down(state, G), G.shape).double()
    mean = acc / n
    # entries of P Pᵀ have variance <= 2/r; the mean of n draws is within ~4 standard errors of I
    assert (mean - torch.eye(s, dtype=torch.float64)).abs().max() < 4 * math.sqrt(2 / r / n)
    rel = (back / n - G.double()).norm() / G.norm()
    assert rel < 0.1, rel
    # one draw is far from the identity (not orthonormal): the test above is not trivially met
    assert (P @ P.T - torch.eye(s, dtype=torch.float64)).abs().max() > 0.3


def test_state_holds_no_matrix():
    r = 4
    w = torch.nn.Parameter(torch.randn(32, 16))
    wide = torch.nn.Parameter(torch.randn(12, 40))
    opt = ss.optim.Projected([w, wide], torch.optim.AdamW, lr=1e-2, projector=RandomProjector(rank=r))
    w.grad, wide.grad = torch.randn(32, 16), torch.randn(12, 40)
    opt.step()
    assert ss.optim.state_bytes(opt) == ss.optim.expected_state_bytes(opt) == 2 * (32 * r + r * 40) * 4
    for _, _, st in opt.projector_states():
        assert set(st) == {"step", "seed", "refreshes"} and all(v.ndim == 0 for v in st.values())


def _data(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 12), generator=g) for _ in range(n)]


def _train(model, opt, data):
    losses = []
    for x in data:
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _build(seed_model=0):
    m = ss.models.tiny_llama(hidden_size=32, intermediate_size=64, seed=seed_model)
    return m, ss.optim.setup_(m, "random", lr=1e-2, rank=4, update_every=2)


def test_resumed_run_is_identical():
    data = _data(6)
    m, opt = _build()
    _train(m, opt, data)
    a, opt_a = _build()
    _train(a, opt_a, data[:3])  # stops mid-period (refreshes at steps 0, 2, 4)
    bufs = []
    for obj in (a.state_dict(), opt_a.state_dict()):
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        bufs.append(torch.load(buf, weights_only=True))
    b, opt_b = _build()
    b.load_state_dict(bufs[0])
    opt_b.load_state_dict(bufs[1])
    _train(b, opt_b, data[3:])
    for (k, p), q in zip(m.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k


def test_the_optimizer_seed_changes_the_draws():
    G = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    out = []
    for seed in (0, 0, 1):
        w = torch.nn.Parameter(torch.zeros(24, 16))
        opt = ss.optim.Projected([w], torch.optim.SGD, lr=1.0, seed=seed, projector=RandomProjector(rank=4))
        w.grad = G.clone()
        opt.step()
        out.append(w.detach().clone())
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])


def test_tiny_llama_loss_decreases():
    model = ss.models.tiny_llama(hidden_size=64, intermediate_size=128)
    opt = ss.optim.setup_(model, "random", lr=1e-2, rank=8)
    assert len(opt.projector_states()) > 0
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = _train(model, opt, [x] * 15)
    assert losses[-1] < 0.8 * losses[0], losses


def test_bf16_cpu_step():
    model = ss.models.tiny_llama(hidden_size=64, intermediate_size=128).to(torch.bfloat16)
    opt = ss.optim.setup_(model, "random", lr=1e-2, rank=8)
    before = [p.detach().clone() for p in model.parameters()]
    losses = _train(model, opt, _data(3))
    assert all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_registered_as_a_complete_baseline():
    from subspaces._registry import TRAIN

    entry = TRAIN.get("random")
    assert entry.obj is RandomProjector and entry.status == "complete"
    assert RandomProjector().update_every == 200
