"""Scatterbrain (compress/scatterbrain.py): the spec's faithful tests 1-6, then the Hugging Face drop-in."""
from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from conftest import bert_seqcls, ids, llama_causal
from torch.utils._python_dispatch import TorchDispatchMode

from subspaces._errors import SubspacesError
from subspaces.compress import compress_
from subspaces.compress import scatterbrain as sb
from subspaces.compress._performer import orthogonal_gaussian
from subspaces.compress.scatterbrain import Scatterbrain, attention_error, scatterbrain_, scatterbrain_attention

F64 = torch.float64


def qkv(b=2, h=2, n=40, d=8, dv=None, scale=1.0, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, n, d, generator=g, dtype=dtype) * scale for _ in range(2))
    return q, k, torch.randn(b, h, n, dv or d, generator=g, dtype=dtype)


def padding(b=2, n=40):
    m = torch.ones(b, n, dtype=torch.bool)
    m[0, :3] = False  # left padding
    m[-1, -5:] = False  # right padding
    return m


def exact(q, k, v, causal=False, mask=None):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    nq, nk = q.shape[-2], k.shape[-2]
    if causal:
        s = s.masked_fill(torch.arange(nk) > torch.arange(nq)[:, None] + nk - nq, -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], -math.inf)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def run(q, k, v, seed=0, **kw):
    kw = {"nb_features": 16, "n_hashes": 2, "bucket_size": 8, **kw}
    return scatterbrain_attention(q, k, v, generator=torch.Generator().manual_seed(seed), **kw)


# ---------------------------------------------------------------- 1. exact on the support

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_exact_on_support(causal, n_hashes):
    q, k, v = qkv(scale=1.5)
    mask = padding()
    tau = q.shape[-1] ** -0.5
    for seed in range(3):  # any random features and hashes
        p = sb._prepare(q, k, v, 16, n_hashes, 8, causal, mask, None, torch.Generator().manual_seed(seed))
        a, top, support = sb._implied(p)
        assert 0 < support.sum() < support.numel() / 2
        entries = a * torch.exp(top).unsqueeze(-1)  # (S + L)_ij in absolute scale
        truth = torch.exp(q @ k.transpose(-1, -2) * tau)
        torch.testing.assert_close(entries[support], truth[support], rtol=1e-12, atol=0)
        # off the support: the Performer estimate, which is not exact
        off = (a > 0) & ~support
        assert (entries[off] - truth[off]).abs().max() > 1e-3
        # the O(n) path computes exactly the implied matrix, normalized
        out, _ = run(q, k, v, seed, n_hashes=n_hashes, causal=causal, key_padding_mask=mask)
        w = a / a.sum(-1, keepdim=True).clamp_min(1e-6)
        torch.testing.assert_close(out, w @ v, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- 2. degenerate limits

@pytest.mark.parametrize("causal", [False, True])
def test_one_bucket_is_exact_softmax(causal):
    q, k, v = qkv(scale=2.0)
    mask = padding()
    for n_hashes in (1, 2):
        out, _ = run(q, k, v, n_hashes=n_hashes, bucket_size=64, causal=causal, key_padding_mask=mask)
        torch.testing.assert_close(out, exact(q, k, v, causal, mask), rtol=1e-10, atol=1e-12)


def performer(q, k, v, omega, causal=False):
    """Direct FAVOR+ attention with unstabilized features φ(x) = exp(ωᵀx̃ − ‖x̃‖²/2)/√m."""
    tau = q.shape[-1] ** -0.5

    def phi(x):
        xs = x * math.sqrt(tau)
        return torch.exp(xs @ omega.T - xs.square().sum(-1, keepdim=True) / 2) / math.sqrt(omega.shape[0])

    lin = phi(q) @ phi(k).transpose(-1, -2)
    if causal:
        lin = lin.tril()
    return lin @ v / lin.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [False, True])
def test_empty_support_is_performer(causal):
    q, k, v = qkv(n=70, scale=0.7)
    out, _ = run(q, k, v, seed=5, nb_features=24, n_hashes=0, causal=causal)
    omega = orthogonal_gaussian(24, q.shape[-1], generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, performer(q, k, v, omega, causal), rtol=1e-10, atol=1e-12)
    assert (out - exact(q, k, v, causal)).abs().max() > 1e-3  # and Performer alone is not exact


# ---------------------------------------------------------------- 3. no double counting

@pytest.mark.parametrize("causal", [False, True])
def test_repeated_hash_rounds_count_once(causal, monkeypatch):
    q, k, v = qkv(scale=1.5)
    mask = padding()
    fixed = torch.randn(q.shape[-1] + 2, 1, generator=torch.Generator().manual_seed(9), dtype=F64)
    monkeypatch.setattr(sb, "_draw_directions", lambda dim, r, gen: fixed.expand(dim, r))
    one, _ = run(q, k, v, n_hashes=1, causal=causal, key_padding_mask=mask)
    for r in (2, 3):
        many, _ = run(q, k, v, n_hashes=r, causal=causal, key_padding_mask=mask)
        torch.testing.assert_close(many, one, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- 4. unbiased low-rank part

def test_low_rank_part_is_unbiased():
    q, k, v = qkv(b=1, h=1, n=5, d=4, scale=0.6, seed=3)
    truth = torch.exp(q @ k.transpose(-1, -2) / 2.0)[0, 0]
    draws, total = 3000, torch.zeros_like(truth)
    for s in range(draws):
        p = sb._prepare(q, k, v, 4, 0, 8, False, None, None, torch.Generator().manual_seed(s))
        total += ((p.phq @ p.phk.transpose(-1, -2)) * torch.exp(p.prime).unsqueeze(-1))[0, 0]
    rel = (total / draws - truth).abs() / truth
    assert rel.max() < 0.02, rel  # one draw's relative spread is ~0.2-0.4: a bias of a few % would show


# ---------------------------------------------------------------- 5. normalization

@pytest.mark.parametrize("causal", [False, True])
def test_weights_are_normalized_and_masked(causal):
    q, k, v = qkv(scale=1.2)
    mask = padding()
    out, w = run(q, k, v, causal=causal, key_padding_mask=mask, need_weights=True)
    assert w.shape == (2, 2, 40, 40)
    has_key = exact(q, k, torch.ones_like(v), causal, mask)[..., 0] > 0  # rows with some valid key
    torch.testing.assert_close(w.sum(-1)[has_key], torch.ones_like(w.sum(-1)[has_key]), rtol=1e-12, atol=1e-12)
    assert (w >= 0).all()
    assert (w.permute(0, 3, 1, 2)[~mask] == 0).all()  # padded keys get zero weight
    if causal:
        assert (w.triu(1) == 0).all()
    torch.testing.assert_close(out, w @ v, rtol=1e-10, atol=1e-12)
    _, none = run(q, k, v, causal=causal, key_padding_mask=mask)
    assert none is None


# ---------------------------------------------------------------- 6. O(n) memory

class Largest(TorchDispatchMode):
    """The largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def largest(n, need_weights=False, causal=False):
    q, k, v = qkv(b=1, h=1, n=n, d=16, dtype=torch.float32)
    with Largest() as probe:
        run(q, k, v, nb_features=16, n_hashes=2, bucket_size=32, causal=causal, need_weights=need_weights)
    return probe.numel


@pytest.mark.parametrize("causal", [False, True])
def test_memory_grows_linearly(causal):
    small, big = largest(256, causal=causal), largest(1024, causal=causal)
    assert big < 1024 * 1024 / 8  # no n × n tensor
    assert big / small < 4.5  # 4x the tokens: ~4x the largest buffer (n² would give 16x)
    assert largest(1024, need_weights=True, causal=causal) >= 1024 * 1024  # the probe does see an n × n tensor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_cuda_memory_grows_linearly():
    def peak(n):
        q, k, v = (t.cuda() for t in qkv(b=1, h=4, n=n, d=64, dtype=torch.float16))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(q, k, v, nb_features=64, n_hashes=2, bucket_size=64, causal=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    small, big = peak(4096), peak(16384)
    assert big / small < 5.0, (small, big)
    assert big < 16384 * 16384 * 4  # far below one fp32 n × n matrix per head


# ---------------------------------------------------------------- inputs, dtypes, errors

def test_fewer_queries_than_keys_and_bf16():
    q, k, v = qkv(n=30, scale=1.5)
    out, _ = run(q[..., -4:, :], k, v, causal=True, bucket_size=64)  # a KV-cache step: 4 new queries
    torch.testing.assert_close(out, exact(q, k, v, causal=True)[..., -4:, :], rtol=1e-10, atol=1e-12)
    o16, _ = run(*(t.bfloat16() for t in (q, k, v)), causal=True)
    assert o16.dtype == torch.bfloat16 and torch.isfinite(o16).all()


def test_bad_arguments():
    q, k, v = qkv()
    with pytest.raises(SubspacesError, match="bucket_size"):
        run(q, k, v, bucket_size=0)
    with pytest.raises(SubspacesError, match="key_padding_mask"):
        run(q, k, v, key_padding_mask=torch.ones(2, 40))
    with pytest.raises(SubspacesError, match="causal"):
        run(q, k[..., :5, :], v[..., :5, :], causal=True)
    with pytest.raises(SubspacesError, match="nb_features"):
        Scatterbrain(nb_features=0)


# ---------------------------------------------------------------- Hugging Face drop-in

def batch_with_padding(n=12):
    x = ids(length=n)
    am = torch.ones_like(x)
    am[0, :3] = 0
    return {"input_ids": x, "attention_mask": am}


@pytest.mark.parametrize("build", [llama_causal, bert_seqcls])
def test_drop_in_with_one_bucket_matches_the_model(build):
    base = build()
    model = scatterbrain_(copy.deepcopy(base), nb_features=8, n_hashes=1, bucket_size=64, seed=0)
    assert model.config._attn_implementation == "scatterbrain"
    for inputs in ({"input_ids": ids()}, batch_with_padding()):
        with torch.no_grad():
            ref, got = base(**inputs).logits, model(**inputs).logits
        keep = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
        if ref.dim() == 3:  # padded tokens' own outputs are not defined the same way
            ref, got = ref[keep], got[keep]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_deepcopy_keeps_the_random_stream():
    model = scatterbrain_(llama_causal(), nb_features=8, n_hashes=2, bucket_size=4, seed=3)
    twin, x = copy.deepcopy(model), ids(length=20)
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
        assert not torch.equal(model(input_ids=x).logits, model(input_ids=x).logits)  # redrawn at every forward


def test_llama_kv_cache_decoding():
    base = llama_causal()
    model = scatterbrain_(copy.deepcopy(base), nb_features=8, n_hashes=2, bucket_size=64)
    x = ids(length=10)
    with torch.no_grad():
        full = base(input_ids=x).logits
        pre = model(input_ids=x[:, :7], use_cache=True)
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        step = model(input_ids=x[:, 7:], **{name: pre.past_key_values}).logits
    torch.testing.assert_close(step, full[:, 7:], rtol=1e-4, atol=1e-5)


def test_attention_error_report_and_registry():
    base = llama_causal()
    batches = [ids(length=48, seed=s) for s in range(2)]
    with torch.no_grad():
        loss = sum(float(base(input_ids=b, labels=b).loss) for b in batches) / 2
    model = copy.deepcopy(base)
    rep = compress_(model, "scatterbrain", nb_features=8, n_hashes=1, bucket_size=8, calibration=batches)
    assert rep["method"] == "scatterbrain" and rep["params_before"] == rep["params_after"]
    names = [r["name"] for r in rep["layers"]]
    assert names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(0 < r["output_error"] < 2 for r in rep["layers"])
    assert rep["loss_exact"] == pytest.approx(loss, rel=1e-5)  # the exact pass is the original model
    assert rep["perplexity"] == pytest.approx(math.exp(rep["loss"]))
    assert rep["logits_error"] > 0
    one = attention_error(scatterbrain_(copy.deepcopy(base), nb_features=8, n_hashes=1, bucket_size=64),
                          batches)
    assert max(r["output_error"] for r in one["layers"]) < 1e-5
    assert abs(one["loss_change"]) < 1e-5
    more = attention_error(scatterbrain_(copy.deepcopy(base), nb_features=64, n_hashes=4, bucket_size=16),
                           batches)
    assert sum(r["output_error"] for r in more["layers"]) < sum(r["output_error"] for r in rep["layers"])
    with pytest.raises(SubspacesError, match="ratio"):
        compress_(copy.deepcopy(base), "scatterbrain", ratio=0.5)
    with pytest.raises(SubspacesError, match="scatterbrain_"):
        attention_error(copy.deepcopy(base), batches)
