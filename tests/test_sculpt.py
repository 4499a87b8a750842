"""Sculpting Subspaces (arXiv 2504.07097): the faithful tests of the spec, resume and bf16."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import bert_seqcls, ids, llama_causal
from torch import nn

import subspaces as ss
from subspaces.optim import Projected, expected_state_bytes, setup_, state_bytes
from subspaces.optim.sculpt import Sculpt, layer_retention, next_task_, retention_from_importance

SHAPES = {"square": (12, 12), "tall": (16, 8), "wide": (8, 16)}


def state_for(shape, retention=0.5, dtype=torch.float64, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g, dtype=dtype)
    proj = Sculpt(retention=retention, **kw)
    return proj, proj.init_state(W, seed), W, torch.randn(shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("projection", ["block", "left", "right", "two_sided"])
def test_projection_idempotent_and_annihilates_protected_part(shape, projection):
    proj, st, W, G = state_for(shape, projection=projection)
    U, V = st["U"], st["V"]
    k = min(shape) // 2
    assert U.shape == (shape[0], k) and V.shape == (shape[1], k)
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=U.dtype))
    P = proj.down(st, G)
    torch.testing.assert_close(proj.down(st, P), P)  # idempotent
    zero = lambda X: torch.testing.assert_close(X, torch.zeros_like(X), atol=1e-12, rtol=0)  # noqa: E731
    if projection == "block":
        zero(U.T @ P @ V)
        assert (U.T @ P).abs().max() > 1e-3 and (P @ V).abs().max() > 1e-3  # only the block is removed
    if projection in ("left", "two_sided"):
        zero(U.T @ P)
    if projection in ("right", "two_sided"):
        zero(P @ V)
    # the complement is untouched: G − P lies in the protected block / side
    Pu, Pv = U @ U.T, V @ V.T
    Iu, Iv = torch.eye(shape[0], dtype=G.dtype), torch.eye(shape[1], dtype=G.dtype)
    expected = {"block": Pu @ G @ Pv, "left": Pu @ G, "right": G @ Pv, "two_sided": G - (Iu - Pu) @ G @ (Iv - Pv)}
    torch.testing.assert_close(G - P, expected[projection])


def test_protected_directions_are_the_top_singular_vectors():
    proj, st, W, _ = state_for((10, 6), retention=0.5)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close((st["U"].T @ U[:, :3]).abs(), torch.eye(3, dtype=W.dtype))
    torch.testing.assert_close((st["V"].T @ Vh[:3].T).abs(), torch.eye(3, dtype=W.dtype))


@pytest.mark.parametrize("retention, min_d, k",
                         [(0.5, 12, 6), (0.29, 100, 29), (0.8, 384, 307), (1.0, 7, 7), (0.0, 9, 0)])
def test_k_is_floor_of_retention_times_min_dim(retention, min_d, k):
    assert Sculpt(retention=retention).protected(torch.Size((min_d + 3, min_d))) == k


def test_retention_zero_is_plain_fine_tuning():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4))
    b = copy.deepcopy(a)
    opt_a = Projected(a.parameters(), torch.optim.AdamW, projector=Sculpt(retention=0.0), lr=1e-2, weight_decay=0.0)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.0)
    assert len(opt_a.projector_states()) == 2
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    for _ in range(5):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            (m(x) - y).pow(2).mean().backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(SHAPES))
def test_full_retention_leaves_only_the_null_space(name):
    proj, st, W, G = state_for(SHAPES[name], retention=1.0)
    P = proj.down(st, G)
    U, V = st["U"], st["V"]
    if name == "square":
        torch.testing.assert_close(P, torch.zeros_like(P), atol=1e-12, rtol=0)
    elif name == "tall":  # V spans R^n: the left null space of W stays trainable
        torch.testing.assert_close(P, G - U @ (U.T @ G))
        assert P.norm() > 0.1 * G.norm()
    else:  # wide: U spans R^m, the right null space stays trainable
        torch.testing.assert_close(P, G - (G @ V) @ V.T)
        assert P.norm() > 0.1 * G.norm()


def _train(shape, inner, project_update, steps=6, **inner_kw):
    torch.manual_seed(1)
    W = nn.Parameter(torch.randn(shape, dtype=torch.float64))
    W0 = W.detach().clone()
    opt = Projected([W], inner, projector=Sculpt(retention=0.5, project_update=project_update), **inner_kw)
    (_, _, st), = opt.projector_states()
    X, Y = torch.randn(32, shape[1], dtype=torch.float64), torch.randn(32, shape[0], dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        (X @ W.T - Y).pow(2).mean().backward()
        opt.step()
    drift = st["U"].T @ (W.detach() - W0) @ st["V"]
    return drift.abs().max().item(), (W.detach() - W0).abs().max().item()


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("project_update", [False, True])
def test_sgd_never_moves_the_protected_block(shape, project_update):
    drift, moved = _train(shape, torch.optim.SGD, project_update, lr=0.05, momentum=0.9)
    assert moved > 1e-3 and drift < 1e-12


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_adam_moves_the_protected_block_unless_the_update_is_projected(shape):
    drift, moved = _train(shape, torch.optim.Adam, False, lr=1e-2)
    assert drift > 1e-4 * moved  # m/(√v+ε) of a projected gradient leaves the allowed subspace
    drift, moved = _train(shape, torch.optim.Adam, True, lr=1e-2)
    assert moved > 1e-3 and drift < 1e-12


def test_retention_rule_bounds_and_monotone():
    imp = [0.3, 0.9, 0.5, 0.95, 0.1]
    r = retention_from_importance(imp, mrr=0.1, trr=0.8)
    assert min(r) == pytest.approx(0.1) and max(r) == pytest.approx(0.8)
    order = sorted(range(len(imp)), key=imp.__getitem__)
    assert all(r[a] < r[b] for a, b in zip(order, order[1:]))
    assert retention_from_importance([0.4, 0.4]) == pytest.approx([0.45, 0.45])
    with pytest.raises(ss.SubspacesError, match="mrr"):
        retention_from_importance(imp, mrr=0.9, trr=0.2)


@pytest.mark.parametrize("build", [bert_seqcls, llama_causal])
def test_layer_retention_on_a_transformer(build):
    model = build()
    x = ids(batch=3, length=9)
    mask = torch.ones_like(x)
    mask[0, 5:] = 0
    r = layer_retention(model, [{"input_ids": x, "attention_mask": mask}], mrr=0.2, trr=0.7)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and (".layer." in n or ".layers." in n)]
    assert sorted(r) == sorted(f"{n}.weight" for n in linears)
    assert all(0.2 - 1e-9 <= v <= 0.7 + 1e-9 for v in r.values())
    assert {round(v, 9) for v in r.values()} == {0.2, 0.7}  # 2 blocks: min -> mrr, max -> trr
    # every matrix of a block shares the block's ratio
    assert r[f"{linears[0]}.weight"] == r[f"{linears[1]}.weight"]
    assert model.training is False


def test_setup_with_per_parameter_retention_and_next_task():
    model = llama_causal()
    x = ids()
    r = layer_retention(model, [{"input_ids": x}])
    opt = setup_(model, Sculpt(retention=r), lr=1e-3)
    states = opt.projector_states()
    named = dict(model.named_parameters())
    assert len(states) == len(r)
    for p, proj, st in states:
        name = next(n for n, q in named.items() if q is p)
        assert st["U"].shape[1] == int(r[name] * min(p.shape) + 1e-9)
    assert state_bytes(opt) == sum(st["U"].numel() + st["V"].numel() for _, _, st in states) * 4
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert state_bytes(opt) == expected_state_bytes(opt)
    p0, _, st0 = states[0]
    next_task_(opt, 0.25)
    assert not opt.inner.state
    U, _, Vh = torch.linalg.svd(p0.detach(), full_matrices=False)
    k = int(0.25 * min(p0.shape))
    assert st0["U"].shape[1] == k
    torch.testing.assert_close((st0["U"].T @ U[:, :k]).abs(), torch.eye(k), atol=1e-4, rtol=0)
    name0 = next(n for n, q in named.items() if q is p0)
    next_task_(opt, {name0: 0.5})  # names recorded by setup; the other parameters keep r = 0.25
    for p, _, st in opt.projector_states():
        assert st["U"].shape[1] == int((0.5 if p is p0 else 0.25) * min(p.shape))


def test_setup_default_targets_bert_blocks_not_head():
    model = bert_seqcls()
    opt = Sculpt(retention=0.5).setup(model, lr=1e-3)
    projected = {id(p) for p, _, _ in opt.projector_states()}
    names = [n for n, p in model.named_parameters() if id(p) in projected]
    assert len(names) == 12 and all(".layer." in n for n in names)  # q, k, v, o, intermediate, output x 2


def test_config_validation():
    for bad in ({"retention": 1.5}, {"retention": -0.1}, {"projection": "diag"}, {"retention": {"a": 2.0}}):
        with pytest.raises(ss.SubspacesError):
            Sculpt(**bad)
    with pytest.raises(ss.SubspacesError, match="not 2-D parameters"):
        Sculpt(retention={"nope.weight": 0.3}).setup(llama_causal(), lr=1e-3)
    assert hash(Sculpt(retention={"a": 0.2})) == hash(Sculpt(retention={"a": 0.2}))


def _run(steps_before, steps_after, tmp_path=None):
    torch.manual_seed(0)
    model = llama_causal()
    opt = Sculpt(retention=0.4).setup(model, lr=1e-2, weight_decay=0.01)
    x = ids(seed=3)

    def step():
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(steps_before):
        step()
    if tmp_path is not None:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        torch.manual_seed(123)
        model = llama_causal(seed=5)
        model.load_state_dict(ckpt["model"])
        opt = Sculpt(retention=0.4).setup(model, lr=1e-2, weight_decay=0.01)  # bases from the *trained* W ...
        opt.load_state_dict(ckpt["opt"])  # ... replaced by the saved ones
    for _ in range(steps_after):
        step()
    return model.state_dict()


def test_resume_is_bit_exact(tmp_path):
    straight = _run(5, 0)
    resumed = _run(2, 3, tmp_path)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_bf16_cpu_step():
    model = llama_causal().to(torch.bfloat16)
    opt = Sculpt(retention=0.5).setup(model, lr=1e-2)
    p, _, st = opt.projector_states()[0]
    assert st["U"].dtype == torch.bfloat16 and opt.proxy_of(p).dtype == torch.bfloat16
    W0 = p.detach().clone()
    x = ids()
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(p).all() and not torch.equal(p, W0)
    U, V = st["U"].float(), st["V"].float()
    delta = p.detach().float() - W0.float()
    # the constraint holds up to bf16 rounding of W (no exactness in bf16)
    assert (U.T @ delta @ V).abs().max() < 0.1 * (U.T @ delta).abs().max()


def test_registered_partial():
    entry = ss.optim.config_for("sculpt", retention=0.3)
    assert isinstance(entry, Sculpt) and entry.retention == 0.3
    from subspaces._registry import TRAIN

    assert TRAIN.get("sculpt").status == "partial" and "factor form" in TRAIN.get("sculpt").note
    assert dataclasses.replace(Sculpt(), retention=0.1).low_rank is False
