"""MatryoshkaKV (compress/matryoshka_kv.py): the spec's faithful tests 1–6, plus options and the rate curve."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import subspaces as ss
from subspaces._errors import SubspacesError
from subspaces._registry import COMPRESS
from subspaces.compress import MatryoshkaKV, kv_rate_curve
from subspaces.compress._kv_attention import KVProjection, attach, attention_modules, cayley, disabled, \
    inverse_cayley, pca_basis, states
from subspaces.compress._kv_eval import kl, logits
from subspaces.compress.matryoshka_kv import calibrate_, rank_grid, train_

D = 16  # head_dim of the tiny model: hidden 64 / 4 heads, 2 KV heads (GQA groups of 2)


def tiny(**kw):
    return ss.models.tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                num_key_value_heads=2, **kw).eval()


def batches(n=3, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, length), generator=g) for _ in range(n)]


def randomize(model, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in states(model):
            for p in (s.xk, s.xv, s.mu_k, s.mu_v):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_registered_with_paper():
    entry = COMPRESS.get("matryoshka_kv")
    assert entry.obj is MatryoshkaKV and "2410.14731" in entry.paper


@pytest.mark.parametrize("bad", [dict(budget=0.0), dict(budget=1.5), dict(step=0), dict(train_steps=-1),
                                 dict(search="beam"), dict(score="mse"), dict(per_round=0.0), dict(lr=0.0)])
def test_config_validation(bad):
    with pytest.raises(SubspacesError, match=next(iter(bad))):
        MatryoshkaKV(**bad)


# 1. exactness at full rank
def test_full_rank_is_exact_for_any_rotation_and_means():
    base = tiny()
    x = batches(1)[0]
    ref = logits(base, {"input_ids": x})
    model = copy.deepcopy(base)
    attach(attention_modules(model))
    randomize(model)  # U far from I, large means
    assert all(int(s.r_k.min()) == D == int(s.r_v.min()) for s in states(model))
    torch.testing.assert_close(logits(model, {"input_ids": x}), ref, atol=1e-4, rtol=1e-4)
    with disabled(model):  # the switch gives back the plain model bit for bit
        assert torch.equal(logits(model, {"input_ids": x}), ref)


# 2. Cayley map
def test_cayley_orthogonal_det_one_and_inverse_of_pca_basis():
    X = torch.randn(5, D, D, dtype=torch.float64) * 3
    U = cayley(X)
    eye = torch.eye(D, dtype=torch.float64)
    torch.testing.assert_close(U.transpose(-1, -2) @ U, eye.expand_as(U), atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.linalg.det(U), torch.ones(5, dtype=torch.float64))
    A = torch.randn(4, 200, D, dtype=torch.float64) * torch.linspace(3, 0.1, D, dtype=torch.float64)
    cov = A.transpose(-1, -2) @ A / 200
    V, lam = pca_basis(cov)
    assert (lam[:, :-1] >= lam[:, 1:]).all()
    torch.testing.assert_close(torch.linalg.det(V), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(cov @ V, V * lam.unsqueeze(-2), atol=1e-9, rtol=0)  # columns are eigenvectors
    Xi = inverse_cayley(V)
    torch.testing.assert_close(Xi, -Xi.transpose(-1, -2))  # skew
    torch.testing.assert_close(cayley(Xi), V, atol=1e-9, rtol=0)


# 3. mean handling
def test_key_mean_leaves_scores_unchanged_at_full_rank():
    model = tiny(attn_implementation="eager")
    attach(attention_modules(model))
    randomize(model)
    x = batches(1)[0]
    with torch.no_grad():
        a = model(x, output_attentions=True).attentions
        for s in states(model):
            s.mu_k.zero_()
        b = model(x, output_attentions=True).attentions
    for wa, wb in zip(a, b):
        torch.testing.assert_close(wa, wb, atol=1e-5, rtol=0)


def test_truncated_attention_matches_the_formula_and_value_mean_is_added_back():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny()
    attn = model.model.layers[0].self_attn
    attach({"a": attn})
    randomize(model, scale=0.5)
    s = attn.matryoshka_kv
    s.r_k.copy_(torch.tensor([3, 10]))
    s.r_v.copy_(torch.tensor([7, 2]))
    seen = {}
    attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    attn.o_proj.register_forward_pre_hook(lambda m, a: seen.update(o=a[0]))
    x = batches(1)[0]
    with torch.no_grad():
        model(x, use_cache=False)
        h, (cos, sin) = seen["hidden_states"], seen["position_embeddings"]
        B, T, _ = h.shape
        q = attn.q_proj(h).view(B, T, 4, D).transpose(1, 2)
        k = attn.k_proj(h).view(B, T, 2, D).transpose(1, 2)
        v = attn.v_proj(h).view(B, T, 2, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        outs = []
        for j in range(4):
            g = j // 2  # GQA: query head j reads KV head j // 2
            PK = cayley(s.xk[g])[:, : int(s.r_k[g])]
            PV = cayley(s.xv[g])[:, : int(s.r_v[g])]
            scores = (q[:, j] @ PK) @ ((k[:, g] - s.mu_k[g]) @ PK).transpose(-1, -2) / math.sqrt(D)
            p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            outs.append(p @ ((v[:, g] - s.mu_v[g]) @ PV) @ PV.T + s.mu_v[g])
        torch.testing.assert_close(seen["o"], torch.stack(outs, 2).reshape(B, T, -1), atol=1e-5, rtol=1e-4)
        # a zero attention output in value coordinates maps to exactly μ_V (rows of softmax sum to 1)
        torch.testing.assert_close(s.output(torch.zeros(1, 1, 4, 7)), s.mu_v.repeat_interleave(2, 0)[None, None])


# 4. nested prefixes of the PCA init
def test_pca_reconstruction_error_is_the_sum_of_dropped_eigenvalues(monkeypatch):
    model = tiny()
    seen = []
    observe = KVProjection.observe

    def spy(self, k, v):
        seen.append((self, k.detach().double(), v.detach().double()))
        observe(self, k, v)

    monkeypatch.setattr(KVProjection, "observe", spy)
    found = calibrate_(model, attention_modules(model), batches())
    for s in found:
        for name, X, mu, idx in (("k", s.xk, s.mu_k, 1), ("v", s.xv, s.mu_v, 2)):
            data = torch.cat([t[idx] for t in seen if t[0] is s], 2)  # (B, H, N, d)
            lam = s.stats[f"lam_{name}"]
            for h in range(s.heads):
                xs = data[:, h].reshape(-1, D)
                torch.testing.assert_close(mu[h].double(), xs.mean(0), atol=1e-6, rtol=1e-6)
                c = xs - mu[h].double()
                U = cayley(X[h].detach().double())
                errs = [float(((c - c @ U[:, :r] @ U[:, :r].T) ** 2).sum(1).mean()) for r in range(D + 1)]
                assert all(a >= b - 1e-9 for a, b in zip(errs, errs[1:]))  # monotone in r
                tails = [float(lam[h, r:].sum()) for r in range(D + 1)]
                assert max(abs(e - t) for e, t in zip(errs, tails)) <= 1e-5 * tails[0]


# 5. sampling during training; the base model gets no gradient
def test_training_samples_ranks_per_head_and_leaves_the_base_untouched():
    model = tiny()
    data = batches()
    calibrate_(model, attention_modules(model), data)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "matryoshka_kv" not in n}
    proj = {n: p.detach().clone() for n, p in model.named_parameters() if "matryoshka_kv" in n}
    drawn = []
    model.register_forward_pre_hook(
        lambda m, a: drawn.append(torch.cat([torch.cat([s.r_k, s.r_v]) for s in states(m)]))
        if states(m)[0].enabled else None)
    losses = train_(model, data, MatryoshkaKV(train_steps=12, lr=1e-2))
    assert len(losses) == len(drawn) == 12 and all(math.isfinite(x) for x in losses)
    ranks = torch.stack(drawn)  # (steps, layers · (K heads + V heads))
    grid = torch.tensor(rank_grid(D, None))
    assert rank_grid(D, None) == [2, 4, 6, 8, 10, 12, 14, 16]  # 8 options, step d_h/8 as in the paper
    assert torch.isin(ranks, grid).all()
    assert all(len(set(col.tolist())) > 1 for col in ranks.T)  # every unit varies over steps
    assert all(len(set(row.tolist())) > 1 for row in ranks)  # units drawn independently within a step
    for n, p in model.named_parameters():
        if n in base:
            assert p.grad is None and torch.equal(p, base[n]) and p.requires_grad
    assert all(not torch.equal(p, proj[n]) for n, p in model.named_parameters() if n in proj)
    assert all(int(s.r_k.min()) == D for s in states(model))  # full rank again after training


def test_training_reduces_the_distillation_loss_at_a_truncated_rank():
    model = tiny()
    data = batches()
    calibrate_(model, attention_modules(model), data)
    x = {"input_ids": data[0]}

    def kl_at_quarter() -> float:
        for s in states(model):
            s.r_k.fill_(4)
            s.r_v.fill_(4)
        with torch.no_grad():
            with disabled(model):
                t = logits(model, x)
            out = float(kl(t, logits(model, x), None))
        for s in states(model):
            s.r_k.fill_(D)
            s.r_v.fill_(D)
        return out

    before = kl_at_quarter()
    train_(model, data, MatryoshkaKV(train_steps=40, lr=1e-2, kl_weight=1.0, ce_weight=0.0))
    assert kl_at_quarter() < 0.8 * before


# 6. cache size after the search
@pytest.mark.parametrize("search", ["greedy", "uniform"])
def test_cache_stores_truncated_coordinates_and_matches_the_budget(search):
    base = tiny()
    model = copy.deepcopy(base)
    report = ss.compress.compress_(model, "matryoshka_kv", ratio=0.625, calibration=batches(), search=search)
    assert report["kept"] == pytest.approx(0.375) and report["ratio"] == pytest.approx(0.625)
    assert report["cache_bytes_per_token_baseline"] == 2 * 2 * 2 * D * 4  # layers · K,V · heads · d_h · fp32
    x = batches(1, length=10, seed=5)[0]
    with torch.no_grad():
        out = model(x, use_cache=True)
    stored = 0
    for layer, row in zip(out.past_key_values.layers, report["layers"]):
        assert layer.keys.shape == (2, 1, 10, sum(row["r_k"]))
        assert layer.values.shape == (2, 1, 10, sum(row["r_v"]))
        stored += layer.keys.nbytes + layer.values.nbytes
    assert stored == report["cache_bytes_per_token"] * 2 * 10
    assert stored == pytest.approx(0.375 * report["cache_bytes_per_token_baseline"] * 2 * 10)
    with torch.no_grad():  # decoding from the compressed cache = recomputing the whole sequence compressed
        first = model(x[:, :6], use_cache=True)
        rest = model(x[:, 6:], past_key_values=first.past_key_values)
        full = model(x, use_cache=False).logits
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-5, rtol=1e-5)
    assert model.generate(x, max_new_tokens=3, do_sample=False).shape == (2, 13)


def test_greedy_search_beats_uniform_on_its_objective():
    base, data = tiny(), batches()
    kls = {}
    for search in ("greedy", "uniform"):
        model = copy.deepcopy(base)
        ss.compress.compress_(model, "matryoshka_kv", ratio=0.5, calibration=data, search=search, per_round=0.1)
        with torch.no_grad():
            with disabled(model):
                t = logits(model, {"input_ids": data[0]})
            kls[search] = float(kl(t, logits(model, {"input_ids": data[0]}), None))
    assert kls["greedy"] < kls["uniform"]


def test_rank_energy_targets_and_budget_errors():
    data = batches(2)
    m = tiny()
    r = ss.compress.compress_(m, "matryoshka_kv", rank=5, calibration=data)
    assert all(row["r_k"] == [5, 5] == row["r_v"] for row in r["layers"])
    r = ss.compress.compress_(tiny(), "matryoshka_kv", energy=1.0, calibration=data)
    assert r["kept"] > 0.9
    r = ss.compress.compress_(tiny(), "matryoshka_kv", energy=0.5, calibration=data)
    assert all(x in rank_grid(D, None) for row in r["layers"] for x in row["r_k"] + row["r_v"])
    m = tiny()
    r = ss.compress.compress_(m, "matryoshka_kv", ratio=0.5, calibration=data, search="uniform",
                              targets=["layers.0.self_attn"])
    assert [row["name"] for row in r["layers"]] == ["model.layers.0.self_attn"] and len(states(m)) == 1
    with pytest.raises(SubspacesError, match="budget"):
        ss.compress.compress_(tiny(), "matryoshka_kv", ratio=0.95, calibration=data, search="uniform")
    with pytest.raises(SubspacesError, match="calibration"):
        ss.compress.compress_(tiny(), "matryoshka_kv", ratio=0.5)


def test_bf16_model_on_cpu():
    model = tiny().to(torch.bfloat16)
    r = ss.compress.compress_(model, "matryoshka_kv", ratio=0.5, calibration=batches(2), search="uniform",
                              train_steps=2)
    assert r["cache_bytes_per_token_baseline"] == 2 * 2 * 2 * D * 2 and math.isfinite(r["attention_error"])
    with torch.no_grad():
        out = model(batches(1)[0], use_cache=True)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert out.past_key_values.layers[0].keys.dtype == torch.bfloat16


def test_kv_rate_curve():
    model, data = tiny(), batches(2)
    rows = kv_rate_curve(model, data, [0.0, 0.25, 0.5, 0.75])
    assert [r["kept"] for r in rows] == [1.0, 0.75, 0.5, 0.25]
    assert rows[0]["attention_error"] < 1e-5 and rows[0]["perplexity"] == pytest.approx(rows[0]["perplexity_base"])
    errs = [r["attention_error"] for r in rows]
    assert errs == sorted(errs) and errs[-1] > 0.1
    assert all(int(s.r_k.min()) == D for s in states(model))  # ranks restored
