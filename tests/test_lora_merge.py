"""LoRA merges lora_svd and lora_cat: exact sums, optimal truncation, weights, input checks, and PEFT round trips
(the merged folder loads in peft and in ss.load_adapter and computes base + Σ ΔW)."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import ids, llama_causal, logits, plain, plain_inputs, randomize_adapters

import subspaces as ss
from subspaces._errors import SubspacesError
from subspaces._registry import MERGE
from subspaces.adapters._core import DELTA, adapted_layers
from subspaces.merge import lora_cat, lora_svd
from subspaces.merge._lora import PREFIX

QV = ["q_proj", "v_proj"]


def make_lora(model, seed, targets=QV, fmt="peft", path=None, **hp):
    """(model with a random LoRA, {module: dense ΔW (out, in)}, saved folder or None)."""
    m = copy.deepcopy(model)
    ss.adapt_(m, "lora", targets=targets, **hp)
    randomize_adapters(m, seed=seed, std=0.3)
    dw = {n: layer._modules[DELTA].weight().detach().double() for n, layer in adapted_layers(m)}
    if path is not None:
        ss.save_adapter(m, path, format=fmt)
    return m, dw, path


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    base = llama_causal()
    d = tmp_path_factory.mktemp("loras")
    _, dw1, p1 = make_lora(base, 1, rank=4, alpha=8, path=d / "a")
    _, dw2, p2 = make_lora(base, 2, rank=2, alpha=3, rslora=True, path=d / "b")
    return base, [p1, p2], [dw1, dw2]


def dense(result, name):
    sd = result.state_dict
    A, B = sd[f"{PREFIX}{name}.lora_A.weight"].double(), sd[f"{PREFIX}{name}.lora_B.weight"].double()
    return B @ A


def test_svd_at_full_rank_is_the_exact_sum(two):
    _, paths, (dw1, dw2) = two
    r = lora_svd(paths, rank=6)
    assert r.config["r"] == 6 and sorted(r.config["target_modules"]) == sorted(dw1)
    for name in dw1:
        torch.testing.assert_close(dense(r, name), dw1[name] + dw2[name], atol=1e-5, rtol=1e-5)
    assert max(row["relative_error"] for row in r.report) < 1e-6


def test_svd_is_optimal_its_error_is_the_tail_spectrum(two):
    _, paths, (dw1, dw2) = two
    r = lora_svd(paths, rank=2)
    for row in r.report:
        total = dw1[row["name"]] + dw2[row["name"]]
        S = torch.linalg.svdvals(total)
        err = (total - dense(r, row["name"])).norm()
        assert row["rank"] == 2
        assert float(err) == pytest.approx(float(S[2:].norm()), rel=1e-4)
        assert row["relative_error"] == pytest.approx(float(S[2:].norm() / S.norm()), rel=1e-4)


def test_cat_is_exact_with_weights(two):
    _, paths, (dw1, dw2) = two
    r = lora_cat(paths, weights=[0.5, -2.0])
    s = lora_svd(paths, rank=6, weights=[0.5, -2.0])
    assert r.config["r"] == 6
    for name in dw1:
        want = 0.5 * dw1[name] - 2.0 * dw2[name]
        torch.testing.assert_close(dense(r, name), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dense(s, name), want, atol=1e-5, rtol=1e-5)


def test_inputs_in_any_format_and_chained(two, tmp_path):
    base, paths, (dw1, dw2) = two
    model, dw3, native = make_lora(base, 3, rank=3, path=tmp_path / "native", fmt="native")
    r = lora_cat([native, model, paths[0]])       # native folder, live model, PEFT folder
    chained = lora_svd([r, paths[1]], rank=64)    # a result merges again; rank capped at the ceiling
    for name in dw1:
        torch.testing.assert_close(dense(r, name), 2 * dw3[name] + dw1[name], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dense(chained, name), 2 * dw3[name] + dw1[name] + dw2[name], atol=1e-5,
                                   rtol=1e-5)


def folded(base, dws):
    m = copy.deepcopy(base)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for dw in dws:
            for name, d in dw.items():
                w = mods[name].weight
                w.add_((d.T if w.shape != d.shape else d).to(w.dtype))
    return m


def test_peft_round_trip_gives_the_summed_model(two, tmp_path):
    from peft import PeftModel

    base, paths, dws = two
    x = ids()
    want = logits(folded(base, dws), x)
    for method, hp in (("lora_svd", {"rank": 6}), ("lora_cat", {})):
        out = tmp_path / method
        ss.merge(method, base=None, models=paths, out=out, **hp)
        assert (out / "merge_config.json").is_file()
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
        torch.testing.assert_close(logits(pm, x), want, atol=1e-5, rtol=1e-5)
        ours = ss.load_adapter(copy.deepcopy(base), out)
        torch.testing.assert_close(logits(ours, x), want, atol=1e-5, rtol=1e-5)


def test_conv_and_embedding_layers(tmp_path):
    base = plain()
    targets = ["emb", "conv1", "conv2", "fc1"]
    _, dw1, p1 = make_lora(base, 1, targets=targets, rank=2, path=tmp_path / "a")
    _, dw2, p2 = make_lora(base, 2, targets=targets, rank=3, path=tmp_path / "b")
    x = plain_inputs()
    want = logits(folded(base, [dw1, dw2]), x)
    for method, hp in (("lora_svd", {"rank": 5}), ("lora_cat", {})):
        out = tmp_path / method
        ss.merge(method, models=[p1, p2], out=out, **hp)
        torch.testing.assert_close(logits(ss.load_adapter(copy.deepcopy(base), out), x), want, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_and_write_nothing(two, tmp_path):
    base, paths, _ = two
    _, _, other_targets = make_lora(base, 4, targets=["k_proj"], rank=2, path=tmp_path / "k")
    from subspaces.models import tiny_llama

    wide = tiny_llama(hidden_size=64, intermediate_size=64, num_attention_heads=4)
    _, _, other_model = make_lora(wide, 5, rank=2, path=tmp_path / "wide")
    out = tmp_path / "out"
    run = MERGE.get("lora_svd").obj.run
    cases = [
        (lambda: run(models=[paths[0], other_targets], rank=2, out=out), "different modules"),
        (lambda: run(models=[paths[0], other_model], rank=2, out=out), "shape"),
        (lambda: run(models=paths, rank=2, density=0.5, out=out), "valid: rank, weights"),
        (lambda: run(models=paths, out=out), "rank is required"),
        (lambda: run(models=paths, rank=0, out=out), "rank=0"),
        (lambda: run(models=paths, rank=2, weights=[1.0], out=out), "weights"),
        (lambda: MERGE.get("lora_cat").obj.run(models=paths, rank=2, out=out), "unknown hyperparameter 'rank'"),
        (lambda: run(models=paths[0], rank=2, out=out), "list"),
        (lambda: run(models=[tmp_path / "nothing"], rank=2, out=out), "not a LoRA folder"),
    ]
    for call, message in cases:
        with pytest.raises(SubspacesError, match=message):
            call()
        assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(SubspacesError, match="already exists"):
        lora_cat(paths, out=out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
