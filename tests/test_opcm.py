"""OPCM (continual merging by orthogonal projection) and the continual task-arithmetic baseline: the spec's faithful
tests (methods/merge-opcm.md) on tiny random models."""
from __future__ import annotations

import gc
import math
import random
import weakref

import pytest
import torch
from torch import nn

import subspaces.merge as sm
from subspaces._errors import SubspacesError
from subspaces.merge.opcm import project, split_rank


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 12)
        self.norm = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 6, bias=False)
        self.register_buffer("ids", torch.arange(5))  # non-float: copied from the base


LINEAR = {"fc1.weight", "fc2.weight"}


def base_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def finetuned(base: dict, seed: int, scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in base.items()}


@pytest.fixture
def sds():
    base = dict(base_model().state_dict())
    return base, [finetuned(base, i) for i in range(4)]


def tv_norm(sd: dict, base: dict) -> float:
    return math.sqrt(sum(float((sd[k].double() - base[k].double()).square().sum())
                         for k in base if base[k].is_floating_point()))


def steps(base, models, **hp):
    return list(sm.merge_stream("opcm", base=base, models=models, **hp))


def test_single_model_is_returned_as_is(sds):
    base, models = sds
    (only,) = steps(base, models[:1])
    assert only.step == 1 and only.info["lambda"] == 1.0
    for k in base:
        assert torch.equal(only[k], models[0][k])


def test_inputs_are_left_untouched(sds):
    base, models = sds
    before = [{k: v.clone() for k, v in sd.items()} for sd in [base, *models]]
    steps(base, models)
    list(sm.merge_stream("continual_ta", base=base, models=models))
    for sd, old in zip([base, *models], before):
        assert all(torch.equal(sd[k], old[k]) for k in sd)


def test_norm_invariant_after_every_step(sds):
    base, models = sds
    norms = [tv_norm(m, base) for m in models]
    for t, sd in enumerate(steps(base, models), start=1):
        avg = sum(norms[:t]) / t
        assert sd.info["avg_task_vector_norm"] == pytest.approx(avg, rel=1e-9)
        assert tv_norm(sd, base) == pytest.approx(avg, rel=1e-5)
    assert 1.2 < sd.info["lambda"] < 2.5  # ≈ √T for nearly orthogonal random task vectors (√4 = 2)


def reference_projection(delta: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """The official formula, with full m×m / n×n singular factors."""
    U, s, Vh = torch.linalg.svd(delta.double(), full_matrices=True)
    k = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
    P = U.T @ tau.double() @ Vh.T
    P.diagonal().fill_(0)
    P[:k, :k] = 0
    return U @ P @ Vh


@pytest.mark.parametrize("shape", [(12, 8), (6, 12), (10, 10)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_projection_kills_protected_block_and_diagonal(shape, alpha):
    g = torch.Generator().manual_seed(0)
    delta, tau = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    clean = project(delta, tau, alpha)
    U, s, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = split_rank(s, alpha)
    C = U.T @ clean @ Vh.T
    assert C[:k, :k].abs().max() < 1e-12 if k else True
    assert C.diagonal().abs().max() < 1e-12
    assert (clean - tau).norm() > 0.1 * tau.norm() if k > 1 else True
    # thin-SVD form == the official full-SVD form
    torch.testing.assert_close(clean, reference_projection(delta, tau, alpha), rtol=0, atol=1e-12)


def test_split_rank_follows_cumulative_singular_values():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative mass 0.4, 0.7, 0.9, 1.0
    assert [split_rank(s, a) for a in (0.0, 0.39, 0.5, 0.8, 0.95)] == [0, 0, 1, 2, 3]
    assert split_rank(torch.zeros(3), 0.5) == 0


def test_alpha_near_one_protects_almost_everything_and_one_is_refused(sds):
    base, models = sds
    g = torch.Generator().manual_seed(1)
    delta, tau = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)
    k = split_rank(torch.linalg.svdvals(delta), 0.999)
    assert k >= 7  # r = 8: the whole block but (at most) the last singular pair
    assert project(delta, tau, 0.999).norm() < 0.9 * tau.norm()
    with pytest.raises(SubspacesError, match="alpha"):
        steps(base, models, alpha=1.0)


def test_same_task_twice_adds_nothing_to_linear_weights(sds):
    base, models = sds
    first, second = steps(base, [models[0], models[0]])
    lam = second.info["lambda"]
    for k in base:
        if not base[k].is_floating_point():
            continue
        d1, d2 = first[k] - base[k], second[k] - base[k]
        # linear: τ = Δ lies on Δ's own singular pairs (the diagonal), so it is projected out entirely
        expected = d1 / lam if k in LINEAR else 2 * d1 / lam
        torch.testing.assert_close(d2, expected, rtol=1e-5, atol=1e-6)


def test_zero_task_vector_only_rescales(sds):
    base, models = sds
    a, b = steps(base, [models[0], models[1], base])[1:]
    ratio = b.info["avg_task_vector_norm"] / a.info["avg_task_vector_norm"]
    for k in LINEAR | {"fc1.bias", "norm.weight", "embed_tokens.weight"}:
        torch.testing.assert_close(b[k] - base[k], (a[k] - base[k]) * ratio, rtol=1e-4, atol=1e-6)
    assert b.info["task_vector_norm"] == 0


def test_non_linear_parameters_follow_the_running_sum(sds):
    base, models = sds
    first, second = steps(base, models[:2])
    lam = second.info["lambda"]
    for k in ("fc1.bias", "norm.weight", "norm.bias", "embed_tokens.weight"):
        expected = ((first[k] - base[k]) + (models[1][k] - base[k])) / lam
        torch.testing.assert_close(second[k] - base[k], expected, rtol=1e-5, atol=1e-7)
    # and the linear weights are not (their update was projected)
    plain = ((first["fc1.weight"] - base["fc1.weight"]) + (models[1]["fc1.weight"] - base["fc1.weight"])) / lam
    assert (second["fc1.weight"] - base["fc1.weight"] - plain).abs().max() > 1e-3
    assert torch.equal(second["ids"], base["ids"])


def test_linear_selection_module_and_state_dict_agree(sds):
    base, models = sds
    from subspaces.merge._stream import Base
    from subspaces.merge.opcm import linear_keys

    module = base_model()
    assert linear_keys(module, Base(module, device=None, dtype=None), None) == LINEAR
    assert linear_keys(base, Base(base, device=None, dtype=None), None) == LINEAR
    by_module = steps(module, models)[-1]
    by_dict = steps(base, models)[-1]
    for k in base:
        assert torch.equal(by_module[k], by_dict[k])
    only_fc1 = steps(base, models, linear=["fc1.weight"])[-1]
    assert not torch.allclose(only_fc1["fc2.weight"], by_dict["fc2.weight"])


def test_constant_memory_models_are_released_and_state_is_fixed(sds):
    base, _ = sds
    refs, live = [], []

    def arriving(n):
        for i in range(n):
            sd = finetuned(base, i)
            refs.append(weakref.ref(sd["fc1.weight"]))
            yield sd

    for sd in sm.merge_stream("opcm", base=base, models=arriving(5)):
        step = sd.step
        del sd
        gc.collect()
        # models before the current one are gone: only θ₀, the running merge and the incoming model are held
        assert all(r() is None for r in refs[: step - 1])
        live.append(sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter)))
    assert len(set(live[1:])) == 1, live  # the same number of tensors whatever t


def test_order_is_deterministic_and_seeded_shuffle_matches_fusion_bench(sds):
    base, models = sds
    a, b = steps(base, models)[-1], steps(base, models)[-1]
    assert all(torch.equal(a[k], b[k]) for k in base)
    shuffled = steps(base, models, shuffle_order=True, seed=7)
    perm = list(range(4))
    random.seed(7)
    random.shuffle(perm)  # fusion-bench: L.seed_everything(seed); random.shuffle(model_names)
    assert [s.index for s in shuffled] == perm
    manual = steps(base, [models[i] for i in perm])[-1]
    assert all(torch.equal(shuffled[-1][k], manual[k]) for k in base)
    # OPCM depends on the order, continual task arithmetic does not
    rev = steps(base, models[::-1])[-1]
    assert (rev["fc1.weight"] - a["fc1.weight"]).abs().max() > 1e-4
    ta = list(sm.merge_stream("continual_ta", base=base, models=models))[-1]
    ta_rev = list(sm.merge_stream("continual_ta", base=base, models=models[::-1]))[-1]
    for k in base:
        torch.testing.assert_close(ta[k], ta_rev[k])


def test_bf16_on_cpu(sds):
    base, models = sds
    bf = lambda sd: {k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    out16 = steps(bf(base), [bf(m) for m in models])[-1]
    out32 = steps({k: v.bfloat16().float() if v.is_floating_point() else v for k, v in base.items()},
                  [{k: v.bfloat16().float() if v.is_floating_point() else v for k, v in m.items()} for m in models])[-1]
    assert out16["fc1.weight"].dtype == torch.bfloat16 and out16["ids"].dtype == torch.int64
    for k in LINEAR:
        torch.testing.assert_close(out16[k].float(), out32[k], rtol=2e-2, atol=1e-2)


def test_continual_ta_is_scaled_running_sum(sds):
    base, models = sds
    for t, sd in enumerate(sm.merge_stream("continual_ta", base=base, models=models, scaling=0.3), start=1):
        for k in ("fc1.weight", "norm.bias"):
            expected = base[k] + 0.3 * sum(m[k] - base[k] for m in models[:t])
            torch.testing.assert_close(sd[k], expected)


def test_merge_runs_to_the_end_and_writes(sds, tmp_path):
    base, models = sds
    last = steps(base, models, alpha=0.3)[-1]
    final = sm.merge("opcm", base=base, models=models, alpha=0.3)
    assert all(torch.equal(final[k], last[k]) for k in base)
    folder = sm.merge("opcm", base=base, models=models, alpha=0.3, out=tmp_path / "m")
    loaded = sm.load_state_dict(folder)
    assert all(torch.equal(loaded[k], last[k]) for k in base)
    # lazy inputs: safetensors folders, read one tensor at a time
    paths = []
    for i, m in enumerate(models):
        paths.append(sm.write_model(tmp_path / f"ft{i}", m, config={}))
    from_disk = steps(sm.write_model(tmp_path / "base", base, config={}), paths, alpha=0.3)[-1]
    assert all(torch.equal(from_disk[k], last[k]) for k in base)


def test_bad_input_is_named(sds):
    base, models = sds
    with pytest.raises(SubspacesError, match="valid: alpha"):
        sm.merge_stream("opcm", base=base, models=models, alpah=0.5)
    with pytest.raises(SubspacesError, match="valid:"):
        sm.merge("continual_ta", base=base, models=models, lamda=0.3)
    with pytest.raises(SubspacesError, match="not a stream method"):
        sm.merge_stream("ties", base=base, models=models)
    with pytest.raises(SubspacesError, match="empty"):
        sm.merge("opcm", base=base, models=[])
    with pytest.raises(SubspacesError, match="lacks tensor"):
        steps(base, [{k: v for k, v in models[0].items() if k != "fc1.bias"}])
