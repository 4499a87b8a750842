"""GaLore (optim-galore.md): the spec's faithful tests, the SVD options, and parity with galore-torch."""
from __future__ import annotations

import warnings

import pytest
import torch

import subspaces as ss
from subspaces.optim import GaLore, Projected


def params(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def test_first_basis_is_the_eckart_young_subspace():
    (w,) = params((20, 30))  # wide: left projection, Q = U_r
    opt = Projected([w], torch.optim.AdamW, projector=GaLore(rank=5), lr=1e-3)
    grads([w], 1)
    G = w.grad.clone()
    opt.step()
    (_, _, state), = opt.projector_states()
    Q = state["basis"]
    torch.testing.assert_close(Q.T @ Q, torch.eye(5), atol=1e-5, rtol=0)
    s = torch.linalg.svdvals(G)
    residual = (G - Q @ (Q.T @ G)).norm() ** 2
    torch.testing.assert_close(residual, (s[5:] ** 2).sum(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])
def test_side_choice_and_state_size(shape):
    (w,) = params(shape)
    r = 3
    opt = Projected([w], torch.optim.AdamW, projector=GaLore(rank=r), lr=1e-3)
    grads([w], 1)
    opt.step()
    m, n = shape
    moments = opt.inner.state[opt.proxy_of(w)]
    expect = (m, r) if m >= n else (r, n)
    assert moments["exp_avg"].shape == moments["exp_avg_sq"].shape == expect
    (_, _, state), = opt.projector_states()
    assert state["basis"].numel() == r * min(m, n)
    floats = 2 * r * max(m, n) + r * min(m, n)
    assert ss.optim.state_bytes(opt) == ss.optim.expected_state_bytes(opt) == 4 * floats


@pytest.mark.parametrize("shape", [(16, 10), (10, 16)])
def test_full_rank_sgd_is_plain_sgd(shape):
    a, = params(shape)
    b, = params(shape)
    opt_a = Projected([a], torch.optim.SGD, projector=GaLore(rank=min(shape)), lr=0.1)
    opt_b = torch.optim.SGD([b], lr=0.1)
    for step in range(3):
        grads([a], step)
        grads([b], step)
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_schedule_refreshes_at_multiples_of_T_and_keeps_the_moments(monkeypatch):
    (w,) = params((12, 8))
    T = 3
    opt = Projected([w], torch.optim.AdamW, projector=GaLore(rank=2, update_every=T), lr=1e-3)
    calls = []
    real = GaLore.refresh

    def spy(self, state, grad):
        calls.append(int(state["step"]))
        return real(self, state, grad)

    monkeypatch.setattr(GaLore, "refresh", spy)
    for step in range(7):
        grads([w], step)
        if step == T:  # the moments right before the switch step...
            before = {k: v.clone() for k, v in opt.inner.state[opt.proxy_of(w)].items()}
            real_step = opt.inner.step
            seen = {}

            def capture():
                seen.update({k: v.clone() for k, v in opt.inner.state[opt.proxy_of(w)].items()})
                return real_step()

            opt.inner.step = capture
            opt.step()
            opt.inner.step = real_step
            for k in before:  # ...are the moments the inner step starts from after the switch
                assert torch.equal(before[k], seen[k]), k
        else:
            opt.step()
    assert calls == [0, 3, 6]


def test_rotate_and_reset_on_switch():
    for mode in ("rotate", "reset"):
        (w,) = params((12, 8))
        opt = Projected([w], torch.optim.SGD, projector=GaLore(rank=2, update_every=2, on_switch=mode),
                        lr=1e-3, momentum=0.9)
        for step in range(2):
            grads([w], step)
            opt.step()
        proxy = opt.proxy_of(w)
        old_m = opt.inner.state[proxy]["momentum_buffer"].clone()
        old_Q = opt.projector_states()[0][2]["basis"].clone()
        grads([w], 2)
        G = w.grad.clone()
        opt.step()
        new_Q = opt.projector_states()[0][2]["basis"]
        low = G @ new_Q
        expected = (0.9 * old_m @ (old_Q.T @ new_Q) + low) if mode == "rotate" else low
        torch.testing.assert_close(opt.inner.state[proxy]["momentum_buffer"], expected, atol=1e-5, rtol=0)


def test_weight_decay_is_decoupled_and_plain_params_follow_adamw():
    w, b = params((12, 8), (8,))
    w2, b2 = params((12, 8), (8,))
    opt = Projected([{"params": [w]}, {"params": [b], "projector": None}], torch.optim.AdamW,
                    projector=GaLore(rank=2, scale=0.5), lr=0.1, weight_decay=0.3)
    ref = torch.optim.AdamW([b2], lr=0.1, weight_decay=0.3)
    grads([w, b], 0)
    grads([w2, b2], 0)
    opt.step()
    ref.step()
    assert torch.equal(b, b2)
    Q = opt.projector_states()[0][2]["basis"]
    low = w2.grad @ Q
    update = 0.5 * (low / (low.abs() + 1e-8)) @ Q.T  # Adam's first step is sign-like: m̂/(√v̂ + ε)
    torch.testing.assert_close(w, (w2 - 0.1 * update) * (1 - 0.1 * 0.3), atol=1e-5, rtol=0)


def test_rank_per_param_group_and_passthrough():
    w, v, bias = params((16, 16), (16, 16), (16,))
    opt = Projected([{"params": [w], "rank": 2}, {"params": [v, bias]}], projector=GaLore(rank=4), lr=1e-3)
    grads([w, v, bias], 0)
    opt.step()
    shapes = {tuple(opt.proxy_of(p).shape) for p in (w, v)}
    assert shapes == {(16, 2), (16, 4)} and opt.proxy_of(bias) is None


def test_randomized_svd_finds_a_low_rank_gradient_subspace():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(60, 4, generator=g) @ torch.randn(4, 40, generator=g)
    bases = []
    for svd in ("exact", "randomized"):
        (w,) = params((60, 40))
        opt = Projected([w], torch.optim.AdamW, projector=GaLore(rank=4, svd=svd), lr=1e-3)
        w.grad = G.clone()
        opt.step()
        bases.append(opt.projector_states()[0][2]["basis"])
    assert ss.linalg.subspace_overlap(*bases) > 0.999


def test_svd_failure_falls_back(monkeypatch):
    (w,) = params((12, 8))
    opt = Projected([w], torch.optim.AdamW, projector=GaLore(rank=2, update_every=1), lr=1e-3)
    grads([w], 0)
    opt.step()
    basis = opt.projector_states()[0][2]["basis"].clone()
    real, tried = torch.linalg.svd, []

    def flaky(A, *a, **k):
        tried.append(A.dtype)
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real(A, *a, **k)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    grads([w], 1)
    opt.step()  # float32 fails, float64 succeeds
    assert tried == [torch.float32, torch.float64]
    w.grad = torch.full_like(w, float("nan"))
    with pytest.warns(UserWarning, match="keeping the previous basis"):
        opt.step()
    assert not torch.equal(opt.projector_states()[0][2]["basis"], basis)  # the float64 basis of step 1 is kept

    (v,) = params((12, 8))
    fresh = Projected([v], torch.optim.AdamW, projector=GaLore(rank=2), lr=1e-3)
    v.grad = torch.full_like(v, float("nan"))
    with pytest.raises(ss.SubspacesError, match="first step"):
        fresh.step()


def test_bad_configs():
    with pytest.raises(ss.SubspacesError, match="rank"):
        GaLore(rank=0)
    with pytest.raises(ss.SubspacesError, match="svd"):
        GaLore(svd="qr")
    with pytest.raises(ss.SubspacesError, match="on_switch"):
        GaLore(on_switch="drop")
    with pytest.raises(ss.SubspacesError, match="Projector"):
        Projected(params((4, 4)), projector="galore")


def test_bf16():
    (w,) = params((16, 12))
    w.data = w.data.bfloat16()
    opt = Projected([w], torch.optim.AdamW, projector=GaLore(rank=3), lr=1e-2)
    w.grad = torch.randn(16, 12).bfloat16()
    before = w.detach().clone()
    opt.step()
    assert w.dtype == torch.bfloat16 and not torch.equal(w, before)
    assert opt.projector_states()[0][2]["basis"].dtype == torch.bfloat16


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("inner", ["torch", "transformers"])
def test_parity_with_galore_torch(weight_decay, inner):
    """The same gradient stream (tiny LLaMA batches) into galore-torch's GaLoreAdamW and into ours: every projected
    weight agrees to 1e-6 over 20 steps with T = 5 (4 refreshes). galore-torch's Adam (the transformers AdamW) adds
    eps to √v before the bias correction, torch's AdamW after it; with torch's AdamW inside (our default) the test
    uses eps = 0, with galore-torch's own AdamW inside (its plain groups) the paper's eps = 1e-6."""
    galore_torch = pytest.importorskip("galore_torch")
    model = ss.models.tiny_llama(hidden_size=64, intermediate_size=128)
    ref = [mod.weight for name, mod in model.named_modules()
           if isinstance(mod, torch.nn.Linear) and ("attn" in name or "mlp" in name)]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    eps = 0.0 if inner == "torch" else 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt_ref = galore_torch.GaLoreAdamW(
            [{"params": ref, "rank": 8, "update_proj_gap": 5, "scale": 0.25, "proj_type": "std"}],
            lr=1e-2, eps=eps, weight_decay=weight_decay, no_deprecation_warning=True)
    extra = {} if inner == "torch" else {"no_deprecation_warning": True}
    opt = Projected(ours, torch.optim.AdamW if inner == "torch" else galore_torch.GaLoreAdamW,
                    projector=GaLore(rank=8, update_every=5, scale=0.25), lr=1e-2, eps=eps,
                    weight_decay=weight_decay, **extra)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randint(0, 256, (4, 16), generator=g)
        model.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        for p, q in zip(ref, ours):
            q.grad = p.grad.clone()
        opt_ref.step()
        opt.step()
    assert max((p - q).abs().max().item() for p, q in zip(ref, ours)) <= 1e-6
