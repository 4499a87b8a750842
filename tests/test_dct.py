"""DCT projector (SVD-free low-rank Adam, arXiv 2505.17967): the spec's faithful tests 1-6 and a tiny-LLaMA run."""
from __future__ import annotations

import math

import pytest
import torch

import subspaces as ss
import subspaces.optim  # noqa: F401
from subspaces.optim.dct import DCT, _dct_matrix, dct_matrix


def grad(m: int, n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class FullDCT(DCT):
    """Projects every 2-D parameter, rank = s included (``Projected`` skips min(shape) <= rank otherwise)."""

    def applies_to(self, shape):
        return len(shape) == 2


# ---------------------------------------------------------------- 1. basis
def test_basis_is_the_orthonormal_dct2_matrix_built_once_and_shared():
    s = 12
    Q = dct_matrix(s, torch.float64, "cpu")
    k, j = torch.meshgrid(torch.arange(s, dtype=torch.float64), torch.arange(s, dtype=torch.float64), indexing="ij")
    ref = math.sqrt(2 / s) * torch.cos(math.pi * k * (2 * j + 1) / (2 * s))
    ref[0] /= math.sqrt(2)
    torch.testing.assert_close(Q, ref)
    torch.testing.assert_close(Q.T @ Q, torch.eye(s, dtype=torch.float64))
    Q32 = dct_matrix(s, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(Q32.T @ Q32, torch.eye(s), atol=1e-6, rtol=0)
    assert dct_matrix(s, torch.float32, "cpu") is Q32

    # two layers with the same s (right side: n = 16) share one Q: one build, reused
    a, b = torch.nn.Parameter(grad(24, 16, 1)), torch.nn.Parameter(grad(40, 16, 2))
    opt = ss.optim.Projected([a, b], torch.optim.AdamW, lr=1e-2, projector=DCT(rank=4))
    _dct_matrix.cache_clear()
    a.grad, b.grad = grad(24, 16, 3), grad(40, 16, 4)
    opt.step()
    opt.step()
    info = _dct_matrix.cache_info()
    assert info.currsize == 1 and info.misses == 1 and info.hits >= 4
    for _, _, st in opt.projector_states():
        assert set(st) == {"step", "seed", "index"}  # no float projector in the state


# ---------------------------------------------------------------- 2. full-rank exactness
@pytest.mark.parametrize("shape", [(20, 8), (8, 20)])
def test_full_rank_projection_is_the_identity(shape):
    s = min(shape)
    proj = DCT(rank=s)
    G = grad(*shape)
    state = proj.init_state(G, 0)
    proj.refresh(state, G)
    assert torch.equal(state["index"], torch.arange(s, dtype=torch.int32))
    torch.testing.assert_close(proj.up(state, proj.down(state, G), G.shape), G, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_full_rank_dct_sgd_equals_sgd(momentum):
    torch.manual_seed(0)
    W0 = torch.randn(16, 10)
    w1, w2 = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    opt1 = ss.optim.Projected([w1], torch.optim.SGD, lr=0.1, momentum=momentum, projector=FullDCT(rank=10))
    opt2 = torch.optim.SGD([w2], lr=0.1, momentum=momentum)
    for t in range(5):
        G = grad(16, 10, seed=t)
        w1.grad, w2.grad = G.clone(), G.clone()
        opt1.step()
        opt2.step()
    assert opt1.proxy_of(w1) is not None
    torch.testing.assert_close(w1.detach(), w2.detach(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- 3. selection
@pytest.mark.parametrize("shape", [(30, 12), (12, 30)])
@pytest.mark.parametrize("norm", [1.0, 2.0])
def test_selection_is_the_top_r_column_norms(shape, norm):
    r = 5
    proj = DCT(rank=r, norm=norm)
    # a gradient concentrated on a few DCT directions, plus noise, so that the top-r is well separated
    G = grad(*shape, seed=7)
    s = min(shape)
    Q = dct_matrix(s, torch.float32, "cpu")
    right = shape[0] >= shape[1]
    S = G @ Q if right else Q.T @ G
    scores = S.norm(p=norm, dim=0 if right else 1)
    state = proj.init_state(G, 0)
    proj.refresh(state, G)
    expect = torch.topk(scores, r).indices.sort().values
    assert torch.equal(state["index"].long(), expect)
    assert state["index"].dtype == torch.int32
    low = proj.down(state, G)
    from_scratch = G @ Q[:, expect] if right else Q[:, expect].T @ G
    torch.testing.assert_close(low, from_scratch)


def test_theoretical_similarity_weights_scores_by_column_norms():
    G = grad(30, 12, seed=3)
    Q = dct_matrix(12, torch.float32, "cpu")
    scores = (G @ Q).norm(p=1, dim=0) * Q.norm(p=1, dim=0)
    proj = DCT(rank=4, theoretical_similarity=True)
    state = proj.init_state(G, 0)
    proj.refresh(state, G)
    assert torch.equal(state["index"].long(), torch.topk(scores, 4).indices.sort().values)


def test_refresh_schedule_matches_the_code():
    # code: t = 1, 2, ...; refresh at t == 1 or t % T == 0.  Ours: step = t - 1.
    proj = DCT(rank=2, update_every=4)
    assert [s for s in range(13) if proj.due(s)] == [0, 3, 7, 11]
    assert all(DCT(rank=2).due(s) for s in range(5))  # T = 1 by default


# ---------------------------------------------------------------- 4. memory
def test_state_is_two_proxy_moments_plus_r_int32():
    r = 4
    w = torch.nn.Parameter(torch.randn(32, 16))
    wide = torch.nn.Parameter(torch.randn(12, 40))
    opt = ss.optim.Projected([w, wide], torch.optim.AdamW, lr=1e-2, projector=DCT(rank=r))
    w.grad, wide.grad = grad(32, 16), grad(12, 40)
    opt.step()
    expected = 2 * (32 * r + r * 40) * 4 + 2 * r * 4
    assert ss.optim.state_bytes(opt) == ss.optim.expected_state_bytes(opt) == expected
    for _, _, st in opt.projector_states():
        assert {k: (v.dtype, tuple(v.shape)) for k, v in st.items() if v.ndim} == {"index": (torch.int32, (r,))}


# ---------------------------------------------------------------- 5. rotation is a gather
class Recorder(torch.optim.Optimizer):
    """An inner optimizer that records its state as ``step`` sees it (after ``Projected``'s switch), then sets
    the moments to known values: exp_avg = grad, exp_avg_sq = grad² + 1."""

    def __init__(self, params, lr=0.0):
        super().__init__(params, {"lr": lr})
        self.seen: list[dict] = []

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state[p]
                self.seen.append({k: v.clone() for k, v in st.items()})
                st["exp_avg"], st["exp_avg_sq"] = p.grad.clone(), p.grad.square() + 1


@pytest.mark.parametrize("shape", [(40, 16), (16, 40)])
def test_rotation_carries_kept_columns_and_zeroes_new_ones(shape):
    torch.manual_seed(0)
    r, s = 6, 16
    Q = dct_matrix(s, torch.float32, "cpu")
    right = shape[0] >= shape[1]
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = ss.optim.Projected([w], Recorder, projector=DCT(rank=r, on_switch="rotate"))

    def aligned(cols):  # a gradient whose energy sits on the given DCT columns
        C = torch.randn(shape[0] if right else shape[1], len(cols)) * 10
        return C @ Q[:, cols].T if right else Q[:, cols] @ C.T

    first, second = [0, 2, 5, 7, 9, 11], [2, 3, 7, 8, 11, 14]  # kept: 2, 7, 11
    w.grad = aligned(first)
    opt.step()
    (_, _, st), = opt.projector_states()
    assert st["index"].tolist() == first
    old = opt.inner.state[opt.proxy_of(w)]
    old_m, old_v = old["exp_avg"].clone(), old["exp_avg_sq"].clone()
    w.grad = aligned(second)
    opt.step()
    assert st["index"].tolist() == second
    rotated = opt.inner.seen[-1]
    for key, before in (("exp_avg", old_m), ("exp_avg_sq", old_v)):
        after = rotated[key] if right else rotated[key].T
        before = before if right else before.T
        for b, j in enumerate(second):  # exact: the rotation is a 0/1 gather, not a rounding matmul
            if j in first:
                assert torch.equal(after[:, b], before[:, first.index(j)]), (key, j)
            else:
                assert torch.equal(after[:, b], torch.zeros_like(after[:, b])), (key, j)
        if key == "exp_avg_sq":
            assert (after >= 0).all()


# ---------------------------------------------------------------- 6. unprojected parameters follow AdamW exactly
def test_non_2d_and_oversized_parameters_follow_exact_adamw():
    torch.manual_seed(0)
    shapes = {"bias": (16,), "big": (8, 64), "conv": (4, 3, 3, 3), "small": (16, 8)}
    init = {k: torch.randn(v) for k, v in shapes.items()}
    ps = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in init.items() if k != "small"}
    proj = DCT(rank=4, max_shape=64)
    assert not proj.applies_to(torch.Size(shapes["big"])) and proj.applies_to(torch.Size(shapes["small"]))
    opt = ss.optim.Projected(list(ps.values()), torch.optim.AdamW, lr=1e-2, weight_decay=0.1, projector=proj)
    ref_opt = torch.optim.AdamW(list(ref.values()), lr=1e-2, weight_decay=0.1)
    assert [p for p, _, _ in opt.projector_states()] == [ps["small"]]
    for t in range(4):
        g = torch.Generator().manual_seed(t)
        for k in shapes:
            G = torch.randn(shapes[k], generator=g)
            ps[k].grad = G.clone()
            if k in ref:
                ref[k].grad = G.clone()
        opt.step()
        ref_opt.step()
    for k in ref:
        assert torch.equal(ps[k], ref[k]), k
    assert not torch.equal(ps["small"], init["small"])


# ---------------------------------------------------------------- end to end
def _run(model, opt, steps=15):
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_llama_loss_decreases():
    model = ss.models.tiny_llama(hidden_size=64, intermediate_size=128)
    opt = ss.optim.setup_(model, "dct", lr=1e-2, rank=8)
    assert isinstance(opt.projector_states()[0][1], DCT) and len(opt.projector_states()) > 0
    losses = _run(model, opt)
    assert losses[-1] < 0.8 * losses[0], losses


def test_bf16_cpu_step():
    model = ss.models.tiny_llama(hidden_size=64, intermediate_size=128).to(torch.bfloat16)
    opt = ss.optim.setup_(model, "dct", lr=1e-2, rank=8)
    before = [p.detach().clone() for p in model.parameters()]
    losses = _run(model, opt, steps=3)
    assert all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for _, _, st in opt.projector_states():
        assert st["index"].dtype == torch.int32


def test_bad_hyperparameters_name_the_field():
    for kw, field in [({"norm": 0}, "norm"), ({"max_shape": 0}, "max_shape"),
                      ({"theoretical_similarity": 1}, "theoretical_similarity"), ({"rank": 0}, "rank")]:
        with pytest.raises(ss.SubspacesError, match=field):
            DCT(**kw)
